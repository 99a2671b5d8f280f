"""Run every benchmark: `python -m benchmarks [--quick] [--repeats N] [--only a,b] [--no-write]` (= `make bench`).

Each module runs in its own process (so that its thread settings — one thread for torch, OpenMP and
XLA — apply before torch / jax are imported, and so that one failing benchmark does not stop the
others), in this order:
  overhead        solver overhead, tiny network (issue 2; its own section "## Overhead (issue 2)")
  stiff           stiff work–precision and batch throughput (issue 4; block `stiff`)
  nonstiff        non-stiff work–precision + medium-network overhead (issue 7; block `nonstiff`)
  sde             SDE strong error vs wall time against torchsde (issue 5; block `sde`)
  training        training time to a fixed loss, vanilla vs error-regularized (issue 7; block `training`)
  julia_overhead  cost of the Julia bridge (issue 6; prints only, Julia parts skip without juliacall)
Each regenerates its own section of benchmarks/RESULTS.md and its PNG under benchmarks/plots/.
--quick is a smoke run on tiny sizes (a module without a --quick option gets --repeats 1 instead).
The exit status is non-zero when any benchmark failed; a summary is printed at the end.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

MODULES = ["overhead", "stiff", "nonstiff", "sde", "training", "julia_overhead"]
ROOT = Path(__file__).resolve().parents[1]


def _options(module):
    """The long options a module's argparse accepts (from its --help), so that we pass only those."""
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, env=_env(), timeout=600)
    return {w.strip("[],") for w in out.stdout.split() if w.startswith(("--", "[--"))}


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    flags = env.get("XLA_FLAGS", "")
    for flag in ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"):
        if flag.split("=")[0] not in flags:
            flags = (flags + " " + flag).strip()
    env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def command(module, args):
    opts = _options(module)
    cmd = [sys.executable, "-m", f"benchmarks.{module}"]
    if args.quick:
        if "--quick" in opts:
            cmd.append("--quick")
        elif "--repeats" in opts:
            cmd += ["--repeats", "1"]
    if args.repeats is not None and "--repeats" in opts and not args.quick:
        cmd += ["--repeats", str(args.repeats)]
    if args.no_write and "--no-write" in opts:
        cmd.append("--no-write")
    if args.load_note and "--load-note" in opts:
        cmd += ["--load-note", args.load_note]
    return cmd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on tiny sizes")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per timing (each module's default otherwise)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(MODULES)}")
    ap.add_argument("--no-write", action="store_true", help="leave RESULTS.md and the plots alone")
    ap.add_argument("--load-note", default="", help="free text on machine load, written into the sections")
    args = ap.parse_args(argv)
    mods = [m for m in args.only.split(",") if m] or MODULES
    unknown = set(mods) - set(MODULES)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {MODULES}")
    summary = []
    for mod in mods:
        cmd = command(mod, args)
        print(f"=== {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=_env())
        summary.append((mod, rc, time.perf_counter() - start))
    print("\n=== summary")
    for mod, rc, secs in summary:
        print(f"{mod:16s} {'ok' if rc == 0 else f'FAILED (exit {rc})':18s} {secs:7.1f} s")
    return 1 if any(rc for _, rc, _ in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
