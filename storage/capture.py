"""The capture modes: what a run stores per trained position, recorded in run.json as capture.mode.

This is the one registry of modes. Adding a mode = one `CaptureMode` entry in `MODES` below (its
stored width, the settings it records, how stage 2 targets it, how `pipeline inspect` names it)
plus its numerics in stage 1 (`stage1_teacher/capture_modes.py`). The shard format itself knows
only two flags per shard, `variable` and `sampled`, which every mode maps onto.

- topk    the k most likely tokens with their log-probs, plus the tail: log of the mass outside them.
- topp    the smallest prefix of the top `max_k` holding `top_p` of the mass, at least `min_k`
          entries. Tail as in topk.
- sample  N draws from the full teacher distribution, stored as the distinct ids with their draw
          counts; stage 2 uses counts/N as the (unbiased) target.
- hybrid  the exact top-k head plus M draws from the tail; stage 2 uses p_i on the head and
          p_T · c_j / M on the drawn tail ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class CaptureMode:
    name: str
    help: str  # one line for the CLI help: `name (help)`
    variable: bool  # entries per position vary (padded with id -1): the shard's label_counts column
    sampled: bool  # entries carry draw counts: the shard's sample_counts column
    target: str  # how stage 2 turns the stored entries into the KL target:
    #                       "logprobs" (the stored log-probs + tail bucket), "draw_counts" (c_j / N),
    #                       "head_and_draws" (exact head log-probs, p_T · c_j / M on the tail draws)
    width: Callable[[int, int], int] = field(repr=False, compare=False)  # (top_k, draws) -> K
    fields: Callable[..., dict] = field(repr=False, compare=False)  # run.json capture keys
    summary: Callable[[dict], str] = field(repr=False, compare=False)  # capture dict -> text
    mass_note: str = ""  # what the stored ids are, where `pipeline inspect` should say it
    tag: Callable[[dict], str] | None = field(default=None, repr=False, compare=False)  # short label, if not name
    # What the stored width K holds per position, for `pipeline inspect` (K = the run spec's `k`).
    entries: Callable[[int], str] = field(default=lambda k: f"{k} entries", repr=False, compare=False)

    def stored_width(self, top_k: int, draws: int) -> int:
        """K: the most entries a position can hold in this mode."""
        return self.width(top_k, draws)

    def spec_fields(self, top_k: int, top_p: float, min_k: int, draws: int, seed: int) -> dict:
        """The mode's settings recorded in run.json's `capture` dict (next to mode, engine, dtype)."""
        return self.fields(top_k=top_k, top_p=top_p, min_k=min_k, draws=draws, seed=seed)

    def label(self, capture: dict) -> str:
        """A few words for summary lines, e.g. "sample (32 draws)"."""
        return self.tag(capture) if self.tag else self.name

    def describe(self, capture: dict) -> str:
        """One line for `pipeline inspect`, from a run spec's `capture` dict."""
        return f"{self.name}: {self.summary(capture)}"


# How the sampled modes turn uniforms into ids, recorded in run.json (capture.draws_algorithm): a run drawn
# by another algorithm has other ids for the same uniforms, so it is never resumed into (the spec differs).
# Runs without the key were drawn by the full-vocabulary fp64 cumsum of label-anneal <= 2026-12-01.
DRAWS_ALGORITHM = "blocked-inverse-cdf-1"

_MODES = (
    CaptureMode(
        "topk",
        help="the k most likely ids + the tail mass",
        variable=False,
        sampled=False,
        target="logprobs",
        width=lambda top_k, draws: top_k,
        fields=lambda **s: {},
        summary=lambda c: "the top k ids + the tail mass",
        entries=lambda k: f"the top {k} ids with their log-probs, + the tail mass",
    ),
    CaptureMode(
        "topp",
        help="variable k by mass",
        variable=True,
        sampled=False,
        target="logprobs",
        width=lambda top_k, draws: top_k,  # top-k is the cap
        fields=lambda *, top_k, top_p, min_k, **s: {"top_p": top_p, "min_k": min_k, "max_k": top_k},
        summary=lambda c: (
            f"smallest prefix holding {c.get('top_p')} of the mass, {c.get('min_k')}..{c.get('max_k')} ids"
        ),
        entries=lambda k: f"at most {k} top ids with their log-probs (by mass), + the tail mass",
    ),
    CaptureMode(
        "sample",
        help="N draws, unbiased",
        variable=True,
        sampled=True,
        target="draw_counts",
        width=lambda top_k, draws: draws,
        fields=lambda *, draws, seed, **s: {
            "draws": draws,
            "seed": seed,
            "head_k": 0,
            "draws_algorithm": DRAWS_ALGORITHM,
        },
        summary=lambda c: f"{c.get('draws')} draws per position from the full distribution (seed {c.get('seed')})",
        mass_note="the distinct drawn tokens",
        entries=lambda k: f"at most {k} distinct drawn ids with their draw counts (sampled, not a top-k)",
        tag=lambda c: f"sample ({c.get('draws')} draws)",
    ),
    CaptureMode(
        "hybrid",
        help="exact top-k + N tail draws",
        variable=True,
        sampled=True,
        target="head_and_draws",
        width=lambda top_k, draws: top_k + draws,
        fields=lambda *, top_k, draws, seed, **s: {
            "draws": draws,
            "seed": seed,
            "head_k": top_k,
            "draws_algorithm": DRAWS_ALGORITHM,
        },
        summary=lambda c: f"exact top {c.get('head_k')} + {c.get('draws')} tail draws (seed {c.get('seed')})",
        entries=lambda k: f"at most {k}: the exact top ids with log-probs, + distinct tail draws with counts",
    ),
)

MODES: dict[str, CaptureMode] = {m.name: m for m in _MODES}
DEFAULT_MODE = "topk"  # a capture dict without a mode (synthetic or older run specs) is topk


def mode_of(capture: dict) -> CaptureMode:
    """The mode of a run spec's `capture` dict; ValueError for a mode this version does not know."""
    name = capture.get("mode", DEFAULT_MODE)
    try:
        return MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown capture mode {name!r} in the run spec; known modes: {', '.join(MODES)}") from None


__all__ = ["CaptureMode", "MODES", "DEFAULT_MODE", "mode_of"]
