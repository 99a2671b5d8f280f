"""Small helpers shared by the benchmark modules (not by benchmarks/overhead.py, which keeps its own).

- `write_section(key, text)`: rewrite only the block between `<!-- begin: key -->` and
  `<!-- end: key -->` in benchmarks/RESULTS.md (and the `## ` heading line just above it); a new
  block is appended.
- `machine(extra)`: one line naming the machine, CPU model, Python and library versions, threads.
- `interp_at(pts, err, key)`: log-log interpolation of a cost at a given achieved error.
- `timed(fn, repeats)`: median wall time over repeats (fewer for slow calls; says how many).
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
PLOTS = Path(__file__).with_name("plots")


def begin_marker(key):
    return f"<!-- begin: {key} -->"


def end_marker(key):
    return f"<!-- end: {key} -->"


def write_section(key: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `key` of `path` with `text` (markers added here).

    A text starting with a `## ` heading is written as that heading line, then
    `<!-- begin: key -->`, the rest, `<!-- end: key -->`; the heading right above the begin marker
    is replaced with it. Keeping the heading outside the markers makes the block safe next to
    heading-delimited sections (overhead.py's writer replaces its section up to the next `## `
    heading, which is then this block's heading, never its markers)."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.strip("\n").split("\n")
    head, body = (lines[0], "\n".join(lines[1:]).strip("\n")) if lines[0].startswith("## ") else (None, text.strip("\n"))
    block = (f"{head}\n" if head else "") + f"{begin_marker(key)}\n{body}\n{end_marker(key)}\n"
    b, e = old.find(begin_marker(key)), old.find(end_marker(key))
    if b >= 0 and e > b:
        prev = old.rfind("\n", 0, b - 1) + 1 if b > 0 else b
        start = prev if old[prev:b].startswith("## ") else b
        rest = old[e + len(end_marker(key)):]
        rest = rest[1:] if rest.startswith("\n") else rest
        new = old[:start] + block + rest
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else "unknown"
    except OSError:
        return "unknown"


def load_note() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} logical cores"
    except OSError:
        return "load average unknown"


def versions(mods=("torch", "torchdiffeq", "torchode", "scipy", "numpy", "jax", "diffrax")) -> str:
    out = []
    for mod in mods:
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            out.append(f"{mod} not installed")
    return ", ".join(out)


def machine(mods=None) -> str:
    import torch
    import pybridge as pb
    v = versions() if mods is None else versions(mods)
    return (f"{platform.platform()}; CPU: {cpu_model()} ({os.cpu_count()} logical cores visible); Python "
            f"{platform.python_version()}; {v}; pybridge {pb.__version__}; torch threads "
            f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def single_thread_env() -> None:
    """Call before importing torch / jax: one thread for OpenMP, MKL and XLA's CPU backend."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"):
        if flag.split("=")[0] not in flags:
            flags = (flags + " " + flag).strip()
    os.environ["XLA_FLAGS"] = flags


def interp_at(pts, err, key):
    """log-log linear interpolation of pts[key] at achieved error `err` (None outside the range).

    pts: dicts with "err" and `key`; points without a finite positive error are ignored."""
    pts = sorted((p for p in pts if p.get("err") is not None and math.isfinite(p["err"]) and p["err"] > 0
                  and p.get(key) is not None), key=lambda p: p["err"])
    for a, b in zip(pts, pts[1:]):
        if a["err"] <= err <= b["err"]:
            if b["err"] == a["err"]:
                return min(a[key], b[key])
            w = (math.log(err) - math.log(a["err"])) / (math.log(b["err"]) - math.log(a["err"]))
            return math.exp((1 - w) * math.log(a[key]) + w * math.log(b[key]))
    if len(pts) == 1 and pts[0]["err"] == err:
        return pts[0][key]
    return None


def timed(fn, repeats: int, slow: float = 2.0):
    """(median wall, number of timed runs, last result). The first call is timed too (no warm-up:
    callers compile JIT code beforehand); if it took longer than `slow` seconds it is the only one."""
    times = []
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
    if times[0] < slow:
        for _ in range(max(0, repeats - 1)):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), len(times), out


def fmt_s(x):
    if x is None:
        return "—"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def finish_loglog_axes(ax, title, xlabel, ylabel):
    """The work–precision panels' common dressing."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
