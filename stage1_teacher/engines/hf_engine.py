"""The transformers engine: the reference implementation the other engines are tested against.

The model runs once per batch to get final hidden states; the lm_head, the fp32 log-softmax and
`torch.topk` (or the draws) then run over chunks of `chunk_positions` positions (`head_scoring`, shared with the
vLLM engine), so at most chunk_positions x vocab fp32 values exist at a time instead of batch x T x vocab.
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
from .head_scoring import default_chunk_positions, score_positions

logger = logging.getLogger(__name__)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # bf16 where it is fast and safe; fp32 on CPU, where bf16 matmuls gain little and lose accuracy.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch_dtype(dtype)


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

        U = None
        if uniforms is not None:
            U = torch.from_numpy(np.concatenate([np.asarray(u, dtype=np.float64) for u in uniforms])).to(self.device)
        ids_np, lp_np, tail_np, d_ids, d_lp = score_positions(
            flat, k, project=project, chunk_positions=self.chunk_positions, uniforms=U, tail_only=tail_only
        )

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
