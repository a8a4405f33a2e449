"""The engine interface of stage 1: score token sequences, return the teacher's top-k per position.

Convention (the same as `stage1_teacher.corpus`): for a sequence of T tokens, row t of every array
is the teacher's distribution for predicting token t+1 given tokens 0..t; there are T-1 rows.
Log-probs are raw (no temperature), normalised over the full vocabulary, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from storage.codec import tail_from_topk  # noqa: F401  (re-exported: engines derive tails with it)


@dataclass
class TopK:
    """Top-k of one sequence of length T."""

    ids: np.ndarray  # int32 (T-1, k), sorted by descending log-prob
    logprobs: np.ndarray  # float32 (T-1, k), log-probs normalised over the full vocabulary
    tail_logprob: np.ndarray  # float32 (T-1,): log of the mass outside the top k (-inf if none)
    # With draws (hf engine; vLLM engine with route="hidden"): (T-1, N) token ids drawn from the teacher
    # distribution (or from it restricted to the tail, outside the top k; -1 where the tail is empty) and their
    # log-probs.
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
