"""The main job, measured: `zerorl train` with no arguments, from an empty cache.

Runs the embedded default end to end (cold-start SFT included, in a fresh cache directory) and
prints held-out accuracy before/after with 95% confidence intervals and the wall time, then appends
the table to benchmarks/RESULTS.md.

    python benchmarks/default_run.py [--cache-dir DIR] [extra key=value overrides for zerorl train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", help="reuse this cache (default: a fresh temporary one)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cache = args.cache_dir or tempfile.mkdtemp(prefix="zerorl-cache-")
    cache_was_empty = not any(Path(cache).iterdir()) if Path(cache).is_dir() else True
    out = args.output_dir or tempfile.mkdtemp(prefix="zerorl-run-")
    env = dict(os.environ, ZERORL_CACHE=cache)
    cmd = [sys.executable, "-m", "zerorl.cli", "train", "--output-dir", out, *args.overrides]
    print("running:", " ".join(cmd), f"(ZERORL_CACHE={cache})", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((Path(out) / "summary.json").read_text())

    def fmt(result: dict, key: str) -> str:
        lo, hi = result[f"{key}_ci95"]
        return f"{100 * result[key]:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    before, after = summary["eval_before"], summary["eval_after"]
    lines = [
        f"| metric (held-out n={after['n']}) | before RL | after RL | Δ points |",
        "|---|---|---|---|",
        f"| accuracy at T={after['temperature']} (k={after['samples_per_prompt']}) | "
        f"{fmt(before, 'accuracy_sampled')} | {fmt(after, 'accuracy_sampled')} | "
        f"{100 * (after['accuracy_sampled'] - before['accuracy_sampled']):+.1f} |",
        f"| greedy accuracy | {fmt(before, 'accuracy_greedy')} | {fmt(after, 'accuracy_greedy')} | "
        f"{100 * (after['accuracy_greedy'] - before['accuracy_greedy']):+.1f} |",
        f"| format rate | {100 * before['format_rate']:.1f}% | {100 * after['format_rate']:.1f}% | "
        f"{100 * (after['format_rate'] - before['format_rate']):+.1f} |",
        "",
        "Wall time of `zerorl train` ("
        + ("cold-start SFT included, empty cache" if cache_was_empty else f"cache reused from {cache}: no SFT")
        + f"): {wall:.0f} s "
        f"({wall / 60:.1f} min); training+eval as reported by the run: {summary['wall_seconds']:.0f} s.",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        header = (f"\n## benchmarks/default_run.py — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
                  f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n\n"
                  f"Command: `zerorl train {' '.join(args.overrides)}` (no arguments = the embedded default)\n\n")
        with open(HERE / "RESULTS.md", "a") as handle:
            handle.write(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
