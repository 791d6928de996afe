"""The classic-control acceptance table: zerorl PPO / TRPO with their tuned YAML defaults, per seed.

    OMP_NUM_THREADS=1 python benchmarks/classic_returns.py            # the full table (~10 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/classic_returns.py --only CartPole-v1

Targets (published-results level, checked here): CartPole-v1 ≥ 475 within 100k steps (PPO, TRPO,
5 seeds); Acrobot-v1 ≥ −100 within 200k (PPO, TRPO, 3 seeds); Pendulum-v1 ≥ −250 within 200k (PPO,
3 seeds). Each cell is the mean of 20 deterministic evaluation episodes after training. Prints a table
and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from zerorl.classic.config import load_config  # noqa: E402
from zerorl.classic.evaluate import evaluate  # noqa: E402
from zerorl.classic.ppo import train_ppo  # noqa: E402
from zerorl.classic.trpo import train_trpo  # noqa: E402

# (env, algo, budget, seeds, threshold)
TARGETS = [
    ("CartPole-v1", "ppo", 100_000, [1, 2, 3, 4, 5], 475.0),
    ("CartPole-v1", "trpo", 100_000, [1, 2, 3, 4, 5], 475.0),
    ("Acrobot-v1", "ppo", 200_000, [1, 2, 3], -100.0),
    ("Acrobot-v1", "trpo", 200_000, [1, 2, 3], -100.0),
    ("Pendulum-v1", "ppo", 200_000, [1, 2, 3], -250.0),
]


def append_section(path: Path, text: str) -> None:
    """Append our section; create the file with its header if missing, never rewrite other sections."""
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with open(path, "a") as handle:
        handle.write("\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="env ids to run (default: all)")
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows, verdicts = [], []
    for env_id, algo, budget, seeds, threshold in TARGETS:
        if args.only and env_id not in args.only:
            continue
        means = []
        for seed in seeds:
            config = load_config(algo, env_id, total_steps=budget, seed=seed, progress=False)
            start = time.perf_counter()
            agent, normalizer = {"ppo": train_ppo, "trpo": train_trpo}[algo](config, None)
            train_seconds = time.perf_counter() - start
            returns = evaluate(agent, env_id, normalizer, args.eval_episodes, seed, config.vectorization_mode)
            means.append(float(returns.mean()))
            used = config.num_iterations * config.batch_size
            row = (
                f"| {env_id} | {algo} | {used} | {seed} | {returns.mean():.1f} ± {returns.std():.1f} | "
                f"{train_seconds:.1f} | {'yes' if returns.mean() >= threshold else 'NO'} |"
            )
            rows.append(row)
            print(row, flush=True)
        verdict = "PASS" if min(means) >= threshold else "FAIL"
        verdicts.append(
            f"- {env_id} {algo}: min over {len(seeds)} seeds {min(means):.1f}, mean "
            f"{sum(means) / len(means):.1f}, target ≥ {threshold:g} within {budget} steps → **{verdict}**"
        )

    section = "\n".join(
        [
            f"## Classic control returns, zerorl tuned defaults ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            f"`python benchmarks/classic_returns.py`; {platform.processor() or platform.machine()}, 1 torch "
            f"thread, torch {torch.__version__}. Eval: {args.eval_episodes} deterministic episodes after "
            "training, envs seeded apart from training. Configs: zerorl/configs/classic/<algo>/<env>.yaml.",
            "",
            "| env | algo | env steps used | seed | eval return (mean ± std) | train s | ≥ target |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            *verdicts,
            "",
        ]
    )
    print("\n" + section)
    if not args.no_append:
        append_section(Path(args.results), section)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
