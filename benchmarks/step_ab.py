"""Before and after, side by side: zerorl's GRPO step at another git revision against this working tree.

    python benchmarks/step_ab.py --base HEAD~1                     # both benchmark models, 2 rounds
    python benchmarks/step_ab.py --base 6450c59 --models qwen2-31.5m --rounds 3 --extra bf16=true
    python benchmarks/step_ab.py --base HEAD --base-extra ref_offload=false      # an option, same code
    python benchmarks/step_ab.py --base HEAD --base-extra ref_offload=false --models \
        --model-dir DIR --prompts 2 --generations 4 --completion-length 16 --steps 3   # a big model, smaller steps

A speed-up is claimed against the code it replaces, measured in the same minutes on the same machine:
the machines here are shared and their speed drifts by tens of percent over an hour, so numbers from
two separate runs compare the neighbours as much as the code. This script checks ``--base`` out into a
temporary git worktree and runs `zerorl train --task arithmetic` from it and from this checkout in fresh
processes, alternating (base, new, base, new, ...), on the models and settings of benchmarks/vs_trl.py
(8 prompts × G = 8, 32 new tokens, β = 0.04, μ = 1, fp32, 1 warm-up + 5 timed steps per run; --prompts,
--generations, --completion-length and --steps change them, e.g. for a big model in --model-dir). With
``--base-extra`` the base side also gets those overrides: ``--base HEAD --base-extra key=value`` measures an
option against its default on the same code. It prints
s/step, the rollout and training phases, completion tokens/s and peak RSS of each side and the new/base
ratios, and appends the table to benchmarks/RESULTS.md.

Both sides run on the same interpreter and packages (this checkout's .venv); only zerorl's own code
differs. Sampling streams may differ between revisions (a change to the decode changes which tokens are
drawn), so the tokens/s column divides each side's own token count by its own time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_trl  # noqa: E402

COLUMNS = ("s/step", "rollout s", "training s", "tokens/s", "peak RSS MB")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=vs_trl.REPO_ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def checkout(revision: str) -> tuple[Path, str]:
    """``revision`` in a detached worktree under benchmarks/_work; returns (its path, its short hash)."""
    try:
        commit = _git("rev-parse", "--short", f"{revision}^{{commit}}")
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"--base {revision!r} is not a commit of this repository ({error.stderr.strip()}). "
                         "Fix: pass a commit, tag or branch, e.g. --base HEAD~1.") from None
    path = vs_trl.WORK_DIR / f"ab-{commit}"
    if path.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=vs_trl.REPO_ROOT)
        shutil.rmtree(path, ignore_errors=True)
    _git("worktree", "add", "--detach", str(path), commit)
    return path, commit


def describe(runs: list[dict]) -> dict[str, float]:
    """vs_trl.aggregate's pooled s/step, tokens/s and worst RSS, plus the two phases per timed step."""
    pooled = vs_trl.aggregate(runs)
    return {
        "s/step": pooled["seconds_per_step"],
        "rollout s": sum(t for run in runs for t in run["time/generate"]) / pooled["steps"],
        "training s": sum(t for run in runs for t in run["time/train"]) / pooled["steps"],
        "tokens/s": pooled["tokens_per_second"],
        "peak RSS MB": pooled["rss_max"],
    }


def format_table(name: str, base: dict, new: dict, base_label: str, rounds: int, timed_steps: int = 5) -> str:
    lines = [f"| {name} ({rounds} × {timed_steps} timed steps each) | " + " | ".join(COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|",
             f"| base {base_label} | " + " | ".join(_cell(c, base[c]) for c in COLUMNS) + " |",
             "| this tree | " + " | ".join(_cell(c, new[c]) for c in COLUMNS) + " |",
             "| this tree / base | " + " | ".join(f"{new[c] / base[c]:.3f}" for c in COLUMNS) + " |"]
    return "\n".join(lines)


def _cell(column: str, value: float) -> str:
    return f"{value:,.0f}" if column in ("tokens/s", "peak RSS MB") else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare against (e.g. HEAD~1)")
    parser.add_argument("--models", nargs="*", default=list(vs_trl.MODELS), choices=list(vs_trl.MODELS),
                        help="vs_trl's benchmark models (none: only --model-dir)")
    parser.add_argument("--model-dir", nargs="*", default=[], type=Path, help="other local model directories")
    parser.add_argument("--prompts", type=int, default=vs_trl.Settings.prompts)
    parser.add_argument("--generations", type=int, default=vs_trl.Settings.generations)
    parser.add_argument("--completion-length", type=int, default=vs_trl.Settings.completion_length)
    parser.add_argument("--steps", type=int, default=vs_trl.Settings.steps, help="per run, the first untimed")
    parser.add_argument("--rounds", type=int, default=2, help="base/new pairs per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", default="auto", choices=("auto", "jemalloc", "tcmalloc", "system"),
                        help="malloc of both sides, as ZERORL_ALLOCATOR picks it (default auto)")
    parser.add_argument("--extra", nargs="*", default=[], help="key=value overrides for both sides")
    parser.add_argument("--base-extra", nargs="*", default=[], help="key=value overrides for the base side only")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    settings = vs_trl.Settings(threads=args.threads, prompts=args.prompts, generations=args.generations,
                               completion_length=args.completion_length, steps=args.steps)
    models = vs_trl.build_models(args.models) if args.models else {}
    for directory in args.model_dir:
        if not (directory / "config.json").is_file():
            raise SystemExit(f"--model-dir {str(directory)!r} is not a model directory (no config.json).")
        models[directory.name] = directory.resolve()
    if not models:
        raise SystemExit("no models: give --models and/or --model-dir.")
    base_path, base_commit = checkout(args.base)
    head = _git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
    load_before = os.getloadavg()[0]
    preload = vs_trl.allocator_library(args.allocator)
    sections = []
    side_extra = {"base": tuple(args.base_extra), "new": ()}
    try:
        for name, model_dir in models.items():
            runs: dict[str, list[dict]] = {"base": [], "new": []}
            for round_index in range(args.rounds):
                for side, source in (("base", base_path), ("new", vs_trl.REPO_ROOT)):
                    print(f"[{name}] {side} (round {round_index + 1}/{args.rounds}) ...", flush=True)
                    result = vs_trl.run_zerorl(model_dir, settings.steps, settings.threads, settings.prompts,
                                               settings.generations, settings.completion_length, settings.beta,
                                               settings.learning_rate, tag=f"ab-{name}-{side}-{round_index}",
                                               extra=tuple(args.extra) + side_extra[side], source=source,
                                               preload=preload)
                    runs[side].append(result)
                    print(f"    {result['seconds_per_step']:.3f} s/step, peak RSS {result['peak_rss_mb']:,.0f} MB",
                          flush=True)
            base_label = base_commit + (f" {' '.join(args.base_extra)}" if args.base_extra else "")
            sections.append(format_table(name, describe(runs["base"]), describe(runs["new"]), base_label,
                                         args.rounds, settings.steps - 1))
            print("\n" + sections[-1] + "\n", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_path)], cwd=vs_trl.REPO_ROOT)
    header = (f"`python benchmarks/step_ab.py {' '.join(argv if argv is not None else sys.argv[1:])}`: base "
              f"{base_commit} against this tree ({head}{dirty}); {platform.machine()}, {os.cpu_count()} cores, "
              f"{settings.threads} torch threads, OMP_WAIT_POLICY={vs_trl.wait_policy()}, "
              f"{vs_trl.allocator_name(preload)}; {settings.prompts} prompts × G = {settings.generations}, "
              f"{settings.completion_length} new tokens, {settings.steps} steps per run (the first untimed)"
              f"{', ' + ' '.join(args.extra) if args.extra else ''}; order per round: base, this tree, "
              f"each in a fresh process. Load average (1 min) before {load_before:.2f}, after "
              f"{os.getloadavg()[0]:.2f}.")
    print(header)
    if not args.no_append:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with vs_trl.RESULTS.open("a") as handle:
            handle.write(f"\n## zerorl step, before and after (benchmarks/step_ab.py, {stamp})\n\n{header}\n\n"
                         + "\n\n".join(sections) + "\n")
        print(f"appended to {vs_trl.RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
