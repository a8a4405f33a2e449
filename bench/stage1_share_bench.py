"""Stage 1 at scale: does a task's memory and time follow its own share of the corpus? (issue 14)

    python bench/stage1_share_bench.py                # 1e6 documents, 64 shards (seq_len 512)
    python bench/stage1_share_bench.py --docs 50000   # a quick run

A synthetic corpus of `--docs` short documents (8 JSON-lines files, ~60 tokens each) and the tiny test
tokenizer/model. Each measurement runs in a fresh process and does what a `pipeline teacher` task does
before its engine scores anything: `prepare.prepare` (plan the corpus, build the run spec) and
`ShardSource.sequences(i)` (read and tokenize the shard's range, pack it) for its shard(s):

    whole run       --num-shards 1: the whole corpus as one share (what every task of a split did before
                    issue 14: tokenize everything, keep everything)
    one task of 64  --num-shards 64, one shard (first, middle and last are measured; the worst is reported)

Peak RSS = the process's resident high-water mark minus its resident set after imports (torch,
transformers) and the tokenizer: the memory the corpus costs. Wall = prepare + sequences. The target
(issue 14): one task's peak RSS and wall time <= 2/64 of the whole run's.
Writes bench/out/stage1_share.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.common import log, machine_info, table, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
_WORDS = (
    "the teacher model reads every sequence once and a student learns from those guesses while rain fell on "
    "the old stone bridge and numbers grow slowly in the quiet morning light over the hills of the valley"
).split()


def make_corpus(root: Path, docs: int, files: int = 8) -> Path:
    """`docs` documents of 20..80 words, deterministic, in `files` JSON-lines files."""
    import numpy as np

    d = root / f"corpus_{docs}"
    if (d / "DONE").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = np.array(_WORDS)
    per = -(-docs // files)
    for f in range(files):
        n = min(per, docs - f * per)
        lengths = rng.integers(20, 81, size=n)
        picks = rng.integers(0, len(words), size=int(lengths.sum()))
        with open(d / f"part-{f:02d}.jsonl", "w") as out:
            pos = 0
            for L in lengths:
                out.write(json.dumps({"text": " ".join(words[picks[pos : pos + L]])}) + "\n")
                pos += L
    (d / "DONE").write_text("ok")
    return d


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(model: str, data: str, num_shards: int, shards: list[int], seq_len: int) -> dict:
    """One task, in this (fresh) process: prepare + the sequences of `shards`."""
    from stage1_teacher.config import TeacherConfig
    from stage1_teacher.prepare import prepare

    cfg = TeacherConfig(
        model=model,
        data=data,
        out=Path("/nonexistent"),
        num_shards=num_shards,
        seq_len=seq_len,
        capture="topk",
        top_k=4,
        engine="hf",
        device="cpu",
    )
    from lm.loading import load_tokenizer

    load_tokenizer(model)  # imports and tokenizer: the baseline
    base_kib = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    spec, source, _, _ = prepare(cfg)
    t_plan = time.perf_counter() - t0
    seqs = tokens = 0
    for i in shards:
        s = source.sequences(i)
        seqs += len(s)
        tokens += sum(len(x.input_ids) for x in s)
        del s
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "num_shards": num_shards,
        "shards": shards,
        "sequences": seqs,
        "tokens": tokens,
        "wall_s": wall,
        "plan_s": t_plan,
        "baseline_rss_mib": base_kib / 1024,
        "peak_rss_above_baseline_mib": (peak_kib - base_kib) / 1024,
    }


def run_child(model: Path, data: Path, num_shards: int, shards: list[int], seq_len: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(model),
        str(data),
        str(num_shards),
        json.dumps(shards),
        str(seq_len),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--num-shards", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)  # the tiny model's context
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        model, data, n, shards, seq_len = a.child
        print(json.dumps(child(model, data, int(n), json.loads(shards), int(seq_len))))
        return
    from tiny_models import build_tiny_model

    work = OUT / "stage1_share"
    model = work / "tiny_model"
    if not (model / "config.json").exists():
        build_tiny_model(model)
    t0 = time.perf_counter()
    data = make_corpus(work, a.docs)
    log(f"corpus: {a.docs:,} documents, {sum(p.stat().st_size for p in data.glob('*.jsonl')) / 2**20:.0f} MiB")
    n = a.num_shards
    whole = run_child(model, data, 1, [0], a.seq_len)
    log(f"whole: {whole}")
    tasks = [run_child(model, data, n, [i], a.seq_len) for i in (0, n // 2, n - 1)]
    for t in tasks:
        log(f"task: {t}")
    worst_rss = max(t["peak_rss_above_baseline_mib"] for t in tasks)
    worst_wall = max(t["wall_s"] for t in tasks)
    limit = 2 / n
    rows = [
        [
            "whole run (1 share)",
            f"{whole['tokens']:,}",
            f"{whole['peak_rss_above_baseline_mib']:.1f}",
            f"{whole['wall_s']:.2f}",
            "",
            "",
        ]
    ]
    for t in tasks:
        rows.append(
            [
                f"task: shard {t['shards'][0]} of {n}",
                f"{t['tokens']:,}",
                f"{t['peak_rss_above_baseline_mib']:.1f}",
                f"{t['wall_s']:.2f}",
                f"{t['peak_rss_above_baseline_mib'] / whole['peak_rss_above_baseline_mib']:.4f}",
                f"{t['wall_s'] / whole['wall_s']:.4f}",
            ]
        )
    print(
        table(
            ["run", "tokens", "peak RSS above baseline (MiB)", "wall (s)", "RSS / whole", "wall / whole"],
            rows,
            title=f"stage 1 share: {a.docs:,} documents, {n} shards, seq_len {a.seq_len} (target <= {limit:.4f})",
        )
    )
    result = {
        "docs": a.docs,
        "num_shards": n,
        "seq_len": a.seq_len,
        "whole": whole,
        "tasks": tasks,
        "rss_ratio_worst": worst_rss / whole["peak_rss_above_baseline_mib"],
        "wall_ratio_worst": worst_wall / whole["wall_s"],
        "target_ratio": limit,
        "pass": worst_rss <= limit * whole["peak_rss_above_baseline_mib"] and worst_wall <= limit * whole["wall_s"],
        "bench_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    path = write_json(OUT / "stage1_share.json", result)
    print(f"pass: {result['pass']} -> {path}")


if __name__ == "__main__":
    main()
