"""The transformers engine: the reference implementation the other engines are tested against.

The model runs once per batch to get final hidden states; the lm_head, the fp32 log-softmax and
`torch.topk` then run over chunks of `chunk_positions` positions, so at most
chunk_positions x vocab fp32 values exist at a time instead of batch x T x vocab.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from lm.lm_head import apply_logit_transforms, probe_ids, reproduces_logits
from lm.loading import torch_dtype
from lm.model_files import model_identity, resolve_model_dir
from lm.paths import looks_like_local_path

from .base import TopK

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # bf16 where it is fast and safe; fp32 on CPU, where bf16 matmuls gain little and lose accuracy.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch_dtype(dtype)


# Where the top k hold less than 1 - _TAIL_DIRECT_MIN of the mass, the tail is log(1 - Σ p_topk) (fp64 sum
# of fp32 log-probs: absolute error ~2.5e-7, so ~5e-6 in log space at this threshold). Above it the
# subtraction cancels, and those rows sum the rest of the distribution instead.
_TAIL_DIRECT_MIN = 0.05


def _topk_and_tail(lp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs (C, k) descending, their ids (C, k), tail log-prob (C,)) of log-probs lp (C, V).

    One top-k pass and a k-term sum per row; only peaked rows (top-k mass > 1 - _TAIL_DIRECT_MIN) pay a
    second pass over the vocabulary. lp is modified (those rows' top-k set to -inf)."""
    vals, idx = torch.topk(lp, k, dim=-1, sorted=True)
    rest = -torch.expm1(torch.logsumexp(vals.double(), dim=-1))  # (C,) 1 - Σ p_topk, fp64
    tail = torch.log(rest.clamp(min=0.0)).float()
    peaked = (rest < _TAIL_DIRECT_MIN).nonzero().squeeze(1)
    if peaked.numel():
        sub = lp[peaked].scatter_(-1, idx[peaked], float("-inf"))
        tail[peaked] = torch.logsumexp(sub, dim=-1)
    return vals, idx, tail


# Draws read the vocabulary in blocks of _DRAW_BLOCK ids: one pass sums each block (fp32), a draw picks its
# block from the (C, V / _DRAW_BLOCK) fp64 cumulative block sums, then its id from that block's fp64 cumsum.
# So the only vocabulary-sized work after the softmax is one summing pass in fp32: no (C, V) fp64 cumsum
# (twice the memory of the logits). 128 keeps the per-draw gather (C, N, 128) small at 256k vocabularies.
_DRAW_BLOCK = 128


# A chunk's vocabulary-sized fp32 buffers stay under this many bytes each: 1024 positions up to 64k ids,
# 512 at 128k, 256 at 256k (Gemma's 262k), so a large vocabulary does not multiply the peak memory.
_CHUNK_BYTES = 256 * 2**20


def default_chunk_positions(vocab_size: int) -> int:
    return max(1, min(1024, _CHUNK_BYTES // (4 * vocab_size)))


def _block_sums(p: torch.Tensor, block: int) -> torch.Tensor:
    """(C, V) -> (C, ceil(V / block)) fp32 sums of consecutive blocks, without copying p."""
    C, V = p.shape
    full = V // block
    parts = []
    if full:
        parts.append(p[:, : full * block].reshape(C, full, block).sum(-1))  # a view: rows are contiguous
    if V % block:
        parts.append(p[:, full * block :].sum(-1, keepdim=True))
    return torch.cat(parts, dim=1)


def inverse_cdf_draws(p: torch.Tensor, u: torch.Tensor, block: int = _DRAW_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """One draw per uniform u (C, N) in (0, 1] from the unnormalised distribution p (C, V) >= 0: the first id
    whose cumulative mass reaches u · total, found block by block (see _DRAW_BLOCK). Returns ids (C, N)
    int64 (-1 where the row is all zero) and the row totals (C,) fp64.

    A draw picks block j with probability S_j / Σ S (S: fp32 block sums) and then id i in the block with
    probability p_i / Σ_block p (fp64 cumsum of the block): the inverse CDF of p up to the fp32 rounding of
    the block sums (~1e-7 relative), far below anything a stored label can show."""
    C, V = p.shape
    sums = _block_sums(p, block).double()  # (C, nb)
    cdf = torch.cumsum(sums, dim=-1)
    total = cdf[:, -1]  # (C,)
    target = u.double() * total[:, None]  # (C, N)
    j = torch.searchsorted(cdf, target).clamp_(max=cdf.shape[1] - 1)  # (C, N): the block of each draw
    s_j = sums.gather(1, j)
    frac = ((target - (cdf.gather(1, j) - s_j)) / s_j).clamp_(0.0, 1.0)  # share of block j's mass to reach
    start = j * block
    cols = start[..., None] + torch.arange(block, device=p.device)  # (C, N, block)
    vals = p.gather(1, cols.clamp(max=V - 1).view(C, -1)).view(cols.shape)
    if V % block:  # the last block is partial: its clamped columns repeat id V - 1
        vals = vals.masked_fill(cols >= V, 0.0)
    within = torch.cumsum(vals, dim=-1, dtype=torch.float64)  # (C, N, block)
    w = torch.searchsorted(within, (frac * within[..., -1])[..., None]).squeeze(-1).clamp_(max=block - 1)
    # Rounding can land a draw on an id without mass (past the block's last positive entry): take that entry.
    empty = vals.gather(-1, w[..., None]).squeeze(-1) <= 0
    if bool(empty.any()):
        last = block - 1 - torch.argmax((vals.flip(-1) > 0).to(torch.int8), dim=-1)
        w = torch.where(empty, last, w)
    ids = torch.where(total[:, None] > 0, start + w, torch.full_like(start, -1))
    return ids, total


def _sampled_chunk(p: torch.Tensor, head_k: int, u: torch.Tensor, tail_only: bool):
    """The sampled modes' work on one chunk of probabilities p (C, V) fp32 (the softmax of the logits, which
    it may overwrite): draws (one per uniform) from the full distribution, or from the tail outside the top
    `head_k` when `tail_only`; plus the head (top `head_k` ids and log-probs, when head_k > 0) and the tail's
    log-mass (outside the head).
    Returns head log-probs (C, head_k), head ids, tail (C,), draw ids (C, N) int32, draw log-probs (C, N).

    After the softmax, the only vocabulary-sized work is the draws' block pass: no log-softmax copy, no
    fp64 (C, V) buffer, no second pass for the tail."""
    if head_k:
        vals, idx = torch.topk(p, head_k, dim=-1, sorted=True)
        head_lp = torch.log(vals)
    else:
        idx = torch.empty((p.shape[0], 0), dtype=torch.long, device=p.device)
        head_lp = torch.empty((p.shape[0], 0), dtype=torch.float32, device=p.device)
    if tail_only and head_k:
        p.scatter_(-1, idx, 0.0)
    ids, total = inverse_cdf_draws(p, u)
    # a drawn id has p > 0, so its log-prob is finite; fp32 p carries ~1e-7 relative error, as log_softmax does
    draw_lp = torch.where(ids >= 0, torch.log(p.gather(-1, ids.clamp(min=0))), torch.full_like(u, float("-inf")))
    if tail_only or not head_k:
        tail = torch.log(total).float() if head_k else torch.zeros_like(total, dtype=torch.float32)
    else:  # draws from the full distribution and a head: the mass outside the head needs its own pass
        tail = torch.log(p.scatter_(-1, idx, 0.0).sum(-1, dtype=torch.float32)).float()
    return head_lp, idx, tail, ids.to(torch.int32), draw_lp.float()


class HFEngine:
    """Score sequences with a transformers causal LM in eval mode, without gradients.

    model_name_or_path: a local directory, a hub id (needs the network or the local cache), or a
        `.gguf` file path. gguf_file: a GGUF file name inside that directory (or a path to one);
        transformers dequantises it to `dtype` (needs the `gguf` package).
    device: "cpu", "cuda", "cuda:N" or "auto" (cuda when available).
    chunk_positions: positions per lm_head/log-softmax chunk (bounds fp32 logits memory); by default
        `default_chunk_positions(vocab)`: 1024, fewer for vocabularies over 64k ids.
    max_model_len: if set, longer sequences are refused (for parity with the vLLM engine).
    """

    name = "hf"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        dtype: str = "float32",
        device: str = "cpu",
        gguf_file: str | None = None,
        chunk_positions: int | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ):
        if chunk_positions is not None and chunk_positions < 1:
            raise ValueError(f"chunk_positions={chunk_positions}: need >= 1")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but torch sees no CUDA device; use device='cpu'")
        self.device = torch.device(device)
        weights_dtype = resolve_dtype(dtype, device)
        self.dtype = str(weights_dtype).removeprefix("torch.")
        self.chunk_positions = chunk_positions
        self.max_model_len = max_model_len

        name = os.fspath(model_name_or_path)
        if name.endswith(".gguf") and os.path.isfile(name):
            name, gguf_file = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
        elif gguf_file is not None and os.path.isfile(gguf_file):
            gguf_path = os.path.abspath(gguf_file)
            if name and os.path.isdir(name) and os.path.dirname(gguf_path) != os.path.abspath(name):
                raise ValueError(f"gguf_file {gguf_file} is not inside the model directory {name}")
            name, gguf_file = os.path.dirname(gguf_path), os.path.basename(gguf_path)
        self.name_or_path = name
        self.gguf_file = gguf_file
        local = os.path.exists(os.path.expanduser(name))
        if not local and looks_like_local_path(name):
            raise FileNotFoundError(f"model path does not exist: {name}")
        if local and gguf_file is None and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            raise FileNotFoundError(
                f"{name} is not a Hugging Face model directory: no config.json (for a GGUF file pass gguf_file=)"
            )
        if gguf_file is not None and local and not os.path.isfile(os.path.join(os.path.expanduser(name), gguf_file)):
            raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {name}")
        kwargs = {"dtype": weights_dtype}
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        if gguf_file is not None:
            kwargs["gguf_file"] = gguf_file
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
        except OSError as e:
            where = "local directory" if local else "hub id (offline? not in the local cache?)"
            raise OSError(f"could not load the model from {name!r} as a {where}: {e}") from e
        self.model = model.to(self.device).eval().requires_grad_(False)

        base = self.model.base_model
        self._base = base if base is not self.model else None
        self._head = self.model.get_output_embeddings()
        self.vocab_size = self._check_head()
        if self.chunk_positions is None:
            self.chunk_positions = default_chunk_positions(self.vocab_size)

    # ------------------------------------------------------------------ the head

    def _apply_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (N, H) -> logits (N, V) as the model's own forward computes them."""
        # Heads that post-process the logits (Gemma 2/3, Cohere, Granite); _check_head catches others.
        return apply_logit_transforms(self._head(hidden), self.model.config)

    @torch.inference_mode()
    def _check_head(self) -> int:
        """Compare hidden-state + head logits with the model's forward on a short input; if they
        disagree, fall back to full forwards. Returns the logits width (the vocabulary size)."""
        x = probe_ids(int(getattr(self.model.config, "vocab_size", None) or 2), self.device)
        ref = self.model(input_ids=x, use_cache=False).logits[0].float()
        self._chunked = False
        if self._base is not None and self._head is not None:
            hidden = self._base(input_ids=x, use_cache=False).last_hidden_state[0]
            self._chunked = reproduces_logits(ref, self._apply_head(hidden), self._head.weight.dtype)[0]
        if not self._chunked:
            logger.warning(
                "%s: lm_head(final hidden state) does not reproduce the model's logits; computing full "
                "logits per batch instead (memory grows with batch x length x vocab)",
                type(self.model).__name__,
            )
        return int(ref.shape[-1])

    # ------------------------------------------------------------------ scoring

    def _prepare(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
        seqs = [np.asarray(s) for s in batch]
        for i, s in enumerate(seqs):
            if s.ndim != 1 or len(s) == 0 or not np.issubdtype(s.dtype, np.integer):
                raise ValueError(f"sequence {i}: need a non-empty 1-D array of int token ids, got {s.dtype} {s.shape}")
            lo, hi = int(s.min()), int(s.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"sequence {i}: token id {hi if hi >= self.vocab_size else lo} outside [0, {self.vocab_size})"
                )
            if self.max_model_len is not None and len(s) > self.max_model_len:
                raise ValueError(f"sequence {i}: length {len(s)} > max_model_len={self.max_model_len}")
        lengths = [len(s) for s in seqs]
        t_max = max(lengths)
        ids = np.zeros((len(seqs), t_max), dtype=np.int64)  # pad id 0: padded positions are masked and dropped
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = None
        if min(lengths) != t_max:  # None lets SDPA take its plain causal path
            attention_mask = (torch.arange(t_max)[None] < torch.tensor(lengths)[:, None]).long().to(self.device)
        return input_ids, attention_mask, lengths

    @torch.inference_mode()
    def forward_only(self, batch: list[np.ndarray]) -> torch.Tensor:
        """The plain model forward on the same right-padded batch: logits (B, T_max, V) on the device."""
        input_ids, attention_mask, _ = self._prepare(batch)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.inference_mode()
    def score(
        self, batch: list[np.ndarray], k: int, *, uniforms: list[np.ndarray] | None = None, tail_only: bool = False
    ) -> list[TopK]:
        """Top-k log-probs for every real position of every sequence (T_i - 1 rows each).

        uniforms: one (T_i - 1, N) array per sequence of numbers in (0, 1]; each becomes one draw from
        the full distribution (inverse CDF, `inverse_cdf_draws`), or from the distribution restricted to
        outside the top k when `tail_only`. Passing the uniforms in keeps draws independent of batching.
        With uniforms, k may be 0 (sample mode stores no head): then ids / logprobs are (T_i - 1, 0)
        and the tail is 0 (all the mass is outside an empty head)."""
        if not isinstance(k, (int, np.integer)) or k < (0 if uniforms is not None else 1):
            raise ValueError(f"k={k!r}: need a positive int (0 only with uniforms: draws without a head)")
        if k > self.vocab_size:
            raise ValueError(
                f"k={k} exceeds the vocabulary size {self.vocab_size} of {self.name_or_path}; "
                f"use k <= {self.vocab_size}"
            )
        k = int(k)
        if len(batch) == 0:
            return []
        input_ids, attention_mask, lengths = self._prepare(batch)
        t_max = input_ids.shape[1]
        # (B, T_max - 1): which rows predict a real next token
        real = torch.arange(t_max - 1, device=self.device)[None] < (
            torch.tensor(lengths, device=self.device)[:, None] - 1
        )

        if self._chunked:
            hidden = self._base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            flat = hidden[:, :-1][real]  # (N, H), sequence by sequence
            project = self._apply_head
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            flat = logits[:, :-1][real]  # (N, V)
            project = None

        n = flat.shape[0]
        U = None
        if uniforms is not None:
            U = torch.from_numpy(np.concatenate([np.asarray(u, dtype=np.float64) for u in uniforms])).to(self.device)
            if U.shape[0] != n:
                raise ValueError(f"uniforms cover {U.shape[0]} positions, the batch has {n}")
            draw_ids = torch.empty(U.shape, dtype=torch.int32, device=self.device)
            draw_lp = torch.empty(U.shape, dtype=torch.float32, device=self.device)
        ids_out = torch.empty((n, k), dtype=torch.int32, device=self.device)
        lp_out = torch.empty((n, k), dtype=torch.float32, device=self.device)
        tail_out = torch.empty((n,), dtype=torch.float32, device=self.device)
        for s in range(0, n, self.chunk_positions):
            e = min(s + self.chunk_positions, n)
            chunk = project(flat[s:e]) if project is not None else flat[s:e]  # (C, V) logits
            if U is None:  # fixed top-k: the fast tail
                # (C, V) fp32; with dtype= CUDA upcasts inside the kernel (half_to_float), CPU copies first.
                lp = torch.log_softmax(chunk, dim=-1, dtype=torch.float32)
                del chunk
                vals, idx, tail_out[s:e] = _topk_and_tail(lp, k)
                del lp
            else:  # sampled modes: only what the draws and the head need (no full log-softmax, no fp64 pass)
                p = torch.softmax(chunk, dim=-1, dtype=torch.float32)
                del chunk  # the logits are not needed once p exists: one (C, V) buffer during the draws
                vals, idx, tail_out[s:e], draw_ids[s:e], draw_lp[s:e] = _sampled_chunk(p, k, U[s:e], tail_only)
                del p
            ids_out[s:e] = idx.to(torch.int32)
            lp_out[s:e] = vals
        ids_np, lp_np, tail_np = ids_out.cpu().numpy(), lp_out.cpu().numpy(), tail_out.cpu().numpy()
        d_ids = draw_ids.cpu().numpy() if U is not None else None
        d_lp = draw_lp.cpu().numpy() if U is not None else None

        out = []
        start = 0
        for length in lengths:
            stop = start + length - 1
            out.append(
                TopK(
                    ids=ids_np[start:stop],
                    logprobs=lp_np[start:stop],
                    tail_logprob=tail_np[start:stop],
                    sample_ids=None if d_ids is None else d_ids[start:stop],
                    sample_logprobs=None if d_lp is None else d_lp[start:stop],
                )
            )
            start = stop
        return out

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> dict:
        """Identity of the teacher for the manifest (see lm.model_files.model_identity); needs a local copy."""

        ident = model_identity(
            resolve_model_dir(self.name_or_path), name_or_path=self.name_or_path, gguf_file=self.gguf_file
        )
        return {"engine": self.name, "dtype": self.dtype, **ident}
