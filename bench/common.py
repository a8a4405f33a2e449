"""Shared helpers of the benches: interleaved timing, peak memory on the CPU, tables, JSON, machine info.

Only the standard library at import time (torch is imported inside the memory helpers), so a bench can
import this module from another virtual environment (the vLLM worker of `teacher_bench.py`).

Timing
    `interleaved(variants, repeats)` runs the variants in rounds, A B C, A B C, ... (after one untimed
    warm-up round), so that load from other processes on a shared machine hits every variant alike.
    Report the median of the repeats, and ratios of medians measured in that one run; the per-round
    ratio range (`paired_ratios`) shows how much the load moved during the run.

Peak memory (CPU; `tracemalloc` does not see torch's allocations)
    `alloc_peak(fn)`: the peak of torch's CPU allocator above its level when `fn` starts, from the
        allocation/free events that `torch.profiler.profile(profile_memory=True)` records (running sum
        of the event sizes in time order). Exact for tensors; blind to memory that is not a torch tensor
        (numpy, pyarrow, Python objects). Only allocations made while `fn` runs count: tensors alive
        before it (weights, optimizer state, inputs) are not in the figure.
    `rss_peak(fn)`: the process's resident-set high-water mark (VmHWM, reset through
        /proc/self/clear_refs) minus the resident set when `fn` starts. Sees everything, but page
        granular, and glibc keeps freed heap memory resident (then reuses it without a new fault), which
        hides part of a peak: call `malloc_return_big_blocks()` once, before any `rss_peak`, so that
        every block >= 64 KiB is mmap-ed and returned to the OS when freed. It slows allocation
        (every big block faults in fresh pages), so benches measure memory after all timing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


# ------------------------------------------------------------------------------------------- timing


def interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` untimed rounds, then `repeats` timed rounds, each
    round calling every variant once in the given order (A B C A B C ...)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
            if log:
                log(f"  {'warm-up' if r < warmup else f'round {r - warmup + 1}/{repeats}'} {name}: {dt:.3f} s")
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios num[i] / den[i] (same round, so the same machine load)."""
    return [a / b for a, b in zip(num, den)]


def summarize(times: Sequence[float]) -> dict:
    return {
        "median_s": median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "all_s": [round(t, 6) for t in times],
    }


# ------------------------------------------------------------------------------------------- memory


def alloc_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of torch's CPU allocator above its level when `fn` starts (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            level += e.nbytes()
            peak = max(peak, level)
    return peak


def _status_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def rss_peak(fn: Callable[[], object]) -> int | None:
    """Resident-set high-water mark during `fn`, minus the resident set at its start (bytes); None where
    the high-water mark cannot be reset (not Linux, or /proc/self/clear_refs not writable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (Linux >= 4.0)
    except OSError:
        return None
    start = rss_now()
    fn()
    return _status_kib("VmHWM") * 1024 - start


_MALLOC_SET = False


def malloc_return_big_blocks(threshold: int = 1 << 16) -> bool:
    """glibc: serve blocks >= `threshold` bytes with mmap and unmap them on free (M_MMAP_THRESHOLD; fixing
    it also turns off glibc's adaptive threshold), so freed tensors leave the resident set at once."""
    global _MALLOC_SET
    if _MALLOC_SET:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except OSError:
        ok = False
    _MALLOC_SET = ok
    return ok


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


# -------------------------------------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """A Markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells]
    text = "\n".join(out)
    return f"{title}\n\n{text}" if title else text


def write_json(path: Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def machine_info() -> dict:
    """What the numbers were measured on (absolute times on shared machines are noise; say so)."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "nproc": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache"):
            m = re.search(rf"^{re.escape(key)}:\s+(.*)$", lscpu, re.M)
            if m:
                info[key] = m.group(1).strip()
        flags = re.search(r"^Flags:\s+(.*)$", lscpu, re.M)
        if flags:
            info["avx512_bf16"] = "avx512_bf16" in flags.group(1).split()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["mem_total_gib"] = round(
            int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20, 1
        )
    except (OSError, AttributeError):
        pass
    info["loadavg_at_start"] = os.getloadavg()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def op_profile(fns: dict[str, Callable[[], object]], top: int = 12, reps: int = 3) -> list[dict]:
    """Self CPU time per op (ms) under torch.profiler: each function is profiled `reps` times (the
    functions alternating, after one untimed call each) and every op keeps its minimum over the reps,
    which discounts time lost to other processes. Ops sorted by their time in the first function; a last
    row holds the sums of those minima."""
    from torch.profiler import ProfilerActivity, profile

    res: dict[str, dict[str, float]] = {name: {} for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                ms = e.self_cpu_time_total / 1e3
                res[name][e.key] = min(ms, res[name].get(e.key, float("inf")))
    first = next(iter(fns))
    keys = sorted(set().union(*res.values()), key=lambda x: -res[first].get(x, 0))
    rows = [{"op": key, **{f"{name}_ms": round(res[name].get(key, 0.0), 2) for name in fns}} for key in keys[:top]]
    rows.append(
        {
            "op": "TOTAL (self CPU, sum of per-op minima)",
            **{f"{name}_ms": round(sum(res[name].values()), 2) for name in fns},
        }
    )
    return rows
