"""``zerorl compare``: GRPO, PPO and TRPO on the same task, model and budget, measured side by side.

    zerorl compare [--algos grpo,ppo,trpo] [--output-dir runs/compare] [--reuse]
                   [key=value ...]  [ppo.key=value ...]  [trpo.key=value ...]

Every algorithm runs in its own fresh Python process (so that each peak-memory number is its own) with
the same TrainConfig: same task, base model, prompts per step, samples per prompt and number of steps.
``key=value`` applies to all, ``ALGO.key=value`` to one algorithm (on top of ``DEFAULT_RECIPES``). The held-out accuracy
before training is measured once (the same base model and seed for all). Writes comparison.json,
comparison.md (the table) and comparison.png (the figure) into the output directory.

Measured per algorithm:
  models held              the models in memory during training (policy, reference, critic, reward model)
  trainable / frozen       parameter counts over those models (shared tensors counted once)
  model state              bytes of parameters + gradients + optimizer state of those models
  peak RSS                 the process's high-water mark of resident memory (VmHWM) over setup + training
  s/step                   median wall time of a training step (sampling + scoring + update)
  held-out accuracy        after the budget, at the training temperature and greedy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ALGOS = ("grpo", "ppo", "trpo")

# Per-algorithm settings tuned on the default task (benchmarks/RESULTS.md); ALGO.key=value overrides them.
# GRPO runs with the TrainConfig defaults. PPO: a lower learning rate than GRPO's and 2 epochs × 2
# minibatches per batch (the same samples, more updates); the critic learns faster than the policy.
# TRPO: one natural-gradient step of mean KL ≤ δ = 0.001 per batch with PPO's critic and GAE (critic learning
# rate as PPO's; learning_rate plays no part). trpo.trpo_advantages=group drops the critic for GRPO's advantages:
# also ≥ +10 points, about 5 fewer than the critic after 150 steps (two seeds each, benchmarks/RESULTS.md).
DEFAULT_RECIPES: dict[str, dict[str, str]] = {
    "grpo": {},
    "ppo": {"learning_rate": "5e-5", "num_iterations": "2", "num_minibatches": "2", "critic_learning_rate": "1e-3"},
    "trpo": {"trpo_advantages": "gae", "critic_learning_rate": "1e-3", "max_kl": "0.001"},
}


# ---------------------------------------------------------------------------------------------
# Worker side: one algorithm (or the base model's evaluation) in a fresh process
# ---------------------------------------------------------------------------------------------

def _memory_kib(field: str) -> int:
    """VmHWM / VmRSS of this process in KiB (Linux); falls back to ru_maxrss elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def run_worker(algo: str, output_dir: Path, overrides: dict) -> dict:
    import torch

    from zerorl.config import TrainConfig, build_config
    from zerorl.lm.runtime import run_evaluation, setup_lm_run

    start_rss = _memory_kib("VmRSS")
    values = {**overrides, "output_dir": str(output_dir / algo), "algo": "grpo" if algo == "base" else algo}
    if algo == "base":  # held-out accuracy of the starting model, once for all algorithms
        config = build_config(TrainConfig, None, values)
        run = setup_lm_run(config, resume=True)
        return {"eval": run_evaluation(run, "before")}

    values.update({"eval_at_start": False, "eval_at_end": False, "plots": False})
    config = build_config(TrainConfig, None, values)
    if algo == "grpo":
        from zerorl.lm.grpo import train
    elif algo == "ppo":
        from zerorl.lm.ppo import train
    else:
        from zerorl.lm.trpo import train
    started = time.perf_counter()
    summary = train(config)
    wall = time.perf_counter() - started
    # Read before the evaluation below, whose batched generation would otherwise set the peak.
    peak_rss = _memory_kib("VmHWM")
    peak_cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rows = [json.loads(line) for line in (output_dir / algo / "metrics.jsonl").read_text().splitlines()]
    models, state_bytes = summary["models"], summary["model_state_bytes"]

    eval_values = {**values, "model": str(output_dir / algo / "final"), "output_dir": str(output_dir / algo / "eval")}
    eval_run = setup_lm_run(build_config(TrainConfig, None, eval_values), resume=True)
    return {
        "algo": algo, "models": models, "model_state_bytes": state_bytes,
        "peak_rss_kib": peak_rss, "start_rss_kib": start_rss, "peak_cuda_bytes": peak_cuda,
        "step_time_median": statistics.median(r["step_time"] for r in rows),
        "step_time_mean": statistics.fmean(r["step_time"] for r in rows),
        "train_time_median": statistics.median(r["time/train"] for r in rows),
        "steps": len(rows), "train_wall_seconds": wall,
        "eval": run_evaluation(eval_run, "after"),
        "config": {k: getattr(config, k) for k in ("task", "max_steps", "prompts_per_step", "num_generations",
                                                   "max_completion_length", "learning_rate", "beta", "num_threads")},
    }


# ---------------------------------------------------------------------------------------------
# Parent side: run the workers, then the table and the figure
# ---------------------------------------------------------------------------------------------

def _split_overrides(pairs: list[str], algos: list[str]) -> tuple[dict, dict[str, dict]]:
    from zerorl.config import ConfigError, parse_overrides

    shared, per_algo = {}, {a: dict(DEFAULT_RECIPES[a]) for a in algos}
    for key, value in parse_overrides(pairs).items():
        prefix, dot, name = key.partition(".")
        if dot and prefix in ALGOS:
            if prefix in per_algo:
                per_algo[prefix][name] = value
        elif dot:
            raise ConfigError(f"override {key!r}: the prefix must be one of {', '.join(ALGOS)} (e.g. ppo.lam=1.0).")
        else:
            shared[key] = value
    return shared, per_algo


def _run_worker_process(algo: str, output_dir: Path, overrides: dict, reuse: bool = False) -> dict:
    result_file = output_dir / f"{algo}.result.json"
    if reuse and result_file.is_file():  # measured by an earlier invocation with --reuse
        print(f"[compare] {algo}: reusing {result_file}", flush=True)
        return json.loads(result_file.read_text())
    cmd = [sys.executable, "-m", "zerorl.lm.compare", "--worker", algo, "--output-dir", str(output_dir),
           "--overrides-json", json.dumps(overrides), "--result-file", str(result_file)]
    print(f"[compare] {algo}: {' '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(result_file.read_text())


def _mib(kib_or_bytes: float, kib: bool = False) -> str:
    return f"{kib_or_bytes / 1024:.0f}" if kib else f"{kib_or_bytes / 2**20:.1f}"


def format_table(before: dict, results: list[dict]) -> str:
    lines = [
        "| algorithm | models held in memory | trainable params | frozen params | model state MiB "
        "(params+grads+optimizer) | peak RSS MiB | s/step (median) | held-out acc. T=1: before → after (Δ) "
        "| greedy: before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        models = r["models"]
        trainable = sum(m["trainable"] for m in models.values())
        frozen = sum(m["frozen"] for m in models.values())
        held = " + ".join(models)
        after = r["eval"]
        lines.append(
            f"| {r['algo'].upper()} | {len(models)}: {held} | {trainable:,} | {frozen:,} | "
            f"{_mib(r['model_state_bytes'])} | {_mib(r['peak_rss_kib'], kib=True)} | {r['step_time_median']:.2f} | "
            f"{100 * before['accuracy_sampled']:.1f}% → {100 * after['accuracy_sampled']:.1f}% "
            f"({100 * (after['accuracy_sampled'] - before['accuracy_sampled']):+.1f}) | "
            f"{100 * before['accuracy_greedy']:.1f}% → {100 * after['accuracy_greedy']:.1f}% |")
    return "\n".join(lines)


def savings_lines(results: list[dict]) -> list[str]:
    """GRPO's saving against PPO, in words, from the measured numbers."""
    by = {r["algo"]: r for r in results}
    if "grpo" not in by or "ppo" not in by:
        return []
    g, p = by["grpo"], by["ppo"]

    def total(r):
        return sum(m["trainable"] + m["frozen"] for m in r["models"].values())

    return [
        f"- parameters held: GRPO {total(g):,} vs PPO {total(p):,} "
        f"(GRPO holds {100 * (1 - total(g) / total(p)):.0f}% fewer; PPO's extra is its critic).",
        f"- model state: GRPO {_mib(g['model_state_bytes'])} MiB vs PPO {_mib(p['model_state_bytes'])} MiB "
        f"({100 * (1 - g['model_state_bytes'] / p['model_state_bytes']):.0f}% less).",
        f"- peak RSS: GRPO {_mib(g['peak_rss_kib'], kib=True)} MiB vs PPO {_mib(p['peak_rss_kib'], kib=True)} MiB "
        f"({_mib(p['peak_rss_kib'] - g['peak_rss_kib'], kib=True)} MiB or "
        f"{100 * (1 - g['peak_rss_kib'] / p['peak_rss_kib']):.0f}% less; of each, ≈{_mib(g['start_rss_kib'], kib=True)} "
        "MiB is the Python/PyTorch runtime before any model is loaded).",
    ]


def plot(before: dict, results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["algo"].upper() for r in results]
    colors = {"policy": "#4C72B0", "reference": "#DD8452", "critic": "#C44E52", "reward_model": "#8172B3"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    bottoms = [0.0] * len(results)
    for role, color in colors.items():
        heights = [(r["models"].get(role, {}).get("trainable", 0) + r["models"].get(role, {}).get("frozen", 0)) / 1e6
                   for r in results]
        if any(heights):
            ax.bar(names, heights, bottom=bottoms, color=color, label=role)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_title("parameters held in memory (M)")
    ax.legend(fontsize=8)
    axes[1].bar(names, [(r["peak_rss_kib"] - r["start_rss_kib"]) / 1024 for r in results], color="#BBBBBB",
                label="peak RSS − RSS after importing torch")
    axes[1].bar(names, [r["model_state_bytes"] / 2**20 for r in results], color="#55A868",
                label="model state (params + grads + optimizer)")
    axes[1].set_title("memory (MiB)")
    axes[1].set_ylim(0, 1.35 * max((r["peak_rss_kib"] - r["start_rss_kib"]) / 1024 for r in results))
    axes[1].legend(fontsize=8, loc="upper left")
    axes[2].bar(names, [r["step_time_median"] for r in results], color="#937860")
    axes[2].set_title("seconds per step (median)")
    ax = axes[3]
    ax.axhline(100 * before["accuracy_sampled"], color="black", linestyle="--", label="before RL")
    ax.bar(names, [100 * r["eval"]["accuracy_sampled"] for r in results], color="#4C72B0", label="after")
    ax.set_title(f"held-out accuracy at T={before['temperature']} (%)")
    ax.legend(fontsize=8)
    fig.suptitle("GRPO vs PPO vs TRPO: same task, model, samples and steps (measured)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(algos: list[str], output_dir: Path, shared: dict, per_algo: dict[str, dict], reuse: bool = False) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    before = _run_worker_process("base", output_dir, shared, reuse)["eval"]
    results = [_run_worker_process(algo, output_dir, {**shared, **per_algo.get(algo, {})}, reuse) for algo in algos]
    table = format_table(before, results)
    report = {"before": before, "results": results, "table": table, "savings": savings_lines(results),
              "overrides": {"shared": shared, **per_algo}}
    (output_dir / "comparison.json").write_text(json.dumps(report, indent=2, default=str))
    (output_dir / "comparison.md").write_text(table + "\n\n" + "\n".join(report["savings"]) + "\n")
    plot(before, results, output_dir / "comparison.png")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zerorl compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of grpo,ppo,trpo")
    parser.add_argument("--output-dir", dest="output_dir", default="runs/compare")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the measurements already in --output-dir (ALGO.result.json) instead of rerunning")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--overrides-json", dest="overrides_json", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", dest="result_file", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="TrainConfig keys for all algorithms; ALGO.key=value for one (e.g. ppo.learning_rate=5e-5)")
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir)

    if args.worker:  # internal: one measurement in this fresh process
        result = run_worker(args.worker, output_dir, json.loads(args.overrides_json or "{}"))
        Path(args.result_file).write_text(json.dumps(result, default=str))
        return 0

    from zerorl.config import ConfigError

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    try:
        unknown = [a for a in algos if a not in ALGOS]
        if unknown or not algos:
            raise ConfigError(f"--algos {args.algos!r}: unknown {unknown}. Fix: a comma-separated subset of "
                              f"{', '.join(ALGOS)}.")
        shared, per_algo = _split_overrides(args.overrides, algos)
    except ConfigError as err:
        print(f"zerorl compare: error: {err}", file=sys.stderr)
        return 2
    report = compare(algos, output_dir, shared, per_algo, reuse=args.reuse)
    print(report["table"])
    print("\n".join(report["savings"]))
    print(f"written: {output_dir / 'comparison.md'}, {output_dir / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
