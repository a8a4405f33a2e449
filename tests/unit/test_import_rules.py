"""The layout's dependency rule, checked on the source (ast), so a change that breaks it fails here:

    storage and lm know nothing of the stages; stage1_teacher and stage2_student never import each other;
    demo is the only package that uses both; pipeline.py only parses options and calls a stage.

Also: no import cycle between modules; no module imports another module's underscore names; no import
inside a function except optional extras (vLLM, Ray, peft, lm-eval, matplotlib), each under a comment
that says "optional" or "extra", and
pipeline.py's commands, which import their stage when run so that `pipeline --help` stays fast.
Each rule is first shown to fire on a small tree written here (a checker that cannot fail proves nothing).
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("storage", "lm", "stage1_teacher", "stage2_student", "demo")
FIRST_PARTY = (*PACKAGES, "pipeline", "bench")
# Which first-party top-level names each may import (itself included).
ALLOWED = {
    "storage": {"storage"},
    "lm": {"lm"},
    "stage1_teacher": {"stage1_teacher", "storage", "lm"},
    "stage2_student": {"stage2_student", "storage", "lm"},
    "demo": {"demo", "stage1_teacher", "stage2_student", "storage", "lm"},
    "pipeline": {"pipeline", "demo", "stage1_teacher", "stage2_student", "storage", "lm"},
    "bench": set(FIRST_PARTY),
}
# Extras that are installed separately: importing them at module top would break the base install.
OPTIONAL = {"vllm", "ray", "peft", "lm_eval", "matplotlib", "boto3", "botocore", "fsspec"}


@dataclass
class Module:
    name: str
    path: Path  # relative to the root
    tree: ast.Module
    lines: list[str]
    imports: list[tuple[str, ast.stmt]] = field(default_factory=list)  # (imported module, node)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] == "bench":  # scripts run from bench/, importing each other as top-level names
        parts = ["bench", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def load_modules(root: Path) -> dict[str, Module]:
    paths = [root / "pipeline.py"] if (root / "pipeline.py").exists() else []
    for top in (*PACKAGES, "bench"):
        paths += sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []
    mods = {}
    for p in paths:
        text = p.read_text(encoding="utf-8")
        name = _module_name(root, p)
        mods[name] = Module(name, p.relative_to(root), ast.parse(text, str(p)), text.splitlines())
    for m in mods.values():
        is_pkg = m.path.name == "__init__.py"
        for node in ast.walk(m.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    m.imports.append((_resolve(a.name, mods), node))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = m.name.split(".") if is_pkg else m.name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                elif m.name.startswith("bench.") and base in {
                    n.split(".", 1)[1] for n in mods if n.startswith("bench.")
                }:
                    base = "bench." + base  # a bench script importing a sibling script
                for a in node.names:  # `from pkg import module` depends on the module, not only on pkg
                    sub = f"{base}.{a.name}"
                    m.imports.append((sub if sub in mods else _resolve(base, mods), node))
    return mods


def _resolve(name: str, mods: dict[str, Module]) -> str:
    """The longest known module prefix of a dotted name (or the name itself for third-party ones)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return name


def _top(name: str) -> str:
    return name.split(".")[0]


def _function_level(tree: ast.Module) -> set[int]:
    """ids of import nodes inside a function body."""
    inner = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    inner.add(id(sub))
    return inner


def cycles(mods: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus self-imports."""
    graph = {n: sorted({t for t, _ in m.imports if t in mods and t != n}) for n, m in mods.items()}
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer_violations(mods: dict[str, Module]) -> list[str]:
    bad = []
    for m in mods.values():
        allowed = ALLOWED[_top(m.name)]
        for target, node in m.imports:
            top = _top(target)
            if top in FIRST_PARTY and top not in allowed:
                bad.append(
                    f"{m.path}:{node.lineno}: {m.name} imports {target} ({_top(m.name)} may import "
                    f"{', '.join(sorted(allowed))})"
                )
    return bad


def private_name_violations(mods: dict[str, Module]) -> list[str]:
    bad = []
    for m in mods.values():
        bound = {}  # local name -> first-party module it names
        for node in ast.walk(m.tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    target = next((t for t, n in m.imports if n is node and t.endswith("." + a.name)), None)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{m.path}:{node.lineno}: {m.name} imports {a.name} from another module")
                    if target in mods:
                        bound[a.asname or a.name] = target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if _top(a.name) in FIRST_PARTY:
                        bound[a.asname or _top(a.name)] = a.name
        for node in ast.walk(m.tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{m.path}:{node.lineno}: {m.name} uses {bound[node.value.id]}.{node.attr}")
    return bad


def hidden_import_violations(mods: dict[str, Module]) -> list[str]:
    bad = []
    for m in mods.values():
        if _top(m.name) == "bench":  # scripts: lazy imports keep `--help` and the light modes fast
            continue
        inner = _function_level(m.tree)
        for target, node in m.imports:
            if id(node) not in inner:
                continue
            if m.name == "pipeline" and _top(target) in FIRST_PARTY:
                continue  # each command imports its stage when it runs: `pipeline --help` stays fast
            # the import line or the three above it say that this is an optional extra
            commented = any(
                "optional" in m.lines[i].partition("#")[2] or "extra" in m.lines[i].partition("#")[2]
                for i in range(node.lineno - 4, node.lineno)
                if 0 <= i < len(m.lines)
            )
            if _top(target) in OPTIONAL and commented:
                continue
            why = (
                "optional extra without a comment saying so" if _top(target) in OPTIONAL else "import inside a function"
            )
            bad.append(f"{m.path}:{node.lineno}: {m.name}: {why}: {target}")
    return bad


# ------------------------------------------------------------------------------------- the real tree


@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return load_modules(ROOT)


def test_the_tree_is_found(tree):
    for name in ("pipeline", "storage.spec", "lm.corpus", "stage1_teacher.shards", "stage2_student.train", "demo.demo"):
        assert name in tree


def test_no_import_cycles(tree):
    assert cycles(tree) == []


def test_stages_storage_and_lm_keep_to_their_layer(tree):
    assert layer_violations(tree) == []


def test_no_module_imports_another_modules_private_names(tree):
    assert private_name_violations(tree) == []


def test_imports_inside_functions_are_optional_extras_only(tree):
    assert hidden_import_violations(tree) == []


# ------------------------------------------------------------------------- each rule fires on a bad tree


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return load_modules(root)


def test_a_cycle_is_found(tmp_path):
    mods = _write(
        tmp_path,
        {
            "storage/__init__.py": "",
            "storage/a.py": "from .b import x\n",
            "storage/b.py": "from storage import a\nx = 1\n",
            "storage/c.py": "from . import a\n",
        },
    )
    assert cycles(mods) == [["storage.a", "storage.b"]]


def test_a_stage_importing_the_other_is_found(tmp_path):
    mods = _write(
        tmp_path,
        {
            "stage1_teacher/__init__.py": "",
            "stage2_student/__init__.py": "",
            "stage2_student/x.py": "import torch\nfrom stage1_teacher import y\n",
            "storage/__init__.py": "",
            "storage/z.py": "from lm import q\n",
            "lm/__init__.py": "",
        },
    )
    bad = sorted(layer_violations(mods))
    assert len(bad) == 2 and "stage2_student.x imports stage1_teacher" in bad[0] and "storage.z imports lm" in bad[1]


def test_a_private_import_is_found(tmp_path):
    mods = _write(
        tmp_path,
        {
            "storage/__init__.py": "",
            "storage/a.py": "_x = 1\ndef _f(): pass\n",
            "storage/b.py": "from .a import _x\nfrom storage import a\na._f()\n",
        },
    )
    bad = private_name_violations(mods)
    assert len(bad) == 2 and "imports _x" in bad[0] and "uses storage.a._f" in bad[1]


def test_a_hidden_import_is_found_and_a_commented_optional_one_is_not(tmp_path):
    mods = _write(
        tmp_path,
        {
            "lm/__init__.py": "",
            "lm/a.py": """\
        def f():
            import torch
            # optional extra: the [lora] one
            import peft


        def g():
            x = 1
            y = 2
            z = 3
            import ray
        """,
        },
    )
    bad = hidden_import_violations(mods)
    assert len(bad) == 2 and "import inside a function: torch" in bad[0] and "without a comment" in bad[1]
