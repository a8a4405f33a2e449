"""Experiment trackers for `pipeline student --report-to tensorboard|wandb|mlflow|none`, through accelerate's.

    pipeline student --run-dir runs/r1 --out out/lam1 --report-to tensorboard
    tensorboard --logdir out/lam1/trackers

The same numbers as metrics.jsonl (one call per written line, at its step), flattened to `train/ce`, `train/kl`,
... and `eval/NAME/nll`, `eval/NAME/kl` for `--eval-data` (stage2_student/live_eval.py). Local trackers write
under OUT/trackers (TensorBoard event files in OUT/trackers/PROJECT; W&B's offline files in OUT/trackers/wandb
when WANDB_MODE=offline); MLflow follows MLFLOW_TRACKING_URI as usual (default ./mlruns). Credentials come from
each tool's own environment (WANDB_API_KEY, ...) and never enter config.json. Only the main process reports.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# --report-to name -> (the module it needs, the pip package that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def parse_report_to(value: str) -> list[str]:
    """The tracker names of --report-to ("none" -> []); a ValueError naming the option on an unknown name."""
    names = [s.strip() for s in str(value).split(",") if s.strip()]
    if names == ["none"] or not names:
        return []
    bad = [n for n in names if n not in TRACKERS]
    if bad or "none" in names:
        raise ValueError(
            f"--report-to {value!r}: choose tensorboard, wandb, mlflow or none (comma-separated for several, "
            f"e.g. tensorboard,wandb)"
        )
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """ValueError before any work starts when a tracker's package is missing."""
    missing = [n for n in names if importlib.util.find_spec(TRACKERS[n][0]) is None]
    if missing:
        pkgs = " ".join(TRACKERS[n][1] for n in missing)
        raise ValueError(f"--report-to {','.join(missing)} needs its package: pip install {pkgs}")


def logging_dir(out: Path) -> Path:
    return Path(out) / "trackers"


def accelerator_kwargs(report_to: str, out: Path) -> dict:
    """Keyword arguments for `Accelerator(...)`: log_with and the project folder (empty for none)."""
    names = parse_report_to(report_to)
    if not names:
        return {}
    check_installed(names)
    return {"log_with": names, "project_dir": str(logging_dir(out))}


def start(acc, report_to: str, project: str, config: dict, out: Path) -> None:
    """`init_trackers` with the run's settings as hyper-parameters (scalars only, as TensorBoard wants them)."""
    names = parse_report_to(report_to)
    if not names:
        return
    init_kwargs = {}
    if "wandb" in names:
        d = logging_dir(out)
        d.mkdir(parents=True, exist_ok=True)
        init_kwargs["wandb"] = {"dir": str(d), "name": Path(out).name}
    if "mlflow" in names:
        init_kwargs["mlflow"] = {"run_name": Path(out).name}
    acc.init_trackers(project, config=hparams(config), init_kwargs=init_kwargs)


def hparams(config: dict) -> dict:
    """config.json's values as int / float / str / bool (None -> "", lists joined by commas)."""
    out = {}
    for k, v in config.items():
        if v is None:
            v = ""
        elif isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        elif isinstance(v, os.PathLike):
            v = os.fspath(v)
        elif not isinstance(v, (int, float, str, bool)):
            v = str(v)
        out[k] = v
    return out


def flatten(metrics: dict) -> dict:
    """One metrics.jsonl line -> tracker scalars: {"train/ce": ..., "eval/NAME/nll": ...} (numbers only)."""
    flat = {}
    for k, v in metrics.items():
        if k == "eval":
            for name, m in v.items():
                for mk, mv in m.items():
                    if isinstance(mv, (int, float)) and not isinstance(mv, bool) and mv is not None:
                        flat[f"eval/{name}/{mk}"] = mv
        elif k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[f"train/{k}"] = v
    return flat


def log(acc, report_to: str, metrics: dict) -> None:
    if parse_report_to(report_to):
        acc.log(flatten(metrics), step=metrics["step"])


def finish(acc, report_to: str) -> None:
    """Close the trackers (flush TensorBoard, end the W&B / MLflow run). Not `acc.end_training()`: that also
    destroys the process group, which the rest of `train.run` (and a sweep's next student) still uses."""
    if parse_report_to(report_to):
        for tracker in acc.trackers:
            tracker.finish()
        acc.trackers.clear()
