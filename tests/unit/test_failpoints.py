"""storage/failpoints.py: the spec grammar, field matching, `hit=N`, and each action on a real child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from e2e_helpers import REPO

from storage import failpoints

# A child that passes a point three times (i = 0, 1, 2), printing before each, then exits 0.
_CHILD = """
import sys
from storage import failpoints
p = failpoints.declare("test.point", "a point of the unit test")
for i in range(3):
    print("at", i, flush=True)
    p(i=i, name="x")
print("done", flush=True)
"""


def _child(spec: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), failpoints.ENV: spec}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_parse_grammar():
    (a, b) = failpoints.parse(" shard.committed{shard=1}=kill ; checkpoint.renamed{ step = 3 , hit=2 }=stop;")
    assert (a.name, a.fields, a.action, a.hit) == ("shard.committed", {"shard": "1"}, "kill", 1)
    assert (b.name, b.fields, b.action, b.hit) == ("checkpoint.renamed", {"step": "3"}, "stop", 2)
    assert failpoints.parse("teacher.prepared=term")[0].fields == {}
    assert failpoints.parse("") == []


@pytest.mark.parametrize(
    "bad",
    [
        "shard.committed",
        "shard.committed=explode",
        "shard.committed{shard}=kill",
        "x{hit=0}=kill",
        "x{hit=two}=kill",
        "Bad Name=kill",
    ],
)
def test_malformed_specs_are_errors_naming_them(bad):
    with pytest.raises(ValueError, match=failpoints.ENV):
        failpoints.parse(bad)


def test_no_variable_no_action(monkeypatch):
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.declare("test.inert", "never acts")(i=1)  # returns: nothing set


def test_kill_acts_on_the_matching_call_only():
    p = _child("test.point{i=1,name=x}=kill")
    out, err = p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert out.split("\n")[:-1] == ["at 0", "at 1"], "killed at i=1, not before and not after"
    assert "failpoint test.point{i=1, name=x}: kill" in err


def test_hit_counts_matches_and_unmatched_fields_never_act():
    p = _child("test.point{name=x,hit=3}=kill")
    out, _ = p.communicate()
    assert p.returncode == -signal.SIGKILL and out.split("\n")[:-1] == ["at 0", "at 1", "at 2"]
    p = _child("test.point{i=7}=kill;test.point{name=y}=kill;other.point=kill")
    out, _ = p.communicate()
    assert p.returncode == 0 and out.endswith("done\n")


def test_stop_then_continue_and_term():
    p = _child("test.point{i=0}=stop")
    pid, status = os.waitpid(p.pid, os.WUNTRACED)  # the kernel tells the parent: no polling
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
    os.kill(p.pid, signal.SIGCONT)
    out, _ = p.communicate()
    assert p.returncode == 0 and out.endswith("done\n"), "continued where it stopped"
    p = _child("test.point{i=2}=term")
    out, _ = p.communicate()
    assert p.returncode == -signal.SIGTERM and "done" not in out


def test_malformed_variable_fails_the_child_loudly():
    p = _child("test.point{i=1}=explode")
    _, err = p.communicate()
    assert p.returncode != 0 and "cannot parse 'test.point{i=1}=explode'" in err
