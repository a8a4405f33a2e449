"""label-anneal command line: `pipeline teacher | student | sweep | eval | merge | inspect | demo`.

Each command parses its options into its stage's config dataclass and calls that stage's
`run(config)`; the same dataclasses are the Python API. Every command takes `--config FILE`
(TOML) whose keys are the option names (dashes or underscores); flags given on the command
line win; an unknown key is an error.

    pipeline inspect RUN_DIR [--json]
"""
from __future__ import annotations

import json
import logging
import sys
import tomllib
from pathlib import Path

import click


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    if not value:
        return value
    try:
        data = tomllib.loads(Path(value).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"{value}: no such file", param=param)
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: not valid TOML ({e})", param=param)
    known = {p.name for p in ctx.command.params if p.name != "config"}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown key(s) {unknown}; valid keys: {sorted(known)}", param=param)
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def config_option(f):
    return click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
                        expose_value=False, help="TOML file whose keys are this command's option names.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int):
    """Offline label annealing: capture a teacher's top-k once, fine-tune against it without forgetting."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(run_dir: Path, as_json: bool):
    """Show what a run directory holds: shards, rows, trained tokens, k, bytes per trained token."""
    from storage.inspect_run import format_table, summarize
    from storage.errors import StorageError

    try:
        info = summarize(run_dir)
    except StorageError as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(info, indent=2) if as_json else format_table(info))


def main():
    cli(prog_name="pipeline")


if __name__ == "__main__":
    main()
