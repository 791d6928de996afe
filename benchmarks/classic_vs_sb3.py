"""Side by side on the same budget and seeds: Stable-Baselines3 PPO / sb3-contrib TRPO (rl-zoo
hyperparameters) against zerorl's classic PPO / TRPO (its tuned YAML defaults).

    .venv/bin/pip install -e ".[bench]"
    OMP_NUM_THREADS=1 python benchmarks/classic_vs_sb3.py --env CartPole-v1 --steps 100000 --seeds 1 2 3 4 5

Runs alternate (SB3 first on even seed indices, zerorl first on odd ones) so that a change in
machine load hits both sides alike. Both use one torch thread (OMP_NUM_THREADS=1), CPU, and their
own vectorized envs. Wall time is the training call only: building envs and model plus learning;
evaluation (20 deterministic episodes on envs seeded apart from training) is timed separately and
excluded. Neither side exceeds the budget: each gets floor(steps / batch) rollouts of its own batch.
Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from zerorl.classic.config import load_config  # noqa: E402
from zerorl.classic.evaluate import EVAL_SEED_OFFSET, evaluate  # noqa: E402
from zerorl.classic.ppo import train_ppo  # noqa: E402
from zerorl.classic.trpo import train_trpo  # noqa: E402


def linear(initial: float):
    """rl-zoo's `lin_<x>` schedule: x · progress_remaining (1 → 0)."""
    return lambda progress_remaining: progress_remaining * initial


# rl-baselines3-zoo hyperparams/ppo.yml and trpo.yml (tuned entries); everything else is the
# library default (MlpPolicy 64x64 tanh, ortho init, Adam; TRPO: target_kl 0.01, cg_max_steps 15,
# line search shrinking 0.8 x 10, advantage normalization).
SB3_HYPERPARAMS = {
    ("ppo", "CartPole-v1"): dict(
        n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
        learning_rate="lin_0.001", clip_range="lin_0.2",
    ),
    ("trpo", "CartPole-v1"): dict(
        n_envs=2, n_steps=512, batch_size=512, cg_damping=1e-3, gae_lambda=0.98, gamma=0.99,
        learning_rate=1e-3, n_critic_updates=20,
    ),
    ("ppo", "Acrobot-v1"): dict(
        normalize=True, n_envs=16, n_steps=256, gae_lambda=0.94, gamma=0.99, n_epochs=4, ent_coef=0.0
    ),
    ("trpo", "Acrobot-v1"): dict(normalize=True, n_envs=2, n_steps=1024),
}  # fmt: skip


def run_sb3(algo: str, env_id: str, steps: int, seed: int, eval_episodes: int) -> dict:
    from sb3_contrib import TRPO
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    kwargs = dict(SB3_HYPERPARAMS[(algo, env_id)])
    n_envs, normalize = kwargs.pop("n_envs"), kwargs.pop("normalize", False)
    for key in ("learning_rate", "clip_range"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = linear(float(kwargs[key].removeprefix("lin_")))
    batch = n_envs * kwargs["n_steps"]
    budget = (steps // batch) * batch

    start = time.perf_counter()
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if normalize:
        env = VecNormalize(env, gamma=kwargs.get("gamma", 0.99))
    model = {"ppo": PPO, "trpo": TRPO}[algo]("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **kwargs)
    model.learn(total_timesteps=budget)
    train_seconds = time.perf_counter() - start

    eval_env = make_vec_env(env_id, n_envs=1, seed=seed + EVAL_SEED_OFFSET)
    if normalize:
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
        eval_env.obs_rms = env.obs_rms
    returns, _ = evaluate_policy(
        model, eval_env, n_eval_episodes=eval_episodes, deterministic=True, return_episode_rewards=True
    )
    return {
        "return_mean": statistics.fmean(returns),
        "return_std": statistics.pstdev(returns),
        "train_seconds": train_seconds,
        "env_steps": model.num_timesteps,
    }


def run_zerorl(algo: str, env_id: str, steps: int, seed: int, eval_episodes: int) -> dict:
    config = load_config(algo, env_id, total_steps=steps, seed=seed, progress=False)
    start = time.perf_counter()
    agent, normalizer = {"ppo": train_ppo, "trpo": train_trpo}[algo](config, None)
    train_seconds = time.perf_counter() - start
    returns = evaluate(agent, env_id, normalizer, eval_episodes, seed, config.vectorization_mode)
    return {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "train_seconds": train_seconds,
        "env_steps": config.num_iterations * config.batch_size,
    }


def zerorl_hyperparams(algo: str, env_id: str) -> str:
    config = load_config(algo, env_id)
    keys = {
        "ppo": ("num_envs", "num_steps", "num_minibatches", "update_epochs", "gamma", "gae_lambda",
                "learning_rate", "anneal_lr", "clip_coef", "anneal_clip", "clip_vloss", "ent_coef",
                "max_grad_norm", "normalize_obs", "normalize_reward"),
        "trpo": ("num_envs", "num_steps", "gamma", "gae_lambda", "max_kl", "cg_iters", "cg_damping",
                 "max_backtracks", "critic_learning_rate", "critic_epochs", "critic_minibatch_size",
                 "normalize_obs", "normalize_reward"),
    }[algo]  # fmt: skip
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys)


def append_section(path: Path, text: str) -> None:
    """Append our section; create the file with its header if missing, never rewrite other sections."""
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with open(path, "a") as handle:
        handle.write("\n" + text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", default=["ppo", "trpo"], choices=["ppo", "trpo"])
    parser.add_argument("--env", default="CartPole-v1", choices=sorted({e for _, e in SB3_HYPERPARAMS}))
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--results", default=str(REPO_ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-append", action="store_true", help="print only; do not touch RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # both sides: small MLPs run fastest on one thread, and the runs are comparable

    rows, results = [], {}
    for algo in args.algos:
        for index, seed in enumerate(args.seeds):
            order = ("sb3", "zerorl") if index % 2 == 0 else ("zerorl", "sb3")
            for side in order:
                runner = run_sb3 if side == "sb3" else run_zerorl
                result = runner(algo, args.env, args.steps, seed, args.eval_episodes)
                results[(algo, side, seed)] = result
                print(
                    f"{algo:4s} {side:6s} seed {seed}: return {result['return_mean']:7.1f} ± "
                    f"{result['return_std']:5.1f}  steps {result['env_steps']}  train {result['train_seconds']:6.1f} s",
                    flush=True,
                )
            sb3, ours = results[(algo, "sb3", seed)], results[(algo, "zerorl", seed)]
            rows.append(
                f"| {algo} | {seed} | {sb3['return_mean']:.1f} ± {sb3['return_std']:.1f} | "
                f"{ours['return_mean']:.1f} ± {ours['return_std']:.1f} | {sb3['train_seconds']:.1f} | "
                f"{ours['train_seconds']:.1f} | {ours['train_seconds'] / sb3['train_seconds']:.2f} |"
            )
        sb3_runs = [results[(algo, "sb3", s)] for s in args.seeds]
        our_runs = [results[(algo, "zerorl", s)] for s in args.seeds]
        sb3_time = statistics.fmean(r["train_seconds"] for r in sb3_runs)
        our_time = statistics.fmean(r["train_seconds"] for r in our_runs)
        sb3_return = statistics.fmean(r["return_mean"] for r in sb3_runs)
        our_return = statistics.fmean(r["return_mean"] for r in our_runs)
        rows.append(
            f"| **{algo} mean** | {len(args.seeds)} seeds | {sb3_return:.1f} (min "
            f"{min(r['return_mean'] for r in sb3_runs):.1f}) | {our_return:.1f} (min "
            f"{min(r['return_mean'] for r in our_runs):.1f}) | {sb3_time:.1f} | {our_time:.1f} | "
            f"**{our_time / sb3_time:.2f}** |"
        )

    header = (
        "| algo | seed | SB3 eval return | zerorl eval return | SB3 train s | zerorl train s | "
        "wall-clock ratio zerorl/SB3 |\n|---|---|---|---|---|---|---|"
    )
    settings = [f"- {algo} SB3 (rl-zoo): {SB3_HYPERPARAMS[(algo, args.env)]}" for algo in args.algos]
    settings += [f"- {algo} zerorl (zerorl/configs/classic): {zerorl_hyperparams(algo, args.env)}" for algo in args.algos]
    import sb3_contrib
    import stable_baselines3

    section = "\n".join(
        [
            f"## Classic control: zerorl vs Stable-Baselines3 on {args.env}, {args.steps} env steps "
            f"({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            f"`python benchmarks/classic_vs_sb3.py --env {args.env} --steps {args.steps} --seeds "
            f"{' '.join(map(str, args.seeds))}`; machine: {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, stable-baselines3 "
            f"{stable_baselines3.__version__}, sb3-contrib {sb3_contrib.__version__}. Eval: "
            f"{args.eval_episodes} deterministic episodes after training. Train seconds exclude evaluation. "
            "Runs alternate SB3/zerorl per seed.",
            "",
            header,
            *rows,
            "",
            "Hyperparameters:",
            *settings,
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
