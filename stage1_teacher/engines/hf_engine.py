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


def _inverse_cdf_draws(lp: torch.Tensor, full_lp: torch.Tensor, u: torch.Tensor):
    """One draw per uniform from the (possibly restricted, unnormalised) distribution exp(lp) (C, V):
    the first token whose cumulative mass reaches u · total. Returns ids (C, N) (-1 where the
    distribution is empty) and their log-probs under the full distribution `full_lp`."""
    cdf = torch.cumsum(torch.exp(lp.double()), dim=-1)  # (C, V) fp64: exact enough for 1e5+ tokens
    total = cdf[:, -1:]
    ids = torch.searchsorted(cdf, u * total).clamp_(max=lp.shape[-1] - 1)  # (C, N)
    ids = torch.where(total > 0, ids, torch.full_like(ids, -1))
    logps = torch.where(
        ids >= 0, full_lp.gather(-1, ids.clamp(min=0)), torch.full_like(u, float("-inf"), dtype=torch.float32)
    )
    return ids.to(torch.int32), logps.float()


class HFEngine:
    """Score sequences with a transformers causal LM in eval mode, without gradients.

    model_name_or_path: a local directory, a hub id (needs the network or the local cache), or a
        `.gguf` file path. gguf_file: a GGUF file name inside that directory (or a path to one);
        transformers dequantises it to `dtype` (needs the `gguf` package).
    device: "cpu", "cuda", "cuda:N" or "auto" (cuda when available).
    chunk_positions: positions per lm_head/log-softmax chunk (bounds fp32 logits memory).
    max_model_len: if set, longer sequences are refused (for parity with the vLLM engine).
    """

    name = "hf"

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        dtype: str = "float32",
        device: str = "cpu",
        gguf_file: str | None = None,
        chunk_positions: int = 1024,
        max_model_len: int | None = None,
    ):
        if chunk_positions < 1:
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
        the full distribution (inverse CDF), or from the distribution restricted to outside the top k
        when `tail_only`. Passing the uniforms in keeps draws independent of batching."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r}: need a positive int")
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
            chunk = project(flat[s:e]) if project is not None else flat[s:e]
            # (n, V) fp32; with dtype= CUDA upcasts inside the kernel (half_to_float), CPU copies first.
            lp = torch.log_softmax(chunk, dim=-1, dtype=torch.float32)
            if U is None:  # fixed top-k: the fast tail
                vals, idx, tail_out[s:e] = _topk_and_tail(lp, k)
                ids_out[s:e] = idx.to(torch.int32)
                lp_out[s:e] = vals
                continue
            vals, idx = torch.topk(lp, k, dim=-1, sorted=True)
            full = lp.clone()
            if not tail_only:
                draw_ids[s:e], draw_lp[s:e] = _inverse_cdf_draws(lp, full, U[s:e])
            # The tail from the rest of the distribution, not 1 - sum(top-k): exact even when the
            # top-k mass is within float rounding of 1.
            lp.scatter_(-1, idx, float("-inf"))
            tail_out[s:e] = torch.logsumexp(lp, dim=-1)
            if tail_only:
                draw_ids[s:e], draw_lp[s:e] = _inverse_cdf_draws(lp, full, U[s:e])
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
