"""Per capture mode, what to ask the engine for and how to turn its answer into the stored entries. Numpy.

The modes themselves (names, stored width, what run.json records) are registered in `storage.capture`;
this module holds their numerics. Modes (recorded in the run spec as capture.mode):
- topk    the k most likely tokens with their log-probs, plus the tail: log of the mass outside them.
- topp    the smallest prefix of the top `max_k` holding `top_p` of the mass, at least `min_k`
          entries: peaked positions store few entries, flat ones up to max_k. Tail as in topk.
- sample  N draws from the full teacher distribution, stored as the distinct ids with their draw
          counts (and their exact log-probs, for reporting). Stage 2 uses counts/N as the target:
          an unbiased estimate of the teacher distribution, so the KL gradient (q − p) is unbiased
          (Anshumann et al. 2025). `tail_logprob` is the mass outside the distinct stored ids.
- hybrid  the exact top-k head plus M draws from the teacher distribution restricted to the tail.
          `tail_logprob` is the mass outside the HEAD (p_T). Stage 2's target is p_i on the head
          and p_T · c_j / M on the drawn tail ids: exact on the head, unbiased on the tail, since
          E[c_j / M] = p_j / p_T for every tail token j.

Padded layout (what storage takes): (n, K) ids with -1 after each position's valid prefix,
log-probs -inf there, entries sorted by descending log-prob; draws (n, K) counts, 0 on head entries.
"""

from __future__ import annotations

import numpy as np

from storage import mode_of, tail_from_topk

from .engines.base import Engine, TopK


def apply_top_p(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, top_p: float, min_k: int):
    """Keep the smallest prefix with cumulative probability >= top_p (at least min_k entries)."""
    p = np.exp(logprobs.astype(np.float64))  # (n, K)
    cum = np.cumsum(p, axis=1)
    keep = (cum >= top_p).argmax(axis=1) + 1  # first index reaching top_p, as a count
    keep = np.where(cum[:, -1] >= top_p, keep, ids.shape[1])  # never reached: keep all K
    keep = np.clip(keep, min(min_k, ids.shape[1]), ids.shape[1])
    valid = np.arange(ids.shape[1])[None, :] < keep[:, None]
    dropped = np.where(valid, 0.0, p).sum(axis=1)
    new_tail = np.log(np.exp(tail.astype(np.float64)) + dropped)  # the dropped entries join the tail
    return (
        np.where(valid, ids, -1).astype(np.int32),
        np.where(valid, logprobs, -np.inf).astype(np.float32),
        new_tail.astype(np.float32),
    )


def distinct_draws(draw_ids: np.ndarray, draw_logprobs: np.ndarray, width: int):
    """(n, N) draws -> (n, width) distinct ids, their log-probs and counts, sorted by descending
    log-prob and padded with -1 / -inf / 0. Draws with id -1 (nothing to draw from) are ignored."""
    n, N = draw_ids.shape
    if width < N:
        raise ValueError(f"width {width} < {N} draws: distinct ids may not fit")
    order = np.argsort(draw_ids, axis=1, kind="stable")
    s_ids = np.take_along_axis(draw_ids, order, axis=1)
    s_lp = np.take_along_axis(draw_logprobs, order, axis=1)
    valid = s_ids >= 0
    first = valid.copy()
    first[:, 1:] &= s_ids[:, 1:] != s_ids[:, :-1]
    run = np.cumsum(first, axis=1) - 1  # (n, N) index of each draw's distinct id
    rows = np.broadcast_to(np.arange(n)[:, None], (n, N))
    ids = np.full((n, width), -1, dtype=np.int32)
    lps = np.full((n, width), -np.inf, dtype=np.float32)
    counts = np.zeros((n, width), dtype=np.int64)
    ids[rows[first], run[first]] = s_ids[first]
    lps[rows[first], run[first]] = s_lp[first]
    np.add.at(counts, (rows[valid], run[valid]), 1)
    by_prob = np.argsort(-lps, axis=1, kind="stable")  # padding (-inf) stays last
    return (
        np.take_along_axis(ids, by_prob, axis=1),
        np.take_along_axis(lps, by_prob, axis=1),
        np.take_along_axis(counts, by_prob, axis=1),
    )


def hybrid_entries(head_ids, head_lp, head_tail, draw_ids, draw_logprobs, draws: int):
    """Head (n, k) exact entries followed by the distinct tail draws: (n, k + draws) padded arrays,
    counts 0 on the head. The tail log-mass stays the head's."""
    t_ids, t_lp, t_counts = distinct_draws(draw_ids, draw_logprobs, draws)
    ids = np.concatenate([head_ids.astype(np.int32), t_ids], axis=1)
    lps = np.concatenate([head_lp.astype(np.float32), t_lp], axis=1)
    counts = np.concatenate([np.zeros(head_ids.shape, dtype=np.int64), t_counts], axis=1)
    return ids, lps, head_tail.astype(np.float32), counts


def draw_uniforms(seed: int, sample_id: int, rows: int, draws: int) -> np.ndarray:
    """Uniforms in (0, 1] for one sequence's draws: a function of (seed, sample_id) only, so the
    stored draws do not depend on batching, sharding or the number of nodes."""
    return 1.0 - np.random.default_rng([seed, sample_id]).random((rows, draws))


def score_batch(engine: Engine, capture: dict, k: int, batch) -> list[TopK]:
    """The engine call a mode needs for a batch of `Sequence`s: the top k, or (sampled modes) draws with
    per-sequence uniforms, from the whole distribution or, where the mode stores an exact head, its tail."""
    ids = [s.input_ids for s in batch]
    if not mode_of(capture).sampled:
        return engine.score(ids, k)
    uniforms = [draw_uniforms(capture["seed"], s.sample_id, len(s.input_ids) - 1, capture["draws"]) for s in batch]
    head = capture["head_k"]  # 0 in sample mode: no head, draws from the whole distribution
    return engine.score(ids, head, uniforms=uniforms, tail_only=head > 0)


def _store_topk(capture: dict, top: TopK, m: np.ndarray):
    return top.ids[m], top.logprobs[m], top.tail_logprob[m], None


def _store_topp(capture: dict, top: TopK, m: np.ndarray):
    return (*apply_top_p(top.ids[m], top.logprobs[m], top.tail_logprob[m], capture["top_p"], capture["min_k"]), None)


def _store_sample(capture: dict, top: TopK, m: np.ndarray):
    ids, lps, counts = distinct_draws(top.sample_ids[m], top.sample_logprobs[m], capture["draws"])
    return ids, lps, tail_from_topk(lps), counts


def _store_hybrid(capture: dict, top: TopK, m: np.ndarray):
    return hybrid_entries(
        top.ids[m], top.logprobs[m], top.tail_logprob[m], top.sample_ids[m], top.sample_logprobs[m], capture["draws"]
    )


# One entry per mode of storage.capture.MODES (a test checks they agree).
STORE = {"topk": _store_topk, "topp": _store_topp, "sample": _store_sample, "hybrid": _store_hybrid}


def stored_entries(capture: dict, top: TopK, mask: np.ndarray):
    """(ids, logprobs, tail, draw counts or None) of one sequence's trained positions, in the mode's layout."""
    return STORE[mode_of(capture).name](capture, top, mask)
