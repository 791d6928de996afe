"""The ``zerorl`` command.

    zerorl train   [--config FILE.yaml] [--model DIR_OR_ID] [--task NAME] [--output-dir DIR]
                   [--max-steps N] [--seed S] [--algo grpo|ppo|trpo] [--resume] [key=value ...]
    zerorl sft     [--task NAME] [--output-dir DIR] [key=value ...]
    zerorl eval    --model DIR [--task NAME] [key=value ...]
    zerorl classic --algo ppo|trpo --env ID [--steps N] [--seed S] [--output-dir DIR] [key=value ...]
    zerorl compare [--algos grpo,ppo,trpo] [--output-dir DIR] [--reuse] [key=value | ALGO.key=value ...]

With no arguments, ``zerorl train`` runs the embedded default: it builds (once, cached) a tiny
cold-start model, then trains it with GRPO on procedurally generated arithmetic and reports held-out
accuracy before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zerorl.config import ConfigError, TrainConfig, build_config, load_yaml, parse_overrides

TRAIN_FLAGS = ("model", "task", "output_dir", "max_steps", "seed", "algo")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of TrainConfig keys (see configs/)")
    parser.add_argument("--model", help="Hugging Face model directory or hub id (default: the embedded base)")
    parser.add_argument("--task", help="arithmetic | countdown | jsonl")
    parser.add_argument("--output-dir", dest="output_dir", help="run directory (default runs/train)")
    parser.add_argument("--max-steps", dest="max_steps", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--algo", choices=("grpo", "ppo", "trpo"))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="any TrainConfig key, TRL names where one exists (beta=0.0 num_generations=8 ...)")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    overrides = parse_overrides(args.overrides)
    for name in TRAIN_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    yaml_path = args.config
    if getattr(args, "resume", False):
        run_dir = Path(overrides.get("output_dir", TrainConfig.output_dir))
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--resume: {str(saved)!r} does not exist, so there is no run to continue in "
                              f"{str(run_dir)!r}. Fix: pass the --output-dir of an earlier run, or drop --resume.")
        # The saved config is the run's truth; explicit flags (e.g. a larger --max-steps) still win.
        merged = load_yaml(saved)
        if yaml_path:
            merged.update(load_yaml(yaml_path))
        config = build_config(TrainConfig, None, {**merged, **overrides})
        return config
    return build_config(TrainConfig, yaml_path, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    if config.algo == "grpo":
        from zerorl.lm.grpo import train
    elif config.algo == "ppo":
        from zerorl.lm.ppo import train
    else:
        from zerorl.lm.trpo import train
    summary = train(config, resume=args.resume)
    print(json.dumps({k: summary[k] for k in ("wall_seconds", "delta_accuracy_sampled", "delta_accuracy_greedy")
                      if k in summary}))
    print(f"run directory: {config.output_dir}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from zerorl.lm.sft import SFTConfig, default_cache_dir, ensure_base_model, run_sft

    overrides = parse_overrides(args.overrides)
    if args.task:
        overrides["task"] = args.task
    config = build_config(SFTConfig, args.config, overrides)
    output_dir = args.output_dir or config.output_dir  # the flag, else output_dir= / the YAML's key
    if output_dir:
        path = run_sft(config, output_dir)
    else:
        path = ensure_base_model(config.task, cache_dir=args.cache_dir or default_cache_dir(), config=config)
    print(f"base model: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from zerorl.lm.runtime import describe_eval, run_evaluation, setup_lm_run

    overrides = parse_overrides(args.overrides)
    overrides["model"] = args.model
    if args.output_dir or "output_dir" not in overrides:  # the flag, else an output_dir= key, else next to the model
        overrides["output_dir"] = args.output_dir or str(Path(args.model) / "eval")
    if args.task:
        overrides["task"] = args.task
    config = build_config(TrainConfig, None, overrides)
    run = setup_lm_run(config, resume=True)
    result = run_evaluation(run, "model")
    print(describe_eval("eval", result))
    out = Path(config.output_dir) / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")
    return 0


def cmd_classic(argv: list[str]) -> int:
    from zerorl.classic.cli import main as classic_main

    return classic_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerorl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    train = sub.add_parser("train", help="RL-train a causal LM (GRPO by default) on a task with verifiable answers")
    _add_train_flags(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")

    sft = sub.add_parser("sft", help="build the embedded cold-start base model (cached)")
    sft.add_argument("--config")
    sft.add_argument("--task")
    sft.add_argument("--output-dir", dest="output_dir", help="write here instead of the cache")
    sft.add_argument("--cache-dir", dest="cache_dir")
    sft.add_argument("overrides", nargs="*", metavar="key=value")

    evaluate = sub.add_parser("eval", help="held-out accuracy of a model (greedy, sampled, pass@k)")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--task")
    evaluate.add_argument("--output-dir", dest="output_dir")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")

    sub.add_parser("classic", help="PPO / TRPO on Gymnasium control tasks (zerorl classic --help)", add_help=False)
    sub.add_parser("compare", help="GRPO vs PPO vs TRPO on one task and budget: memory, time, accuracy "
                                   "(zerorl compare --help)", add_help=False)
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """Bad input a person can fix (exit code 2): config values, data rows, model paths, reward specs."""
    from zerorl.rewards.loading import RewardLoadError
    from zerorl.tasks.user_data import DataFormatError

    return ConfigError, FileNotFoundError, DataFormatError, RewardLoadError


def _run_errors() -> tuple[type[Exception], ...]:
    """A run stopped for a reason its message explains (exit code 1): no traceback needed."""
    from zerorl.rewards.isolation import RewardTimeoutError
    from zerorl.rewards.reward_set import RewardFunctionError

    errors: list[type[Exception]] = [RewardFunctionError, RewardTimeoutError]
    if "zerorl.lm.runtime" in sys.modules:  # loaded by every LM trainer; not imported here (torch)
        errors.append(sys.modules["zerorl.lm.runtime"].NonFiniteLossError)
    if "zerorl.checkpoint" in sys.modules:
        errors.append(sys.modules["zerorl.checkpoint"].CheckpointError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "classic":
        return cmd_classic(argv[1:])
    if argv and argv[0] == "compare":
        from zerorl.lm.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return {"train": cmd_train, "sft": cmd_sft, "eval": cmd_eval}[args.command](args)
    except Exception as err:
        if isinstance(err, _input_errors()):
            print(f"zerorl {args.command}: error: {err}", file=sys.stderr)
            return 2
        if isinstance(err, _run_errors()):
            print(f"zerorl {args.command}: stopped: {err}", file=sys.stderr)
            return 1
        raise


def entry() -> int:
    """The installed ``zerorl`` command: ``main`` under the malloc ``ZERORL_ALLOCATOR`` picks (default: jemalloc or
    tcmalloc where the machine has one), for which the process re-executes itself once (zerorl.allocator)."""
    from zerorl.allocator import AllocatorError, relaunch

    try:
        relaunch([sys.executable, "-m", "zerorl.cli", *sys.argv[1:]])
    except AllocatorError as err:
        print(f"zerorl: error: {err}", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(entry())
