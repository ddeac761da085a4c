"""Time `make demo` the way a newcomer meets it: a fresh clone, `make venv`, `make demo`, `make demo` again.

    python benchmarks/bench_demo.py                 # clones HEAD into a temporary directory
    python benchmarks/bench_demo.py --keep DIR      # ... into DIR, and leaves it there

Prints the wall time of each step, the pipeline's own line, and the machine's load average before
and after (the figures mean little without it on a shared machine). Needs the package index for
`make venv` (about 6.7 GB).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(name: str, command, cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    summary = [line for line in result.stdout.splitlines() if line.startswith("pipeline ")]
    print(f"{name:<22} {seconds:7.0f} s   load {os.getloadavg()[0]:.1f}   {summary[0] if summary else ''}",
          flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="clone into this directory and keep it")
    args = parser.parse_args()
    target = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dino-demo-")) / "clone"
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()}; clone -> {target}", flush=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    total = step("make venv", ["make", "venv"], target)
    total += step("make demo", ["make", "demo"], target)
    print(f"{'fresh clone total':<22} {total:7.0f} s", flush=True)
    step("make demo (again)", ["make", "demo"], target)
    if not args.keep:
        shutil.rmtree(target.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
