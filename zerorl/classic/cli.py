"""`zerorl classic --algo ppo|trpo --env ID --steps N --seed S --output-dir DIR [--config F.yaml] [k=v ...]`

Trains, evaluates the deterministic policy for `eval_episodes` (≥ 20 by default) episodes and writes
to the output directory:

    metrics.jsonl        one line per finished training episode and per update
    learning_curve.png   episodic returns against environment steps
    summary.json         eval_return_mean, eval_return_std, wall_seconds, train_seconds, ...
    config.yaml          the resolved configuration (defaults + tuned YAML + overrides)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from zerorl.classic.agents import ActorCritic
from zerorl.classic.config import ALGOS, ClassicConfig, load_config, parse_overrides
from zerorl.classic.envs import Normalizer
from zerorl.classic.evaluate import evaluate
from zerorl.classic.ppo import train_ppo
from zerorl.classic.tracking import RunLogger, plot_learning_curve
from zerorl.classic.trpo import train_trpo

TRAINERS: dict[str, Callable[..., tuple[ActorCritic, Normalizer]]] = {"ppo": train_ppo, "trpo": train_trpo}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the classic-control flags to `parser` (the lead's `zerorl classic` subparser) or a new one."""
    parser = parser or argparse.ArgumentParser(
        prog="zerorl classic", description="PPO / TRPO on Gymnasium classic control."
    )
    parser.add_argument("--algo", required=True, help=f"one of {ALGOS}")
    parser.add_argument("--env", default=None, help="Gymnasium id, e.g. CartPole-v1 (default: from --config)")
    parser.add_argument("--steps", type=int, default=None, help="total environment steps (total_steps)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output-dir", default=None, help="default: runs/classic/<algo>-<env>-seed<seed>")
    parser.add_argument("--config", default=None, help="YAML file of config keys (applied over tuned defaults)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_envs=4")
    return parser


def config_from_args(args: argparse.Namespace) -> ClassicConfig:
    return load_config(
        args.algo,
        env_id=args.env,
        config_file=args.config,
        overrides=parse_overrides(args.overrides),
        total_steps=args.steps,
        seed=args.seed,
        output_dir=args.output_dir,
        progress=False if args.no_progress else None,
    )


def run(algo: str, config: ClassicConfig) -> dict[str, Any]:
    """Train, evaluate, write the run's files; return the summary."""
    torch.set_num_threads(config.torch_threads)
    output_dir = Path(config.output_dir or f"runs/classic/{algo}-{config.env_id}-seed{config.seed}")
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "config.yaml", "w") as handle:
        yaml.safe_dump({"algo": algo, **dataclasses.asdict(config)}, handle, sort_keys=False)

    start = time.perf_counter()
    logger = RunLogger(output_dir, config.total_steps, config.progress, desc=f"{algo} {config.env_id}")
    try:
        agent, normalizer = TRAINERS[algo](config, logger)
    finally:
        logger.close()
    train_seconds = time.perf_counter() - start
    returns = evaluate(agent, config.env_id, normalizer, config.eval_episodes, config.seed, config.vectorization_mode)
    wall_seconds = time.perf_counter() - start

    summary = {
        "algo": algo,
        "env_id": config.env_id,
        "seed": config.seed,
        "total_steps": config.total_steps,
        "eval_episodes": int(returns.size),
        "eval_return_mean": float(np.mean(returns)),
        "eval_return_std": float(np.std(returns)),
        "eval_returns": [float(r) for r in returns],
        "final_train_return_mean": logger.recent_return(),  # last 20 training episodes
        "train_seconds": train_seconds,
        "wall_seconds": wall_seconds,
        "normalizer": normalizer.state_dict() if config.normalize_obs or config.normalize_reward else None,
    }
    with open(output_dir / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    torch.save({"agent": agent.state_dict(), "summary": summary}, output_dir / "agent.pt")
    plot_learning_curve(
        logger.episode_steps,
        logger.episode_returns,
        output_dir / "learning_curve.png",
        title=f"{algo.upper()} {config.env_id} (seed {config.seed})",
        eval_mean=summary["eval_return_mean"],
    )
    summary["output_dir"] = str(output_dir)
    return summary


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config = config_from_args(args)
    summary = run(args.algo, config)
    print(
        f"{args.algo} {config.env_id} seed {config.seed}: eval return "
        f"{summary['eval_return_mean']:.1f} ± {summary['eval_return_std']:.1f} over {summary['eval_episodes']} "
        f"episodes, {summary['wall_seconds']:.1f} s -> {summary['output_dir']}"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_from_args(args)
    return 0
