"""`pipeline inspect RUN_DIR`: what a run holds, as a table or JSON.

JSON's `k` is the stored width per position (the run spec's k): the top k for topk, the cap for topp, the number
of draws for sample (distinct drawn ids with counts, at most that many), head + draws for hybrid; the table says
which in words."""

from __future__ import annotations

from .capture import DEFAULT_MODE, MODES, CaptureMode, mode_of
from .errors import IncompleteRunError
from .fs import location
from .manifest import build_manifest, load_manifest, missing_shards, present_shards
from .spec import load_run_spec


def summarize(run_dir) -> dict:
    run_dir = location(run_dir)
    try:
        m = load_manifest(run_dir)
        finalized = True
    except IncompleteRunError:
        spec = load_run_spec(run_dir)
        if missing_shards(run_dir, spec):
            return {
                "run_dir": str(run_dir),
                "finalized": False,
                "fingerprint": spec.fingerprint,
                "num_shards": spec.num_shards,
                "present_shards": sorted(present_shards(run_dir, spec)),
                "missing_shards": missing_shards(run_dir, spec),
                "k": spec.k,
                "capture": dict(spec.capture),
                "teacher": spec.teacher.get("name_or_path"),
                "seq_len": spec.seq_len,
            }
        m = build_manifest(run_dir, write=False)
        finalized = False
    s = m.spec
    return {
        "run_dir": str(run_dir),
        "finalized": finalized,
        "fingerprint": s.fingerprint,
        "format_version": s.format_version,
        "teacher": s.teacher.get("name_or_path"),
        "teacher_dtype": s.teacher.get("dtype"),
        "engine": s.capture.get("engine"),
        "tokenizer_hash": s.tokenizer.get("hash"),
        "vocab_size": s.vocab_size,
        "k": s.k,
        "encoding": s.encoding,
        "seq_len": s.seq_len,
        "num_shards": s.num_shards,
        "rows": m.rows,
        "trained_tokens": m.trained_tokens,
        "bytes": m.bytes,
        "bytes_per_trained_token": m.bytes / max(m.trained_tokens, 1),
        "mean_topk_mass": m.mean_topk_mass,
        "capture": dict(s.capture),
        "shards": [
            {"name": r.name, "rows": r.rows, "trained_tokens": r.trained_tokens, "bytes": r.bytes} for r in m.shards
        ],
    }


def format_table(info: dict) -> str:
    if not info["finalized"] and "missing_shards" in info:
        return (
            f"{info['run_dir']}: NOT FINALIZED — {len(info['missing_shards'])} of {info['num_shards']} "
            f"shards missing: {info['missing_shards'][:20]}\nteacher {info['teacher']}, "
            f"stored per position: {_mode(info.get('capture') or {}).entries(info['k'])}"
        )
    cap = info.get("capture") or {}
    mode = _mode(cap)
    lines = [
        f"run               {info['run_dir']}{'' if info['finalized'] else '  (manifest not written yet)'}",
        f"teacher           {info['teacher']} ({info['teacher_dtype']}, engine {info['engine']})",
        f"tokenizer         {info['tokenizer_hash'][:16]}…  vocab {info['vocab_size']}",
        f"capture           {mode.describe(cap)}",
        f"per position      {mode.entries(info['k'])}",
        f"encoding          {info['encoding']['ids']}/{info['encoding']['logprobs']}/{info['encoding']['tail']}"
        + _layout_note(info["encoding"], mode.sampled),
        f"seq_len           {info['seq_len']}",
        f"rows              {info['rows']:,}",
        f"trained tokens    {info['trained_tokens']:,}",
        f"bytes             {info['bytes']:,}  ({info['bytes_per_trained_token']:.1f} B / trained token)",
        f"stored mass       {info['mean_topk_mass']:.4f} (mean teacher probability of the stored ids"
        + (f": {mode.mass_note})" if mode.mass_note else ")"),
        "",
        f"{'shard':<32} {'rows':>8} {'trained':>12} {'bytes':>12}",
    ]
    for s in info["shards"]:
        lines.append(f"{s['name']:<32} {s['rows']:>8,} {s['trained_tokens']:>12,} {s['bytes']:>12,}")
    return "\n".join(lines)


def _mode(cap: dict) -> CaptureMode:
    # Lenient on purpose: inspect still shows a run whose mode this version does not know (as topk,
    # as it always has) instead of failing; stage 2 refuses such a run (storage.capture.mode_of).
    try:
        return mode_of(cap)
    except ValueError:
        return MODES[DEFAULT_MODE]


def _layout_note(encoding: dict, sampled: bool) -> str:
    """The sampled-label layout (storage.codec), for sampled runs: which entries carry log-probs."""
    if not sampled:
        return ""
    if encoding.get("sampled_layout", "entries") != "counts":
        return ", sampled layout entries (every entry with its log-prob)"
    kept = "with" if encoding.get("draw_logprobs") else "without"
    return f", sampled layout counts (distinct ids + draw counts, {kept} the drawn ids' log-probs)"
