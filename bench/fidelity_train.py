"""Training outcome of each capture mode against online label annealing (the Fidelity issue's table).

    . .venv/bin/activate
    python bench/fidelity_train.py                   # 2 seeds x (λ=0, online, 8 offline modes), 20 steps each:
                                                     # ~10 min a run on 2 CPU cores, ~3 h in all; resumable
    python bench/fidelity_train.py --seeds 0 --modes topk-32,sample-12 --steps 2 --eval-seqs 2   # smoke, ~6 min
    python bench/fidelity_train.py --seeds 0 --modes sample-32,sample-128 --steps 40 --work bench/out/fid40
                                                     # a longer run: its own work dir, JSON and plot

What one run is
    SmolLM2-135M-Instruct (fp32, CPU) fine-tuned on CHAMP competition math (train split), seq_len 128,
    `--steps` x 4 sequences (one epoch of 4·steps sequences), AdamW lr 3e-4 (3 warm-up steps, constant), clip 1,
    λ = 1, `--loss-form add`. Per training seed the data order is the same for every mode (it is a function of
    the seed only, `stage2_student.data.epoch_order`). Stage 1 runs through `stage1_teacher.run.run` (hf engine,
    fp32) once per mode, and once per seed for the sampled modes (their draws take the seed); stage 2 through
    `stage2_student.train.run`. References: λ = 0 (direct fine-tuning) and online label annealing
    (`teacher_online`: the frozen base in the loop, exact full-vocabulary KL).

What is measured (`stage2_student.evaluate.evaluate_models`, the same held-out sequences for every run)
    target      NLL on held-out CHAMP math (the test split)
    prose       KL(base‖model) per token on Shakespeare (retention)
    code        KL(base‖model) per token on HumanEval's Python (retention)
    recovered   share of online's retention benefit a mode keeps, per seed against that seed's references:
                (KL_λ0 − KL_mode) / (KL_λ0 − KL_online), on prose, on code and on their sum
    B/token     bytes per trained token of the mode's run (`manifest.bytes / trained_tokens`)
    s/step      median wall time of a training step (metrics.jsonl), loading and evaluation excluded

Every finished run appends a line to <work>/rows.jsonl (settings fingerprint, mode, seed, numbers), so a killed
or timed-out bench resumes where it stopped; `--report` only rebuilds the table, JSON and plot from that file.
Writes bench/out/fidelity_train.json (fidelity_train_smoke.json under 20 steps; fidelity_train_<N>steps.json for
other lengths) and docs/fidelity_tradeoff.png (fidelity_tradeoff_<N>steps.png).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import OUT, log, machine_info, table, write_json  # noqa: E402

DEFAULT_MODES = "topk-32,sample-12,hybrid-8+8,topk-16,topk-8,sample-32,hybrid-16+16,topk-128"
LAMBDA0, ONLINE = "λ=0 (direct fine-tuning)", "online (full-vocabulary KL)"
TARGET_SHARE, TARGET_BYTES = 0.95, 40.0


def mode_settings(name: str, seed: int) -> tuple[dict, dict, str]:
    """(TeacherConfig fields, StudentConfig fields, stage-1 run name) of a capture mode; the sampled modes
    draw with the training seed, so each seed sees its own draws."""
    modes = train_modes()
    m = next((x for x in modes if x.name == name), None)
    if m is None:
        raise SystemExit(f"--modes: unknown mode {name!r}; known: {[x.name for x in modes]}")
    c, t, run = m.capture, {"capture": m.kind}, name.replace(" ", "_")
    if m.kind == "topk":
        t["top_k"] = m.width
    elif m.kind == "topp":
        t |= {"top_k": c["max_k"], "top_p": c["top_p"], "min_k": c["min_k"]}
    else:
        t |= {"draws": c["draws"], "seed": seed}
        if m.kind == "hybrid":
            t["top_k"] = c["head_k"]
        run += f"-seed{seed}"
    return t, {"kl_tail": m.loss_tail}, run


def train_modes() -> list:
    """The gradient-fidelity bench's mode table (shared), plus more draws for the longer runs of issue 20."""
    import dataclasses

    from fidelity_bench import all_modes

    modes = all_modes()
    s32 = next(m for m in modes if m.name == "sample-32")
    extra = [
        dataclasses.replace(s32, name=f"sample-{n}", capture={**s32.capture, "draws": n}, width=n) for n in (64, 128)
    ]
    return modes + extra


def settings_key(args) -> dict:
    return {
        "steps": args.steps,
        "batch_size": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "eval_sequences": args.eval_seqs,
        "kl_weight": 1.0,
        "version": 2,
    }


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def load_rows(path: Path, fp: str) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-append: that run is simply redone
            log(f"[train] {path}:{n}: unreadable line skipped")
            continue
        if r.get("fingerprint") == fp:
            rows.append(r)
    return rows


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def median_step_s(out_dir: Path) -> float | None:
    p = out_dir / "metrics.jsonl"
    if not p.exists():
        return None
    xs = [json.loads(x).get("step_s") for x in p.read_text().splitlines() if x.strip()]
    xs = [x for x in xs if x]
    return statistics.median(xs[1:] if len(xs) > 2 else xs) if xs else None  # the first step warms up


def run_all(args) -> list[dict]:
    import torch

    from demo import assets
    from stage1_teacher.config import TeacherConfig
    from stage1_teacher.run import run as run_teacher
    from stage2_student.config import StudentConfig
    from stage2_student.evaluate import evaluate_models
    from stage2_student.train import run as run_student
    from storage import load_manifest

    torch.set_num_threads(args.threads)
    settings = settings_key(args)
    fp = fingerprint(settings)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"
    done = {(r["label"], r["seed"]) for r in load_rows(rows_path, fp)}
    model = assets.smollm2_path()
    data = work / "data"
    files = {
        "train": data / "math_train.jsonl",
        "target": data / "math_test.jsonl",
        "prose": data / "prose.jsonl",
        "code": data / "code.jsonl",
    }
    if not all(p.exists() for p in files.values()):
        assets.write_jsonl(assets.champ_docs(split="train"), files["train"])
        assets.write_jsonl(assets.champ_docs(split="test"), files["target"])
        assets.write_jsonl(assets.shakespeare_docs(max_chars=400_000), files["prose"])
        assets.write_jsonl(assets.humaneval_docs(), files["code"])
    corpora = {k: files[k] for k in ("target", "prose", "code")}
    n_seq = args.steps * args.batch

    def teacher(run_name: str, tcfg: dict) -> Path:
        run_dir = work / f"runs-{fp}" / run_name
        if not (run_dir / "manifest.json").exists():
            t0 = time.perf_counter()
            s = run_teacher(
                TeacherConfig(
                    model=str(model),
                    data=str(files["train"]),
                    out=run_dir,
                    seq_len=args.seq_len,
                    max_samples=n_seq,
                    num_shards=1,
                    batch_size=8,
                    engine="hf",
                    dtype="float32",
                    device="cpu",
                    **tcfg,
                )
            )
            log(
                f"[train] stage 1 {run_name}: {s['run']['bytes_per_trained_token']:.1f} B/trained token, "
                f"{time.perf_counter() - t0:.0f} s"
            )
        return run_dir

    for seed in args.seeds:
        plan = [(LAMBDA0, "topk-32", {"kl_weight": 0.0}), (ONLINE, "topk-32", {"teacher_online": str(model)})]
        plan += [(m, m, {}) for m in args.modes]
        for label, mode, extra in plan:
            if (label, seed) in done:
                continue
            tcfg, scfg, run_name = mode_settings(mode, seed)
            run_dir = teacher(run_name, tcfg)
            out_dir = work / "students" / f"{label.split(' ')[0]}-seed{seed}"
            shutil.rmtree(out_dir, ignore_errors=True)
            t0 = time.perf_counter()
            s = run_student(
                StudentConfig(
                    run_dir=run_dir,
                    out=out_dir,
                    max_steps=args.steps,
                    batch_size=args.batch,
                    lr=args.lr,
                    warmup_steps=3,
                    lr_schedule="constant",
                    max_grad_norm=1.0,
                    seed=seed,
                    verify="size",
                    **{"kl_weight": 1.0, **scfg, **extra},
                )
            )
            train_s = time.perf_counter() - t0
            ev = evaluate_models(
                {label: s["model_dir"]},
                str(model),
                corpora,
                seq_len=args.seq_len,
                batch_size=8,
                max_sequences=args.eval_seqs,
                device="cpu",
                dtype="fp32",
            )[label]["corpora"]
            shutil.rmtree(out_dir / "model", ignore_errors=True)  # 540 MB each: keep config and metrics only
            man = load_manifest(run_dir)
            row = {
                "fingerprint": fp,
                "settings": settings,
                "label": label,
                "mode": mode,
                "seed": seed,
                "bytes_per_trained_token": None if label in (LAMBDA0, ONLINE) else man.bytes / man.trained_tokens,
                "target_nll": ev["target"]["nll"],
                "prose_kl": ev["prose"]["kl"],
                "code_kl": ev["code"]["kl"],
                "prose_nll": ev["prose"]["nll"],
                "code_nll": ev["code"]["nll"],
                "train_s": train_s,
                "step_s": median_step_s(out_dir),
                "final": s["final"],
                "machine": machine_info(),
            }
            append_row(rows_path, row)
            log(
                f"[train] seed {seed} {label}: target NLL {row['target_nll']:.3f}, KL prose {row['prose_kl']:.4f}, "
                f"code {row['code_kl']:.4f}, {train_s:.0f} s"
            )
    return load_rows(rows_path, fp)


def _share(kl0: float, klon: float, kl: float) -> float | None:
    return (kl0 - kl) / (kl0 - klon) if abs(kl0 - klon) > 1e-12 else None


def summarize(rows: list[dict]) -> list[dict]:
    """One line per method: means over seeds, and the recovered shares per seed against that seed's
    references (a seed without both references gives no share)."""
    by_seed = {}
    for r in rows:
        by_seed.setdefault(r["seed"], {})[r["label"]] = r
    out = []
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        rs = [by_seed[s][label] for s in sorted(by_seed) if label in by_seed[s]]
        shares = {"prose": [], "code": [], "both": []}
        d_target = []
        for r in rs:
            ref = by_seed[r["seed"]]
            if LAMBDA0 in ref and ONLINE in ref:
                z, o = ref[LAMBDA0], ref[ONLINE]
                for key in ("prose", "code"):
                    shares[key].append(_share(z[f"{key}_kl"], o[f"{key}_kl"], r[f"{key}_kl"]))
                shares["both"].append(
                    _share(z["prose_kl"] + z["code_kl"], o["prose_kl"] + o["code_kl"], r["prose_kl"] + r["code_kl"])
                )
                d_target.append(r["target_nll"] - o["target_nll"])

        def mean(key, rs=rs):
            return statistics.fmean(r[key] for r in rs)

        steps = [r["step_s"] for r in rs if r.get("step_s")]
        out.append(
            {
                "label": label,
                "mode": rs[0]["mode"],
                "seeds": [r["seed"] for r in rs],
                "bytes_per_trained_token": rs[0]["bytes_per_trained_token"],
                "target_nll": mean("target_nll"),
                "prose_kl": mean("prose_kl"),
                "code_kl": mean("code_kl"),
                "prose_nll": mean("prose_nll"),
                "code_nll": mean("code_nll"),
                "target_nll_minus_online": d_target,
                "step_s": statistics.median(steps) if steps else None,
                "recovered": {k: [x for x in v if x is not None] for k, v in shares.items()},
            }
        )
    return out


def _range(xs: list[float]) -> str:
    if not xs:
        return "—"
    m = statistics.fmean(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def report(rows: list[dict], settings: dict, wall: float | None, smoke: bool) -> dict:
    summary = summarize(rows)
    online_step = next((s["step_s"] for s in summary if s["label"] == ONLINE), None)
    plain_step = next((s["step_s"] for s in summary if s["label"] == LAMBDA0), None)
    hdr = [
        "method",
        "B/trained token",
        "target NLL",
        "Δ target vs online (per seed)",
        "KL prose",
        "KL code",
        "recovered: prose",
        "recovered: code",
        "recovered: both",
    ]
    tab = table(
        hdr,
        [
            [
                s["label"],
                "—" if s["bytes_per_trained_token"] is None else f"{s['bytes_per_trained_token']:.1f}",
                f"{s['target_nll']:.3f}",
                " ".join(f"{d:+.3f}" for d in s["target_nll_minus_online"]) or "—",
                f"{s['prose_kl']:.4f}",
                f"{s['code_kl']:.4f}",
                _range(s["recovered"]["prose"]),
                _range(s["recovered"]["code"]),
                _range(s["recovered"]["both"]),
            ]
            for s in sorted(summary, key=lambda s: (s["bytes_per_trained_token"] or 0, s["label"]))
        ],
    )
    print(f"\n## Training outcome (λ=1; seeds {sorted({r['seed'] for r in rows})}; mean [min, max] over seeds)\n")
    print(tab)
    best = [
        s
        for s in summary
        if s["bytes_per_trained_token"] and s["bytes_per_trained_token"] <= TARGET_BYTES and s["recovered"]["both"]
    ]
    verdict = None
    if best:
        b = max(best, key=lambda s: statistics.fmean(s["recovered"]["both"]))
        share = statistics.fmean(b["recovered"]["both"])
        verdict = (
            f"best mode at <= {TARGET_BYTES:.0f} B/trained token: {b['label']} "
            f"({b['bytes_per_trained_token']:.1f} B, recovers {share:.0%} of online's retention benefit; "
            f"target {'met' if share >= TARGET_SHARE else 'missed'}: >= {TARGET_SHARE:.0%})"
        )
        print("\n" + verdict)
    if online_step and plain_step:  # wall time as the bench ran: indicative only on a shared machine
        print(
            f"online teacher step time ÷ λ=0 step time (median wall time; indicative only where other work "
            f"shared the machine, the controlled ratios are bench/student_bench.py's): {online_step / plain_step:.2f}"
        )
    out = {
        "bench": "fidelity_train",
        "smoke": smoke,
        "wall_s": wall,
        "settings": settings,
        "machine": rows[-1]["machine"] if rows else machine_info(),
        "summary": summary,
        "rows": rows,
        "verdict": verdict,
        "table": tab,
    }
    dest = OUT / out_name(settings["steps"], smoke)
    write_json(dest, out)
    log(f"[train] wrote {dest}")
    if not smoke:
        steps = settings["steps"]
        plot(
            summary, ROOT / "docs" / ("fidelity_tradeoff.png" if steps == 20 else f"fidelity_tradeoff_{steps}steps.png")
        )
    return out


def out_name(steps: int, smoke: bool) -> str:
    """The JSON of a run length: fidelity_train.json for the 20-step table, fidelity_train_<N>steps.json for others
    (so a longer run never overwrites the 20-step record), fidelity_train_smoke.json under 20 steps."""
    if smoke:
        return "fidelity_train_smoke.json"
    return "fidelity_train.json" if steps == 20 else f"fidelity_train_{steps}steps.json"


def plot(summary: list[dict], dest: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        log("[train] matplotlib not installed (pip install -e '.[plot]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    for s in summary:
        xs = s["recovered"]["both"]
        if s["bytes_per_trained_token"] is None or not xs:
            continue
        m = statistics.fmean(xs)
        kind = s["mode"].split("-")[0]
        color = {"topk": "tab:blue", "sample": "tab:orange", "hybrid": "tab:green"}.get(kind, "tab:gray")
        ax.errorbar(
            [s["bytes_per_trained_token"]], [m], yerr=[[m - min(xs)], [max(xs) - m]], fmt="o", color=color, capsize=3
        )
        ax.annotate(
            s["label"], (s["bytes_per_trained_token"], m), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="online label annealing")
    ax.axhline(TARGET_SHARE, color="tab:red", lw=0.8, ls="--", label=f"target {TARGET_SHARE:.0%}")
    ax.axvline(TARGET_BYTES, color="tab:red", lw=0.8, ls="--")
    ax.axhline(0.0, color="gray", lw=0.8, label="direct fine-tuning (λ=0)")
    ax.set_xscale("log")
    ticks = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("bytes per trained token (log scale)")
    ax.set_ylabel("share of online's retention benefit\n(prose + code KL; mean, min–max over seeds)")
    ax.set_title("Offline capture modes vs online label annealing (SmolLM2-135M, math fine-tune, λ=1)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, dest)
    log(f"[train] wrote {dest}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="training seeds (comma-separated)")
    ap.add_argument("--modes", default=DEFAULT_MODES, help="offline capture modes (names from fidelity_bench.py)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--work",
        default=str(OUT / "fidelity_work"),
        help="runs, student metrics and rows.jsonl; rerunning with the same settings resumes",
    )
    ap.add_argument("--report", action="store_true", help="only rebuild the table, JSON and plot from rows.jsonl")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        mode_settings(m, 0)  # unknown names fail before any work
    t0 = time.perf_counter()
    settings = settings_key(args)
    if args.report:
        rows = load_rows(Path(args.work) / "rows.jsonl", fingerprint(settings))
        if not rows:
            raise SystemExit(f"--report: no rows for these settings in {args.work}/rows.jsonl")
        wall = None  # keep the wall time of the run that produced the rows, if its JSON is there
        prev = OUT / out_name(args.steps, args.steps < 20)
        if prev.exists():
            try:
                old = json.loads(prev.read_text())
                wall = old.get("wall_s") if old.get("settings") == settings else None
            except json.JSONDecodeError:
                pass
    else:
        rows = run_all(args)
        wall = time.perf_counter() - t0
    report(rows, settings, wall, smoke=args.steps < 20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
