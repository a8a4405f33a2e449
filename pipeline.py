"""label-anneal command line: `pipeline teacher | student | sweep | eval | merge | inspect | demo`.

Each command parses its options into its stage's config dataclass and calls that stage's
`run(config)`; the same dataclasses are the Python API. Every command takes `--config FILE`
(TOML) whose keys are the option names (dashes or underscores); flags given on the command
line win; an unknown key is an error.

    pipeline inspect RUN_DIR [--json]
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import re
import types
import typing
from pathlib import Path

import click
import tomllib


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    if not value:
        return value
    try:
        data = tomllib.loads(Path(value).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"{value}: no such file", param=param) from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: not valid TOML ({e})", param=param) from None
    known = {p.name for p in ctx.command.params if p.name != "config"}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown key(s) {unknown}; valid keys: {sorted(known)}", param=param)
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def config_option(f):
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        callback=_load_config,
        is_eager=True,
        expose_value=False,
        help="TOML file whose keys are this command's option names.",
    )(f)


class LocationType(click.ParamType):
    """A run directory: a local path or a URI (s3://, gs://, hdfs://, ...; storage.fs). A bad URI is refused here,
    before anything runs; `exists`: a local path must be an existing directory (as click.Path(exists=True))."""

    name = "path|uri"

    def __init__(self, exists: bool = False):
        self.exists = exists

    def convert(self, value, param, ctx):
        from storage.fs import LocationError, RemotePath, location

        if isinstance(value, (Path, RemotePath)):
            return value
        try:
            loc = location(value)
        except LocationError as e:
            self.fail(str(e), param, ctx)
        if self.exists and isinstance(loc, Path) and not loc.is_dir():
            self.fail(f"Directory '{value}' does not exist.", param, ctx)
        return loc


def _click_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if any(getattr(a, "__name__", "") == "RemotePath" for a in args):  # a run directory: path or URI
        return LocationType()
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and args else hint
    return {int: int, float: float, str: str, Path: click.Path(path_type=Path), bool: bool}.get(base, str)


def options_from(config_cls, *, skip: tuple[str, ...] = ()):
    """One click option per field of a stage's config dataclass, with the field's help text. Defaults
    stay in the dataclass: an option left unset is not passed, so the CLI and the Python API agree."""
    hints = typing.get_type_hints(config_cls)

    def deco(f):
        for fld in reversed(dataclasses.fields(config_cls)):
            if fld.name in skip or not fld.init:
                continue
            name = "--" + fld.name.replace("_", "-")
            help_ = fld.metadata.get("help", "")
            if fld.default is not dataclasses.MISSING:  # `default_text`: what an unset (None) option stands for
                help_ += f"  [default: {fld.metadata.get('default_text', fld.default)}]"
            else:
                help_ += "  [required]"
            if hints[fld.name] is bool:
                opt = click.option(f"{name}/--no-{name[2:]}", fld.name, default=None, help=help_)
            elif (
                typing.get_origin(hints[fld.name]) is tuple
            ):  # a repeatable option, e.g. --eval-data A=x --eval-data B=y
                opt = click.option(name, fld.name, multiple=True, metavar=fld.metadata.get("metavar"), help=help_)
            else:
                opt = click.option(name, fld.name, type=_click_type(hints[fld.name]), default=None, help=help_)
            f = opt(f)
        return f

    return deco


def build_config(config_cls, params: dict):
    """The config from the options actually given; missing required options named together."""
    given = {k: v for k, v in params.items() if v is not None}
    missing = [
        f"--{f.name.replace('_', '-')}"
        for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in given
    ]
    if missing:
        raise click.UsageError(f"missing option(s): {', '.join(missing)}")
    try:
        return config_cls(**given)
    except ValueError as e:
        raise click.UsageError(as_options(str(e), config_cls)) from None


def as_options(message: str, *config_classes) -> str:
    """A message from a stage, with the config fields it names spelled as the options a user types: `kl_weight=2`
    -> `--kl-weight 2`, `train_on_prompt=True` -> `--train-on-prompt`, `max_steps` -> `--max-steps`. Paths and
    dotted names (`/runs/kl_weight/`, `capture.top_k`) are left alone."""
    names = {f.name for c in config_classes for f in dataclasses.fields(c)}
    for name in sorted(names, key=len, reverse=True):
        opt = "--" + name.replace("_", "-")
        lead = rf"(?<![\w./-]){re.escape(name)}"
        message = re.sub(lead + r"=True\b", opt, message)
        message = re.sub(lead + r"=False\b", "--no-" + opt[2:], message)
        message = re.sub(lead + r"=(?=\S)", opt + " ", message)
        if "_" in name:
            message = re.sub(lead + r"(?![\w/-]|\.\w)", opt, message)
    return message


def _os_error_message(e: OSError) -> str:
    """One line for an OSError: the path, the reason, what to do."""
    if e.filename is None or not e.strerror:
        return str(e)
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    advice = {
        errno.EROFS: "the filesystem is read-only: choose an --out on a writable filesystem",
        errno.EACCES: "permission denied: choose an --out you can write to, or fix its permissions",
        errno.EPERM: "operation not permitted: choose an --out you can write to, or fix its permissions",
        errno.ENOSPC: "free space on that filesystem, then run the same command again",
        errno.EDQUOT: "disk quota exceeded: free space, then run the same command again",
        errno.ENOENT: "no such file or directory: check the path",
    }.get(e.errno, "fix the cause, then run the same command again")
    return f"{where}: {e.strerror}; {advice}"


@contextlib.contextmanager
def cli_errors(*config_classes):
    """Errors of a stage -> one click error message (no traceback), naming options as the user types them."""
    from storage.errors import StorageError

    try:
        yield
    except click.ClickException:
        raise
    except OSError as e:
        raise click.ClickException(as_options(_os_error_message(e), *config_classes)) from None
    except (StorageError, ValueError, ImportError) as e:
        raise click.ClickException(as_options(str(e), *config_classes)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int):
    """Offline label annealing: capture a frozen teacher's soft labels once (by default 32 sampled draws per
    position with the hf engine; top-k log-probs with vLLM or --capture topk), fine-tune against them without
    forgetting."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@cli.command()
@click.argument("run_dir", type=LocationType(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(run_dir: Path, as_json: bool):
    """Show what a run directory holds: capture mode and what each position stores (sampled draws or top-k),
    shards, rows, trained tokens, bytes per trained token."""
    from storage.errors import StorageError
    from storage.inspect_run import format_table, summarize

    try:
        info = summarize(run_dir)
    except StorageError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(info, indent=2) if as_json else format_table(info))


@cli.command()
@config_option
@options_from(__import__("stage1_teacher.config", fromlist=["TeacherConfig"]).TeacherConfig)
@click.option(
    "--finalize",
    "finalize_dir",
    type=LocationType(),
    default=None,
    help="Only check that every shard of RUN_DIR (a path or a URI) is present and write its manifest.",
)
def teacher(finalize_dir: Path | None, **params):
    """Stage 1: score a corpus with the frozen teacher and store its soft labels as shards: by default N sampled
    draws per trained position (distinct ids with counts; hf engine), or the top-k log-probs + tail mass (--capture
    topk, the vLLM default), topp or hybrid."""
    from stage1_teacher.config import TeacherConfig
    from stage1_teacher.run import run
    from stage1_teacher.shards import finalize, summary_line

    with cli_errors(TeacherConfig):
        if finalize_dir is not None:
            info = finalize(finalize_dir)
            click.echo(
                f"finalized {info['rows']:,} rows, {info['trained_tokens']:,} trained tokens, "
                f"{info['bytes_per_trained_token']:.1f} B/trained token -> {finalize_dir}"
            )
            return
        summary = run(build_config(TeacherConfig, params))
    click.echo(summary_line(summary))


@cli.command()
@config_option
@options_from(__import__("stage2_student.config", fromlist=["StudentConfig"]).StudentConfig)
def student(**params):
    """Stage 2: train the student on the stored labels: CE + λ·KL(teacher‖student). The teacher is not run during
    training (with --eval-data it is run once at the start, over the eval sets, then freed)."""
    from stage2_student.config import StudentConfig
    from stage2_student.train import run, summary_line

    with cli_errors(StudentConfig):
        summary = run(build_config(StudentConfig, params))
    click.echo(summary_line(summary))


@cli.command("eval")
@config_option
@options_from(__import__("stage2_student.config", fromlist=["EvalConfig"]).EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
def eval_(as_json: bool, **params):
    """Per-token NLL, perplexity, bits per byte and KL(base‖model) of a model on named corpora (+ optional lm-eval
    tasks). --convention says which tokens are scored: packed (training's, the default) or lm-eval's."""
    from stage2_student.config import EvalConfig
    from stage2_student.evaluate import format_table, run

    with cli_errors(EvalConfig):
        result = run(build_config(EvalConfig, params))
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@cli.command()
@config_option
@options_from(__import__("stage2_student.config", fromlist=["MergeConfig"]).MergeConfig)
def merge(**params):
    """Interpolate weights: (1−α)·base + α·tuned (WiSE-FT; α > 1 extrapolates, ExPO). Same architecture and
    tokenizer."""
    from stage2_student.config import MergeConfig
    from stage2_student.merge import run, summary_line

    with cli_errors(MergeConfig):
        summary = run(build_config(MergeConfig, params))
    click.echo(summary_line(summary))


@cli.command()
@config_option
@options_from(__import__("stage2_student.config", fromlist=["SweepConfig"]).SweepConfig, skip=("student", "eval_data"))
@click.option(
    "--eval-data", "eval_data", multiple=True, help="NAME=PATH held-out corpus (repeat): 'target' plus retention sets."
)
@options_from(
    __import__("stage2_student.config", fromlist=["StudentConfig"]).StudentConfig,
    skip=("run_dir", "out", "kl_weight", "resume", "overwrite", "eval_data", "eval_every", "eval_max_sequences"),
)
def sweep(**params):
    """Train one student per λ (and per lr / baseline knob) from the same stored labels, evaluate all,
    and write a trade-off table and plot."""
    from stage2_student.config import StudentConfig, SweepConfig
    from stage2_student.sweep import run

    student_keys = {f.name for f in dataclasses.fields(StudentConfig)}
    sweep_keys = {f.name for f in dataclasses.fields(SweepConfig)}
    student = {k: v for k, v in params.items() if k in student_keys and k not in sweep_keys and v is not None}
    given = {k: v for k, v in params.items() if k in sweep_keys}
    given["eval_data"] = tuple(params.get("eval_data") or ())
    with cli_errors(SweepConfig, StudentConfig):
        result = run(build_config(SweepConfig, {**given, "student": student}))
    if "table" in result:
        from stage2_student.sweep import format_markdown

        click.echo(format_markdown(result["table"], result["target"]))
    click.echo(f"sweep: {len(result['rows']) - 1} models -> {params['out']}")


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_out"),
    help="Where the demo writes its run, models, table and plot.",
)
@click.option("--full", is_flag=True, help="The larger setting (more steps, λ values, baselines); for a GPU.")
@click.option("--seed", type=int, default=0, help="Seed of the students.")
def demo(out: Path, full: bool, seed: int):
    """The embedded default: SmolLM2-135M fine-tuned on math, with and without label annealing, then evaluated
    on held-out math and on Shakespeare. No model hub; about 10 minutes on 2 CPU cores."""
    from demo.demo import run

    run(out=out, full=full, seed=seed)


def main():
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
