"""`pipeline sweep`: many students from one capture, then eval, a trade-off table and plot.

    pipeline sweep --run-dir runs/r1 --out sweeps/s1 --kl-weights 0,0.3,1,3 --lrs 3e-4,1e-4 \\
        --l2-inits 0.1 --merge-alphas 0.5 --eval-data target=math_test.jsonl --eval-data retention=prose.jsonl

Every student reads the same stored labels; the teacher is loaded only as the base of the evaluation.
Each configuration trains into OUT/runs/NAME; one whose model already exists is skipped, so an
interrupted sweep resumes. The first --eval-data entry named `target` (or the first entry) is the
target; the others measure retention.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from storage.atomic import atomic_write_json
from storage.manifest import load_manifest

from . import train
from .config import StudentConfig, SweepConfig, parse_data, parse_floats
from .evaluate import evaluate_models
from .merge import merge_models

log = logging.getLogger(__name__)


def run(config: SweepConfig) -> dict:
    spec = load_manifest(config.run_dir).spec
    base_name = config.student.get("model") or spec.teacher["name_or_path"]
    base_gguf = config.student.get("gguf_file") if config.student.get("model") else spec.teacher.get("gguf_file")
    plan = [
        (name, StudentConfig(run_dir=config.run_dir, out=config.out / "runs" / name, **overrides), desc)
        for name, overrides, desc in config.plan()
    ]
    # Every student's options against the run's capture mode, before the first one trains.
    problems = list(dict.fromkeys(p for _, student, _ in plan for p in student.run_problems(spec.capture)))
    if problems:
        raise ValueError(f"invalid sweep for the run in {config.run_dir}:\n  " + "\n  ".join(problems))
    config.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {"base": {"method": "base", "model": base_name}}
    models: dict[str, str] = {}
    for name, student, desc in plan:
        out = student.out
        if (out / "model" / "config.json").exists():
            log.info("sweep: %s already trained, skipping", name)
        else:
            resume = (out / "checkpoints").exists()
            # The sweep's own folder: one without checkpoints (killed before the first) is started over.
            summary = train.run(student.replace(resume=resume, overwrite=not resume and out.exists()))
            log.info(train.summary_line(summary))
        models[name] = str(out / "model")
        rows[name] = {**desc, "model": str(out / "model")}
    several = config.seeds not in (None, "")
    merges = [
        (alpha, lr, seed)
        for alpha in parse_floats(config.merge_alphas, "merge_alphas")
        for lr in parse_floats(config.lrs, "lrs")
        or [config.student.get("lr", StudentConfig.__dataclass_fields__["lr"].default)]
        for seed in config.seed_list()
    ]
    for alpha, lr, seed in merges:
        tail = f"_seed{seed}" if several else ""
        tuned = config.out / "runs" / f"kl0_lr{lr:g}{tail}" / "model"
        name = f"merge_{alpha:g}_lr{lr:g}{tail}"
        out = config.out / "runs" / name / "model"
        if not (out / "config.json").exists():
            if base_gguf:
                raise ValueError(
                    "merging needs the base as a Hugging Face folder, not a GGUF file; convert it "
                    "first (see demo.assets.smollm2_path for an example)"
                )
            merge_models(base_name, str(tuned), alpha, out)
        models[name] = str(out)
        rows[name] = {"method": "WiSE-FT merge", "alpha": alpha, "lr": lr, "model": str(out)}
        if several:
            rows[name].update(seed=seed, config=name[: -len(tail)])

    result = {
        "config": {
            **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
            "run_dir": str(config.run_dir),
            "out": str(config.out),
        },
        "rows": rows,
    }
    if config.eval_data:
        corpora, _ = parse_data(config.eval_data)
        scores = evaluate_models(
            {"base": base_name, **models},
            base_name,
            corpora,
            seq_len=config.eval_seq_len,
            max_sequences=config.eval_max_sequences,
            gguf_files={"base": base_gguf} if base_gguf else None,
            base_gguf_file=base_gguf,
        )
        target = "target" if "target" in corpora else next(iter(corpora))
        for name, sc in scores.items():
            rows[name]["eval"] = sc["corpora"]
        result["target"] = target
        result["table"] = tradeoff_table(rows, target)
        (config.out / "sweep.md").write_text(format_markdown(result["table"], target) + "\n")
        try:
            plot_tradeoff(result["table"], target, config.out / "tradeoff.png")
            result["plot"] = str(config.out / "tradeoff.png")
        except ImportError:
            log.warning("matplotlib is not installed: no tradeoff.png (pip install 'label-anneal[plot]')")
    atomic_write_json(config.out / "sweep.json", result)
    return result


def tradeoff_table(rows: dict, target: str) -> list[dict]:
    """One line per configuration: target NLL gain over the base and, per retention corpus, the NLL increase and KL.
    Rows of one configuration trained with several seeds (their `config` key) become one line: the means, with
    `seeds` (their number) and `*_std` (the sample standard deviation of target_gain and each *_forgetting)."""
    lines = _tradeoff_lines(rows, target)
    groups: dict[str, list[dict]] = {}
    for line, r in zip(lines, rows.values()):
        groups.setdefault(r.get("config", line["name"]), []).append(line)
    table = []
    for name, ls in groups.items():
        if len(ls) == 1 and "config" not in rows[ls[0]["name"]]:
            table.append(ls[0])
            continue
        agg = {**ls[0], "name": name, "seeds": len(ls)}
        for k, v in ls[0].items():
            if isinstance(v, float) and k != "lr":
                vals = [l[k] for l in ls if l.get(k) is not None]
                agg[k] = sum(vals) / len(vals) if vals else None
                if (k == "target_gain" or k.endswith("_forgetting")) and len(vals) > 1:
                    mean = agg[k]
                    agg[f"{k}_std"] = (sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)) ** 0.5
        table.append(agg)
    return table


def _tradeoff_lines(rows: dict, target: str) -> list[dict]:
    base = rows["base"]["eval"]
    table = []
    for name, r in rows.items():
        ev = r["eval"]
        line = {
            "name": name,
            "method": r["method"],
            "lr": r.get("lr"),
            "knob": next(
                (f"{k}={r[k]:g}" for k in ("kl_weight", "l2_init", "ewc", "replay_ratio", "alpha") if k in r), ""
            ),
            "target_nll": ev[target]["nll"],
            "target_gain": base[target]["nll"] - ev[target]["nll"],
        }
        for c, v in ev.items():
            if c == target:
                continue
            line[f"{c}_nll"] = v["nll"]
            line[f"{c}_forgetting"] = v["nll"] - base[c]["nll"]
            line[f"{c}_kl"] = v.get("kl")
        table.append(line)
    return table


def format_markdown(table: list[dict], target: str) -> str:
    ret = sorted({k[:-4] for line in table for k in line if k.endswith("_nll") and k != "target_nll"})
    head = ["model", "method", "knob", "lr", f"{target} NLL", "gain"]
    if any("seeds" in l for l in table):
        head[0] = "model (mean ± std over seeds)"
    for c in ret:
        head += [f"{c} NLL", f"{c} ΔNLL", f"{c} KL"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for l in table:
        cells = [
            l["name"],
            l["method"],
            l["knob"],
            "" if l["lr"] is None else f"{l['lr']:g}",
            f"{l['target_nll']:.3f}",
            f"{l['target_gain']:+.3f}" + _pm(l.get("target_gain_std")),
        ]
        for c in ret:
            kl = l.get(f"{c}_kl")
            cells += [
                f"{l[f'{c}_nll']:.3f}",
                f"{l[f'{c}_forgetting']:+.3f}" + _pm(l.get(f"{c}_forgetting_std")),
                "-" if kl is None else f"{kl:.3f}",
            ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _pm(std) -> str:
    """ " ± 0.012" for a std over seeds, "" without one."""
    return "" if std is None else f" ± {std:.3f}"


def plot_tradeoff(table: list[dict], target: str, path: Path) -> None:
    """tradeoff.png: `tradeoff_figure` saved."""
    import matplotlib  # optional extra [plot]; run() catches the ImportError

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(table, target)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tradeoff_figure(table: list[dict], target: str):
    """Target gain (up is better) against forgetting on each retention corpus (left is better).

    Labels cannot overlap: they are not placed at their points but in one column right of each panel, in the order
    of their points' heights, one text line apart (the figure grows with the number of labels), each joined to its
    point by a thin leader line. Rows with `*_std` values (several seeds) get error bars of ± one std."""
    import matplotlib  # optional extra [plot]; run() catches the ImportError

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ret = sorted({k[:-11] for l in table for k in l if k.endswith("_forgetting")})
    labelled = [l for l in table if l["knob"]]
    fontsize = 7
    line_in = fontsize * 1.6 / 72  # one label line, in inches, with a gap
    height = max(4.5, 1.6 + line_in * (len(labelled) + 1))
    fig, axes = plt.subplots(1, max(1, len(ret)), figsize=(8 * max(1, len(ret)), height), squeeze=False)
    for ax, c in zip(axes[0], ret or [None]):
        groups: dict[str, list[dict]] = {}
        for l in table:
            # λ = 0 and λ > 0 at one lr form one curve: the picture of the label-annealing paper.
            family = "λ sweep" if l["method"] in ("direct fine-tuning", "label annealing") else l["method"]
            groups.setdefault(family + (f" (lr {l['lr']:g})" if l["lr"] is not None else ""), []).append(l)
        points = []
        for label, ls in groups.items():
            xs = [l.get(f"{c}_forgetting", 0.0) for l in ls]
            ys = [l["target_gain"] for l in ls]
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            (line,) = ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", label=label)
            xerr = [l.get(f"{c}_forgetting_std") for l in ls]
            yerr = [l.get("target_gain_std") for l in ls]
            if any(e is not None for e in xerr + yerr):
                ax.errorbar(
                    xs,
                    ys,
                    xerr=[e or 0.0 for e in xerr],
                    yerr=[e or 0.0 for e in yerr],
                    fmt="none",
                    ecolor=line.get_color(),
                    elinewidth=0.8,
                    capsize=2,
                )
            points += [(x, y, l) for x, y, l in zip(xs, ys, ls) if l["knob"]]
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel(f"forgetting: {c} NLL increase over base (nats/token)")
        ax.set_ylabel(f"gain: {target} NLL decrease (nats/token)")
        ax.set_title(f"{target} gain vs {c} forgetting")
        ax.legend(fontsize=7, loc="best")
        # The label column: top to bottom in the order of the points' heights, evenly spaced in axes fraction.
        points.sort(key=lambda p: -p[1])
        n = len(points)
        for i, (x, y, l) in enumerate(points):
            text = l["knob"] + (f", lr {l['lr']:g}" if l["lr"] is not None else "")
            ax.annotate(
                text,
                (x, y),
                xytext=(1.03, 1 - (i + 1) / (n + 1)),
                textcoords="axes fraction",
                va="center",
                fontsize=fontsize,
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey", "shrinkA": 0, "shrinkB": 3},
                annotation_clip=False,
            )
    fig.tight_layout()
    return fig
