"""GRPO vs PPO vs TRPO on the default task, model and budget: `zerorl compare`, appended to RESULTS.md.

    python benchmarks/compare_algos.py [--output-dir DIR] [--reuse] [--no-append] [key=value ...] [ppo.key=value ...]

Runs `zerorl.lm.compare.main` (each algorithm in its own process; held-out accuracy with n = num_eval),
prints the table, copies the figure to docs/figures/ppo_vs_grpo_measured.png and appends a section to
benchmarks/RESULTS.md. On a shared CPU pass num_threads=1 (and OMP_NUM_THREADS=1): the seconds per step
then measure one core each, and several processes do not fight over the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from zerorl.lm.compare import DEFAULT_RECIPES  # noqa: E402
from zerorl.lm.compare import main as compare_main  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", default="runs/compare-default")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    argv = ["--output-dir", args.output_dir] + (["--reuse"] if args.reuse else []) + args.overrides
    code = compare_main(argv)
    if code != 0:
        return code
    out = Path(args.output_dir)
    report = json.loads((out / "comparison.json").read_text())
    figure = ROOT / "docs" / "figures" / "ppo_vs_grpo_measured.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "comparison.png", figure)

    config = report["results"][0]["config"]
    recipes = {a: {**DEFAULT_RECIPES[a], **report["overrides"].get(a, {})} for a in ("grpo", "ppo", "trpo")}
    header = (
        f"\n## benchmarks/compare_algos.py — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
        f"num_threads={config['num_threads']} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n\n"
        f"Command: `python benchmarks/compare_algos.py {' '.join(args.overrides)}`. Task {config['task']}, "
        f"{config['max_steps']} steps × {config['prompts_per_step']} prompts × {config['num_generations']} samples, "
        f"max {config['max_completion_length']} tokens, held-out n={report['before']['n']} "
        f"(k={report['before']['samples_per_prompt']} samples per prompt at T={report['before']['temperature']}). "
        f"Recipes on top of the TrainConfig defaults: "
        + "; ".join(f"{a}: {' '.join(f'{k}={v}' for k, v in r.items()) or '(defaults)'}" for a, r in recipes.items())
        + ". Seconds per step are wall time on a machine shared with other jobs: compare them within this table "
        "only. Peak RSS is the process's VmHWM over setup + training (each algorithm in a fresh process).\n\n"
    )
    text = header + report["table"] + "\n\n" + "\n".join(report["savings"]) + "\n\n" \
        + "Figure: docs/figures/ppo_vs_grpo_measured.png\n"
    if not args.no_append:
        with open(HERE / "RESULTS.md", "a") as handle:
            handle.write(text)
    print(f"figure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
