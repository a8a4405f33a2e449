"""Stage-2 loader at scale (issue 13): what each process decodes, holds and delivers, for 1, 2, 4 and 8 processes.

    .venv/bin/python bench/loader_bench.py            # 512 shards × 64 rows × 128 tokens, k = 8 (~3 min, 2 cores)
    .venv/bin/python bench/loader_bench.py --quick    # 64 shards × 32 rows, a smoke run (~30 s)

What it does
    1. Writes a synthetic topk run with `storage.ShardWriter` (random labels: the loader's cost does not depend
       on their values), row groups of `--row-group-rows` rows, in bench/out/loader_bench_run/ (reused if present).
    2. For world = 1, 2, 4, 8 at the same global batch G (batch = G / world, grad_accum 1): starts `world`
       processes at once, each `stage2_student.loader.RankBatches` of its rank over one epoch through its
       background thread (`iter_steps`), verify="size". Each reports rows decoded (whole row groups) and rows
       trained, peak RSS (VmHWM) and its RSS before the loader started, peak open shards (`RunReader.open_files`)
       and peak file descriptors (/proc/self/fd), the peak decoded rows its lanes held, and trained tokens/s
       delivered (all processes share the machine's cores: with 8 processes on 2 cores each gets a quarter).
    3. Tokens/s delivered ÷ a SmolLM2-135M training step's consumption. The step is not re-measured: its cost on
       this machine is in bench/RESULTS.md, "Stage 2 step cost": 4 × 128 tokens (508 trained positions) in
       4,585 ms, i.e. 111 trained tokens/s (`SMOLLM2_CPU_TOKENS_PER_S`).
    4. Loop step time with the real loader ÷ with pre-loaded batches: one process trains a stand-in model (an
       embedding, two 512-wide layers and the output layer, CE; batch G / 8) for `--loop-steps` steps, (a) taking
       batches from `iter_steps` (decoded and collated on the loader thread) and (b) from a list prepared before
       the loop; both after their first step (the loader's time to its first batch is reported apart: paid once
       per start or resume); one warm-up round, then interleaved rounds, median. torch uses one thread, leaving the
       other core to the loader thread, as a GPU job leaves its CPU cores to the loader.
    5. Shuffle quality on this run, the lane order vs the order before issue 13 (one global order: row groups
       permuted, rows shuffled within windows of 4 row groups, global batch s = order[s·G : (s+1)·G]; reproduced
       here as `previous_order`): distinct row groups per global batch ÷ G, the steps over which a row group's
       rows are spread, and the rank correlation between stored position and training step.
Prints tables; writes bench/out/loader_bench.json (loader_bench_quick.json with --quick).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT, ROOT, log, machine_info, median, paired_ratios, table, write_json  # noqa: E402

SMOLLM2_CPU_TOKENS_PER_S = 508 / 4.585  # bench/RESULTS.md, "Stage 2 step cost", λ = 1 (fused head)
WORLDS = (1, 2, 4, 8)


def make_run(run_dir: Path, *, shards: int, rows: int, seq_len: int, k: int, vocab: int, row_group_rows: int) -> Path:
    import numpy as np

    from storage import Encoding, ShardWriter, build_manifest, claim_run_dir, shard_path
    from storage.synthetic import synthetic_spec

    if (run_dir / "manifest.json").exists():
        return run_dir
    spec = synthetic_spec(num_shards=shards, num_sequences=shards * rows, k=k, vocab_size=vocab, seq_len=seq_len)
    claim_run_dir(run_dir, spec)
    rng = np.random.default_rng(0)
    for i in range(shards):
        with ShardWriter(
            shard_path(run_dir, i, shards),
            fingerprint=spec.fingerprint,
            k=k,
            vocab_size=vocab,
            encoding=Encoding(),
            row_group_rows=row_group_rows,
        ) as w:
            for j in range(rows):
                n = seq_len - 1
                ids = (rng.integers(0, vocab, (n, 1)) + np.arange(k)[None, :]) % vocab  # distinct per position
                p = np.sort(rng.random((n, k)) + 0.05, axis=1)[:, ::-1]
                p = 0.8 * p / p.sum(1, keepdims=True)
                w.add(
                    i * rows + j,
                    rng.integers(0, vocab, seq_len).astype(np.int32),
                    np.ones(n, dtype=bool),
                    ids.astype(np.int32),
                    np.log(p).astype(np.float32),
                )
            w.close()
    build_manifest(run_dir)
    return run_dir


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(run_dir: str, rank: int, world: int, global_batch: int, block_rows: int) -> dict:
    """One simulated process: its loader over one epoch. Printed as JSON on stdout."""
    from stage2_student.loader import RankBatches
    from storage import RunReader

    rss_before = _vm_kib("VmRSS")
    reader = RunReader(run_dir, verify="size", max_open_files=32, cache_row_groups=0)
    lb = RankBatches(
        reader,
        seed=0,
        shuffle=True,
        batch_size=global_batch // world,
        grad_accum=1,
        rank=rank,
        world_size=world,
        pad_id=0,
        block_rows=block_rows,
    )
    tokens = peak_resident = peak_open = peak_fds = 0
    t0 = time.perf_counter()
    for batches in lb.iter_steps(0, lb.steps_per_epoch):
        tokens += sum(int(b["label_mask"].sum()) for b in batches)
        peak_resident = max(peak_resident, lb.resident_rows())
        peak_open = max(peak_open, reader.open_files())
        peak_fds = max(peak_fds, len(os.listdir("/proc/self/fd")))
    dt = time.perf_counter() - t0
    return {
        "rank": rank,
        "rows_decoded": reader.rows_decoded,
        "rows_trained": lb.rows_trained,
        "trained_tokens": tokens,
        "seconds": dt,
        "tokens_per_s": tokens / dt,
        "rss_before_mib": rss_before / 1024,
        "peak_rss_mib": _vm_kib("VmHWM") / 1024,
        "peak_open_shards": peak_open,
        "peak_fds": peak_fds,
        "peak_resident_rows": peak_resident,
        "shards_opened": reader.shards_opened,
    }


def run_world(run_dir: Path, world: int, global_batch: int, block_rows: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(run_dir),
                str(r),
                str(world),
                str(global_batch),
                str(block_rows),
            ],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


# ------------------------------------------------------------------------------------------- step-time ratio


def loop_ratio(run_dir: Path, *, batch_size: int, steps: int, repeats: int, block_rows: int) -> dict:
    import torch

    from stage2_student.loader import RankBatches
    from storage import RunReader

    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = RunReader(run_dir, verify="none").spec.vocab_size
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, 256),
        torch.nn.Linear(256, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, 512),
        torch.nn.GELU(),
        torch.nn.Linear(512, vocab),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def train_step(batches):
        for b in batches:
            logits = model(b["input_ids"])[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), b["labels"].reshape(-1))
            loss.backward()
        opt.step()
        opt.zero_grad()

    def new_loader():
        reader = RunReader(run_dir, verify="none", cache_row_groups=0)
        return RankBatches(
            reader,
            seed=0,
            shuffle=True,
            batch_size=batch_size,
            grad_accum=1,
            rank=0,
            world_size=1,
            pad_id=0,
            block_rows=block_rows,
        )

    preloaded = list(new_loader().iter_steps(0, steps + 1))

    loader_cpu: list[float] = []

    def with_loader() -> tuple[float, float]:
        """(seconds to the first batch, seconds of steps 1..steps). A fresh loader: it decodes everything again."""
        t0 = time.perf_counter()
        lb = new_loader()
        it = lb.iter_steps(0, steps + 1)
        first = next(it)
        t1 = time.perf_counter()
        train_step(first)
        t2 = time.perf_counter()
        for batches in it:
            train_step(batches)
        loader_cpu.append(lb.thread_cpu_s)
        return t1 - t0, time.perf_counter() - t2

    def with_preloaded() -> tuple[float, float]:
        train_step(preloaded[0])
        t0 = time.perf_counter()
        for batches in preloaded[1:]:
            train_step(batches)
        return 0.0, time.perf_counter() - t0

    times: dict[str, list[float]] = {"loader": [], "preloaded": []}
    first_batch: list[float] = []
    for r in range(repeats + 1):  # round 0 is a warm-up; each round runs both, so load hits them alike
        for name, fn in (("loader", with_loader), ("preloaded", with_preloaded)):
            t_first, t_steps = fn()
            if r:
                times[name].append(t_steps)
                if name == "loader":
                    first_batch.append(t_first)
            log(f"  round {r}/{repeats} {name}: {t_steps:.2f} s ({steps} steps)")
    ratios = paired_ratios(times["loader"], times["preloaded"])
    return {
        "steps": steps,
        "batch_size": batch_size,
        "loader_s": times["loader"],
        "preloaded_s": times["preloaded"],
        "first_batch_s": first_batch,
        "step_ms_loader": 1000 * median(times["loader"]) / steps,
        "step_ms_preloaded": 1000 * median(times["preloaded"]) / steps,
        "ratio_of_medians": median(times["loader"]) / median(times["preloaded"]),
        "ratio_per_round": ratios,
        # CPU time of the loader thread per step (all steps, first included) ÷ the pre-loaded step time: the most
        # the loader can add to a step when it has no core of its own; independent of the machine's load.
        "loader_cpu_ms_per_step": 1000 * median(loader_cpu[1:]) / (steps + 1),
        "loader_cpu_over_step": (median(loader_cpu[1:]) / (steps + 1)) / (median(times["preloaded"]) / steps),
    }


# ------------------------------------------------------------------------------------------- shuffle quality


def previous_order(row_groups: list[tuple[int, int]], *, seed: int, epoch: int, window: int = 4):
    """The global order before issue 13 (stage2_student/data.py at c888819): row groups permuted, rows shuffled
    within windows of `window` consecutive row groups."""
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    blocks = [row_groups[i] for i in rng.permutation(len(row_groups))]
    out = []
    for w in range(0, len(blocks), window):
        rows = np.concatenate([np.arange(a, b) for a, b in blocks[w : w + window]])
        out.append(rows[rng.permutation(len(rows))])
    return np.concatenate(out)


def shuffle_quality(batches: list, row_group_rows: int, n: int) -> dict:
    """batches: the global batches of one epoch (arrays of global rows)."""
    import numpy as np

    distinct = [len(set((b // row_group_rows).tolist())) / len(b) for b in batches if len(b)]
    first, last = {}, {}
    step_of = np.empty(n, dtype=np.int64)
    for s, b in enumerate(batches):
        step_of[b] = s
        for g in (b // row_group_rows).tolist():
            first.setdefault(g, s)
            last[g] = s
    spans = np.array([last[g] - first[g] for g in first])
    rank = np.argsort(np.argsort(np.arange(n)))
    rho = float(np.corrcoef(rank, np.argsort(np.argsort(step_of, kind="stable")))[0, 1])
    return {
        "distinct_row_groups_per_batch_over_G": float(np.mean(distinct)),
        "row_group_span_steps_median": float(np.median(spans)),
        "row_group_span_steps_max": int(spans.max()),
        "spearman_stored_position_vs_step": rho,
        "steps": len(batches),
    }


def quality(run_dir: Path, *, global_batch: int, row_group_rows: int, block_rows: int) -> dict:
    import numpy as np

    from stage2_student.data import EpochOrder
    from storage import RunReader

    reader = RunReader(run_dir, verify="none")
    n = len(reader)
    # The bench run's row groups are aligned: every shard holds whole row groups of row_group_rows rows.
    assert all(r % row_group_rows == 0 for r in reader.shard_rows)
    groups = [(a, a + row_group_rows) for a in range(0, n, row_group_rows)]
    old = previous_order(groups, seed=0, epoch=0)
    old_batches = [old[s * global_batch : (s + 1) * global_batch] for s in range(n // global_batch)]
    order = EpochOrder(reader.shard_rows, seed=0, epoch=0, global_batch=global_batch, block_rows=block_rows)
    new_batches = [order.global_batch(s) for s in range(order.steps)]
    assert sorted(np.concatenate(new_batches).tolist()) == list(range(n))
    return {
        "previous (global order, windows of 4 row groups)": shuffle_quality(old_batches, row_group_rows, n),
        "lanes (this version)": shuffle_quality(new_batches, row_group_rows, n),
    }


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    # 48: lanes of 682.7 rows, so lanes start inside blocks and some blocks are cut between two lanes (64 would align
    # every lane with a block and hide that cost).
    ap.add_argument("--global-batch", type=int, default=48)
    ap.add_argument("--row-group-rows", type=int, default=32)
    ap.add_argument("--loop-steps", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    shards, rows = (64, 32) if args.quick else (512, 64)
    seq_len, k, vocab = 128, 8, 512
    block_rows = args.row_group_rows  # one block = one row group, as with the writer's defaults (256 and 256)
    G = args.global_batch
    run_dir = OUT / ("loader_bench_run_quick" if args.quick else "loader_bench_run")
    log(f"run: {shards} shards × {rows} rows × {seq_len} tokens, k = {k}, row groups of {args.row_group_rows} rows")
    make_run(run_dir, shards=shards, rows=rows, seq_len=seq_len, k=k, vocab=vocab, row_group_rows=args.row_group_rows)

    per_world = {}
    table_rows = []
    for world in WORLDS:
        log(f"world {world}: {world} processes, batch {G // world} each")
        ranks = run_world(run_dir, world, G, block_rows)
        decoded = sum(r["rows_decoded"] for r in ranks)
        trained = sum(r["rows_trained"] for r in ranks)
        tok_s = min(r["tokens_per_s"] for r in ranks)
        per_world[world] = {"ranks": ranks, "decoded_over_trained": decoded / trained, "min_tokens_per_s": tok_s}
        table_rows.append(
            [
                world,
                f"{decoded / trained:.3f}",
                f"{max(r['peak_rss_mib'] for r in ranks):,.0f}",
                f"{max(r['peak_rss_mib'] - r['rss_before_mib'] for r in ranks):,.0f}",
                max(r["peak_resident_rows"] for r in ranks),
                max(r["peak_open_shards"] for r in ranks),
                max(r["peak_fds"] for r in ranks),
                f"{tok_s:,.0f}",
                f"{tok_s / SMOLLM2_CPU_TOKENS_PER_S:,.0f}",
            ]
        )
    headers = [
        "processes",
        "rows decoded ÷ trained",
        "peak RSS MiB",
        "RSS added by loading MiB",
        "peak decoded rows held",
        "peak open shards",
        "peak fds",
        "tokens/s per process (min)",
        "÷ SmolLM2 CPU step",
    ]
    print(table(headers, table_rows, title=f"Loader per process, G = {G}, one epoch ({shards * rows:,} rows)"))

    log("loop step time: loader thread vs pre-loaded batches")
    loop = loop_ratio(run_dir, batch_size=G // 8, steps=args.loop_steps, repeats=args.repeats, block_rows=block_rows)
    print(
        table(
            [
                "steps",
                "first batch s",
                "step ms, real loader",
                "step ms, pre-loaded",
                "ratio of medians",
                "per round",
                "loader thread CPU ms / step",
                "÷ step",
            ],
            [
                [
                    loop["steps"],
                    f"{median(loop['first_batch_s']):.3f}",
                    f"{loop['step_ms_loader']:.1f}",
                    f"{loop['step_ms_preloaded']:.1f}",
                    f"{loop['ratio_of_medians']:.3f}",
                    ", ".join(f"{r:.3f}" for r in loop["ratio_per_round"]),
                    f"{loop['loader_cpu_ms_per_step']:.2f}",
                    f"{loop['loader_cpu_over_step']:.4f}",
                ]
            ],
            title=f"Training loop, batch {G // 8}, stand-in model, torch 1 thread",
        )
    )

    q = quality(run_dir, global_batch=G, row_group_rows=args.row_group_rows, block_rows=block_rows)
    print(
        table(
            ["order", "distinct row groups per batch ÷ G", "row-group span (steps), median / max", "Spearman ρ"],
            [
                [
                    name,
                    f"{v['distinct_row_groups_per_batch_over_G']:.3f}",
                    f"{v['row_group_span_steps_median']:.0f} / {v['row_group_span_steps_max']}",
                    f"{v['spearman_stored_position_vs_step']:+.3f}",
                ]
                for name, v in q.items()
            ],
            title="Shuffle quality (one epoch)",
        )
    )
    path = write_json(
        OUT / ("loader_bench_quick.json" if args.quick else "loader_bench.json"),
        {
            "command": " ".join(["python", "bench/loader_bench.py", *sys.argv[1:]]),
            "machine": machine_info(),
            "run": {
                "shards": shards,
                "rows_per_shard": rows,
                "seq_len": seq_len,
                "k": k,
                "row_group_rows": args.row_group_rows,
                "block_rows": block_rows,
            },
            "global_batch": G,
            "smollm2_cpu_tokens_per_s": SMOLLM2_CPU_TOKENS_PER_S,
            "per_world": per_world,
            "loop": loop,
            "shuffle_quality": q,
            "max_rss_kib_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        },
    )
    log(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, run, rank, world, g, block = sys.argv
        print(json.dumps(worker(run, int(rank), int(world), int(g), int(block))))
    else:
        main()
