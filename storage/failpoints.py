"""Named fault-injection points ("failpoints"), so that crash tests decide where a process dies, not the clock.

Code that writes something whose interruption matters declares a point once and calls it at that step:

    ROW_GROUP_WRITTEN = failpoints.declare("shard.row_group_written", "row group N of shard S is in the .tmp file")
    ...
    ROW_GROUP_WRITTEN(shard=self.index, row_group=n)

Normally a call costs one environment lookup. A test sets `LABEL_ANNEAL_FAILPOINTS` in the child's environment,

    LABEL_ANNEAL_FAILPOINTS="shard.row_group_written{shard=1,row_group=2}=kill"

and the process acts on itself when a point of that name is reached with every listed field equal:

    kill   SIGKILL: a crash at exactly that step
    stop   SIGSTOP: the test sees the process stopped (`os.waitpid(pid, os.WUNTRACED)`), checks the disk, then kills
           or continues it
    term   SIGTERM: a preemption notice at exactly that step, handled as one from outside
    enospc raise OSError(ENOSPC) there, as a full disk does (a test of the error path that runs on any machine)

Several specs are separated by `;`. The field `hit=N` acts on the Nth matching call only (counted in this process);
without it, the first match acts. The calls are cheap enough for per-row-group and per-checkpoint steps, not for
per-token loops. Like etcd's gofail or FreeBSD's fail(9), this is a test hook: nothing sets the variable in production.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from dataclasses import dataclass, field

ENV = "LABEL_ANNEAL_FAILPOINTS"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM, "enospc": None}

_SPEC_RE = re.compile(r"^\s*([a-z0-9_.]+)\s*(?:\{([^}]*)\})?\s*=\s*([a-z]+)\s*$")
_DECLARED: dict[str, str] = {}


@dataclass
class _Spec:
    name: str
    fields: dict[str, str]
    action: str
    hit: int = 1
    seen: int = field(default=0, compare=False)

    def matches(self, name: str, fields: dict) -> bool:
        return name == self.name and all(k in fields and str(fields[k]) == v for k, v in self.fields.items())


def parse(text: str) -> list[_Spec]:
    """`name{k=v,...}=action;...` -> specs. A malformed spec is an error naming it (a typo must not pass silently)."""
    specs = []
    for part in filter(str.strip, text.split(";")):
        m = _SPEC_RE.match(part)
        if not m or m.group(3) not in ACTIONS:
            raise ValueError(
                f"{ENV}: cannot parse {part!r}; expected NAME{{field=value,...}}=ACTION with ACTION one of "
                f"{', '.join(ACTIONS)}"
            )
        fields = {}
        for kv in filter(str.strip, (m.group(2) or "").split(",")):
            k, sep, v = kv.partition("=")
            if not sep or not k.strip():
                raise ValueError(f"{ENV}: field {kv!r} in {part!r} is not key=value")
            fields[k.strip()] = v.strip()
        hit = fields.pop("hit", "1")
        if not hit.isdigit() or int(hit) < 1:
            raise ValueError(f"{ENV}: hit={hit!r} in {part!r} must be a positive integer")
        specs.append(_Spec(m.group(1), fields, m.group(3), int(hit)))
    return specs


_active: tuple[str, list[_Spec]] = ("", [])


def _specs() -> list[_Spec]:
    global _active
    text = os.environ.get(ENV, "")
    if text != _active[0]:  # parsed once per value; the hit counters live as long as the value
        _active = (text, parse(text))
    return _active[1]


class Failpoint:
    """One named step. Calling it with the step's fields acts if an active spec matches."""

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc

    def __call__(self, **fields) -> None:
        if ENV not in os.environ:
            return
        for spec in _specs():
            if spec.matches(self.name, fields):
                spec.seen += 1
                if spec.seen == spec.hit:
                    where = ", ".join(f"{k}={v}" for k, v in fields.items())
                    # Said before acting, so the test's log shows where the process went.
                    print(f"failpoint {self.name}{{{where}}}: {spec.action}", file=sys.stderr, flush=True)
                    if spec.action == "enospc":
                        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {self.name})")
                    # raise_signal, not kill(getpid()): a test may fake getpid (PID 1 in every container)
                    signal.raise_signal(ACTIONS[spec.action])

    def __repr__(self) -> str:
        return f"Failpoint({self.name!r})"


def declare(name: str, doc: str) -> Failpoint:
    """A named point; names are unique across the code base."""
    if name in _DECLARED and _DECLARED[name] != doc:
        raise ValueError(f"failpoint {name!r} declared twice")
    _DECLARED[name] = doc
    return Failpoint(name, doc)


def declared() -> dict[str, str]:
    """Every point declared by the modules imported so far: name -> what has happened when it fires."""
    return dict(_DECLARED)
