"""Side by side with Hugging Face TRL's GRPOTrainer on identical work: same models, prompts, rewards,
G, completion length, β, μ, fp32 on the CPU, the same number of torch threads.

    python benchmarks/vs_trl.py                      # both models, 1 warm-up + 5 timed steps per run
    python benchmarks/vs_trl.py --models qwen2-1.0m --no-append

What it does:
  1. builds the two model directories under benchmarks/_work/models (Qwen2, 83-token character
     vocabulary: ~1.0M and ~31.5M parameters) unless they exist;
  2. creates benchmarks/.venv-trl (python -m venv; torch==2.13.0 CPU first, so pip never pulls a CUDA
     build, then trl==1.16.0) unless it already holds those versions;
  3. per model, runs in fresh processes, alternating: TRL with gradient checkpointing on, zerorl,
     zerorl with bf16=true (autocast, reported beside; --no-bf16 skips it), TRL with it off, zerorl-lean
     (cpu_workers=1 micro_batch_size=8: zerorl's memory setting, as checkpointing is TRL's; --no-lean skips
     it), zerorl (× --rounds), so that a change in machine load hits every system alike;
  4. prints s/step, completion tokens/s and peak RSS per system, and the ratios against TRL at its best
     (speed against its faster setting, memory against its leaner one); appends them to RESULTS.md.

Threads: both sides get the same torch thread count and the same OMP_WAIT_POLICY: this environment's, by
default none (libgomp's own policy: a waiting thread spins briefly, then sleeps), as a user's shell has it;
--omp-wait-policy sets one for both. Measured here (session 8): TRL's 1.0M-model step takes 0.32 s with
none, 0.33–0.43 s with ACTIVE and 0.59–0.64 s with PASSIVE, so a forced PASSIVE — this script's default
until session 8 — measured TRL well below its best; zerorl (single-threaded CPU workers) is unaffected by
PASSIVE and slower with ACTIVE. On a machine that other work shares, spinning threads can collapse
(floor.py); compare the systems there with --omp-wait-policy PASSIVE and say so.

Timing: the first step of every run is a warm-up and not counted. A step is the whole GRPO step:
generation, rewards, reference pass, policy forward/backward and the optimizer step (TRL: a
TrainerCallback from on_step_begin to on_step_end; zerorl: `step_time` of metrics.jsonl). Peak RSS is
the whole process's ru_maxrss, from start-up through the end of the run (zerorl's includes writing its
final checkpoint; TRL saves nothing). zerorl runs as `zerorl train` (zerorl.cli.main) in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / "_work"
TRL_VENV = BENCH_DIR / ".venv-trl"
TRL_RUNNER = BENCH_DIR / "_trl_grpo_runner.py"
RESULTS = BENCH_DIR / "RESULTS.md"
TORCH_VERSION, TRL_VERSION = "2.13.0", "1.16.0"

# 81 characters + <pad> + <|endoftext|> = 83 tokens: digits, letters, space, newline and the punctuation
# the arithmetic task, its template and the R1 tags use.
BENCH_CHARSET = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ \n"
                 "+-*/=<>?!.,:;()'\"")

# The models. MLP width 4 × hidden puts them at 0.996M and 31.52M parameters.
MODELS = {
    "qwen2-1.0m": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "qwen2-31.5m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2048),
}


@dataclass(frozen=True)
class Settings:
    steps: int = 6  # 1 warm-up + 5 timed
    threads: int = 2
    prompts: int = 8
    generations: int = 8
    completion_length: int = 32
    beta: float = 0.04
    learning_rate: float = 2e-4


def build_models(names=None, root: Path = WORK_DIR / "models") -> dict[str, Path]:
    """The benchmark model directories, built (seed 0, random init) where missing."""
    sys.path.insert(0, str(REPO_ROOT))
    from zerorl.lm.models import build_tiny_model

    out = {}
    for name in names or MODELS:
        path = root / name
        if not (path / "config.json").is_file():
            build_tiny_model(path, arch="qwen2", tokenizer="char", charset=BENCH_CHARSET, seed=0, **MODELS[name])
        out[name] = path
    return out


def _venv_python() -> Path:
    return TRL_VENV / "bin" / "python"


def _venv_versions() -> tuple[str, str] | None:
    if not _venv_python().is_file():
        return None
    probe = subprocess.run([str(_venv_python()), "-c", "import torch, trl; print(torch.__version__, trl.__version__)"],
                           capture_output=True, text=True)
    return tuple(probe.stdout.split()) if probe.returncode == 0 else None


def ensure_trl_venv() -> Path:
    """benchmarks/.venv-trl with torch 2.13.0 (CPU) and trl 1.16.0; created when absent."""
    versions = _venv_versions()
    if versions and versions[0].split("+")[0] == TORCH_VERSION and versions[1] == TRL_VERSION:
        return _venv_python()
    print(f"creating {TRL_VENV} (torch {TORCH_VERSION} CPU, then trl {TRL_VERSION}); one time, a few minutes",
          flush=True)
    if not _venv_python().is_file():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(_venv_python()), "-m", "pip", "install", "--quiet"]
    # torch first, pinned to the CPU build: installed after trl, pip would resolve trl's torch
    # requirement to the default (CUDA) wheel, gigabytes of libraries this benchmark never uses.
    if subprocess.run(pip + [f"torch=={TORCH_VERSION}+cpu"]).returncode != 0:
        subprocess.run(pip + [f"torch=={TORCH_VERSION}", "--index-url", "https://download.pytorch.org/whl/cpu"],
                       check=True)
    subprocess.run(pip + [f"trl=={TRL_VERSION}"], check=True)
    if _venv_versions() is None:
        raise RuntimeError(f"{TRL_VENV} was created but cannot import torch and trl; delete it and run again.")
    return _venv_python()


def allocator_library(choice: str) -> str | None:
    """The malloc library a child runs on for a ZERORL_ALLOCATOR value (None: glibc's), as the zerorl command
    picks it (zerorl.allocator): the children here call zerorl's main() in-process, which never re-executes."""
    from zerorl.allocator import resolve

    return resolve(choice)[1]


def allocator_name(library: str | None) -> str:
    return "glibc's malloc" if library is None else Path(library).name


def _child_env(threads: int, preload: str | None = None) -> dict[str, str]:
    env = dict(os.environ)  # OMP_WAIT_POLICY as this process has it (main: --omp-wait-policy), for both sides
    env.pop("LD_PRELOAD", None)  # the allocator is chosen per side: ``preload``
    if preload:
        env["LD_PRELOAD"] = preload
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    return env


def wait_policy() -> str:
    """The OMP_WAIT_POLICY the runs get, for the reports."""
    return os.environ.get("OMP_WAIT_POLICY", "unset: libgomp's default, spin briefly then sleep")


def _run(cmd: list[str], env: dict, log: Path, cwd: Path = REPO_ROOT) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        proc = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); log {log}:\n{tail}")


def _summary(system: str, step_seconds: list[float], tokens: list[int], peak_rss_mb: float) -> dict:
    """Drop the warm-up step; completion tokens/s over the timed steps."""
    timed_seconds, timed_tokens = step_seconds[1:], tokens[1:]
    if not timed_seconds or len(timed_tokens) != len(timed_seconds):
        raise RuntimeError(f"{system}: {len(step_seconds)} step times and {len(tokens)} token counts; need "
                           "at least 2 steps with one count each.")
    return {"system": system, "step_seconds": timed_seconds, "completion_tokens": timed_tokens,
            "seconds_per_step": sum(timed_seconds) / len(timed_seconds),
            "tokens_per_second": sum(timed_tokens) / sum(timed_seconds), "peak_rss_mb": peak_rss_mb}


def run_trl(model_dir: Path, checkpointing: bool, settings: Settings, tag: str, preload: str | None = None) -> dict:
    python = ensure_trl_venv()
    out = WORK_DIR / "runs" / f"{tag}.json"
    cmd = [str(python), str(TRL_RUNNER), "--model", str(model_dir), "--out", str(out),
           "--gradient-checkpointing", "on" if checkpointing else "off", "--steps", str(settings.steps),
           "--threads", str(settings.threads), "--prompts", str(settings.prompts),
           "--generations", str(settings.generations), "--completion-length", str(settings.completion_length),
           "--beta", str(settings.beta), "--learning-rate", str(settings.learning_rate)]
    _run(cmd, _child_env(settings.threads, preload), out.with_suffix(".log"))
    raw = json.loads(out.read_text())
    result = _summary(raw["system"], raw["step_seconds"], raw["completion_tokens"], raw["peak_rss_mb"])
    result["versions"] = raw["versions"]
    return result


# `zerorl train` in-process in a fresh interpreter, then this process's peak RSS on the last line.
_ZERORL_CHILD = (
    "import json, resource, sys\n"
    "from zerorl.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "torch = sys.modules.get('torch')\n"
    "if torch is not None and torch.cuda.is_initialized():\n"
    "    print('PEAK_CUDA_BYTES', torch.cuda.max_memory_allocated())\n"
    "sys.exit(code)\n"
)


def run_zerorl(model_dir: Path, steps: int = 6, threads: int = 2, prompts: int = 8, generations: int = 8,
               completion_length: int = 32, beta: float = 0.04, learning_rate: float = 2e-4,
               tag: str = "zerorl", extra: tuple[str, ...] = (), source: Path = REPO_ROOT,
               preload: str | None = None) -> dict:
    """`zerorl train --task arithmetic` on `model_dir` in a fresh process; timed steps exclude the first.

    ``source``: the checkout whose zerorl runs (the child starts there, and `python -c` puts its working
    directory first on the import path; benchmarks/step_ab.py points it at another revision)."""
    run_dir = WORK_DIR / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-c", _ZERORL_CHILD, "train", "--model", str(model_dir), "--task", "arithmetic",
           "--output-dir", str(run_dir), "--max-steps", str(steps), "--seed", "0",
           f"prompts_per_step={prompts}", f"num_generations={generations}",
           f"max_completion_length={completion_length}", f"beta={beta}", "num_iterations=1",
           f"learning_rate={learning_rate}", "loss_type=grpo", "template=compact", f"num_threads={threads}",
           "device=cpu", "dtype=float32", "eval_at_start=false", "eval_at_end=false", "plots=false",
           "save_steps=0", "progress=false", "num_eval=8", *extra]
    log = WORK_DIR / "runs" / f"{tag}.log"
    _run(cmd, _child_env(threads, preload), log, cwd=source)
    peak_kb = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("PEAK_RSS_KB")]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = _summary("zerorl", [row["step_time"] for row in rows], [int(row["num_tokens"]) for row in rows],
                      int(peak_kb[-1]) / 1024)
    for phase in ("time/generate", "time/train"):  # per timed step, as step_seconds
        result[phase] = [row[phase] for row in rows[1:]]
    peak_cuda = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("PEAK_CUDA_BYTES")]
    if peak_cuda:  # torch.cuda.max_memory_allocated: the tensors' peak on the GPU (not the driver's reserve)
        result["peak_cuda_mb"] = int(peak_cuda[-1]) / 2**20
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a random model: nothing to keep
    return result


ZERORL_EXTRA = {"zerorl": (), "zerorl-bf16": ("bf16=true",),
                "zerorl-lean": ("cpu_workers=1", "micro_batch_size=8")}


def aggregate(runs: list[dict]) -> dict:
    """Pool the timed steps of every run of one system; RSS as the range over runs."""
    seconds = [s for run in runs for s in run["step_seconds"]]
    tokens = [t for run in runs for t in run["completion_tokens"]]
    rss = [run["peak_rss_mb"] for run in runs]
    return {"runs": len(runs), "steps": len(seconds), "seconds_per_step": sum(seconds) / len(seconds),
            "median_step": statistics.median(seconds), "min_step": min(seconds), "max_step": max(seconds),
            "tokens_per_step": sum(tokens) / len(tokens), "tokens_per_second": sum(tokens) / sum(seconds),
            "rss_min": min(rss), "rss_max": max(rss)}


def _rss(stats: dict) -> str:
    low, high = stats["rss_min"], stats["rss_max"]
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}"


def format_model_table(name: str, stats: dict[str, dict], floor_s: dict[str, float] | None) -> str:
    """One model's table; `floor_s` maps a system to the fp32 floor of a step with its token counts."""
    trl = {key: value for key, value in stats.items() if key.startswith("trl")}
    fastest = max(trl.values(), key=lambda s: s["tokens_per_second"])
    leanest = min(trl.values(), key=lambda s: s["rss_max"])
    lines = ["| system | runs × timed steps | s/step (mean; min–max) | completion tokens/step | completion tokens/s "
             "| peak RSS MB | " + ("fraction of fp32 floor |" if floor_s else ""),
             "|---|---|---|---|---|---|" + ("---|" if floor_s else "")]
    for system, s in stats.items():
        cells = [f"{s['runs']} × {s['steps'] // s['runs']}",
                 f"{s['seconds_per_step']:.3f} ({s['min_step']:.3f}–{s['max_step']:.3f})",
                 f"{s['tokens_per_step']:.0f}", f"{s['tokens_per_second']:,.0f}", _rss(s)]
        if floor_s:
            # An fp32 floor says nothing of a bf16 run.
            cells.append("—" if system == "zerorl-bf16" else f"{floor_s[system] / s['seconds_per_step']:.1%}")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    z = stats["zerorl"]
    speed = z["tokens_per_second"] / fastest["tokens_per_second"]
    memory = z["rss_max"] / leanest["rss_max"]
    best_speed = [k for k, v in trl.items() if v is fastest][0]
    best_memory = [k for k, v in trl.items() if v is leanest][0]
    lines.append("")
    lines.append(f"**{name}: zerorl / TRL-best completion tokens/s = {speed:.2f}×** (vs {best_speed}; target ≥ "
                 f"{3.0 if '1.0m' in name else 1.5}×); **peak RSS zerorl / TRL-leanest = {memory:.2f}** (vs "
                 f"{best_memory}; target ≤ 0.70)"
                 + (f"; fp32 FLOP floor of the step {floor_s['zerorl']:.3f} s (prompt re-encoded per completion, "
                    "as TRL computes it)" if floor_s else ""))
    if floor_s and "zerorl-own-flops" in floor_s:
        own = floor_s["zerorl-own-flops"]
        lines[-1] += (f"; of zerorl's own FLOPs (each prompt once per group) {own:.3f} s, zerorl at "
                      f"{own / z['seconds_per_step']:.1%} of it")
    if "zerorl-lean" in stats:
        lean = stats["zerorl-lean"]
        lines.append("")
        lines.append(f"**{name}, zerorl-lean (cpu_workers=1 micro_batch_size=8): peak RSS / TRL-leanest = "
                     f"{lean['rss_max'] / leanest['rss_max']:.2f}** (target ≤ 0.70); completion tokens/s / "
                     f"TRL-best = {lean['tokens_per_second'] / fastest['tokens_per_second']:.2f}×")
    if "zerorl-bf16" in stats:
        bf16 = stats["zerorl-bf16"]
        lines.append("")
        lines.append(f"**{name}, bf16 autocast: zerorl-bf16 / TRL-best (fp32) completion tokens/s = "
                     f"{bf16['tokens_per_second'] / fastest['tokens_per_second']:.2f}×** (target ≥ 2.5× on the "
                     f"31.5M model); peak RSS / TRL-leanest = {bf16['rss_max'] / leanest['rss_max']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is a warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of [TRL on, zerorl, TRL off, zerorl]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="skip zerorl with bf16 autocast (bf16=true)")
    parser.add_argument("--no-lean", action="store_true",
                        help="skip zerorl-lean (cpu_workers=1 micro_batch_size=8, the memory setting)")
    parser.add_argument("--no-floor", action="store_true", help="skip the fp32 FLOP-floor column (floor.py)")
    parser.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--allocator", default="auto", choices=("auto", "jemalloc", "tcmalloc", "system"),
                        help="zerorl's malloc, as ZERORL_ALLOCATOR picks it for the zerorl command (default auto: "
                             "jemalloc, else tcmalloc, else glibc's)")
    parser.add_argument("--trl-allocator", default="system", choices=("system", "same", "jemalloc", "tcmalloc"),
                        help="TRL's malloc: system (default: glibc's, as TRL runs) or the same as zerorl's")
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"),
                        help="OMP_WAIT_POLICY for every run, TRL's and zerorl's (default: this environment's)")
    args = parser.parse_args(argv)
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    settings = Settings(steps=args.steps, threads=args.threads)
    zerorl_library = allocator_library(args.allocator)
    trl_library = zerorl_library if args.trl_allocator == "same" else allocator_library(args.trl_allocator)
    load_before = os.getloadavg()
    ensure_trl_venv()
    model_dirs = build_models(args.models)

    sections, raw, loads = [], {}, [load_before[0]]
    for name, model_dir in model_dirs.items():
        runs: dict[str, list[dict]] = {"trl-ckpt-on": [], "trl-ckpt-off": [], "zerorl": []}
        order = [("trl-ckpt-on", True), ("zerorl", None), ("trl-ckpt-off", False), ("zerorl", None)]
        if not args.no_bf16:  # reported beside: bf16 autocast over float32 weights, not the same precision
            runs["zerorl-bf16"] = []
            order.insert(2, ("zerorl-bf16", None))
        if not args.no_lean:  # zerorl's memory setting, beside its default (TRL's is gradient checkpointing)
            runs["zerorl-lean"] = []
            order.insert(len(order) - 1, ("zerorl-lean", None))
        for round_index in range(args.rounds):
            for index, (system, checkpointing) in enumerate(order):
                tag = f"{name}-{system}-r{round_index}-{index}"
                print(f"[{name}] {system} (round {round_index + 1}/{args.rounds}) ...", flush=True)
                if system.startswith("zerorl"):
                    result = run_zerorl(model_dir, settings.steps, settings.threads, settings.prompts,
                                        settings.generations, settings.completion_length, settings.beta,
                                        settings.learning_rate, tag=tag,
                                        extra=ZERORL_EXTRA[system], preload=zerorl_library)
                else:
                    result = run_trl(model_dir, checkpointing, settings, tag, preload=trl_library)
                result["load_average_after"] = os.getloadavg()[0]
                loads.append(result["load_average_after"])
                runs[system].append(result)
                print(f"    {result['seconds_per_step']:.3f} s/step, {result['tokens_per_second']:,.0f} "
                      f"completion tokens/s, peak RSS {result['peak_rss_mb']:,.0f} MB (load average "
                      f"{result['load_average_after']:.2f})", flush=True)
        stats = {system: aggregate(results) for system, results in runs.items()}
        floor_s = None
        if not args.no_floor:
            cache: dict = {}  # GEMM rates measured once per model, reused for each system's token count
            floor_s = {system: _fp32_floor(model_dir, settings, s["tokens_per_step"], cache)
                       for system, s in stats.items()}
            floor_s["zerorl-own-flops"] = _fp32_floor(model_dir, settings, stats["zerorl"]["tokens_per_step"],
                                                      cache, prompt_shared=True)
        raw[name] = {"runs": runs, "stats": stats, "fp32_floor_s": floor_s}
        sections.append(f"### {name}\n\n" + format_model_table(name, stats, floor_s))
        print("\n" + sections[-1] + "\n", flush=True)

    load_after = os.getloadavg()
    versions = next((r["versions"] for m in raw.values() for r in m["runs"]["trl-ckpt-on"]), {})
    import torch

    header = (f"`python benchmarks/vs_trl.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
              f"{platform.machine()}, {os.cpu_count()} cores, {settings.threads} torch threads per run "
              f"(OMP_WAIT_POLICY={wait_policy()}), zerorl on {allocator_name(zerorl_library)} "
              f"(ZERORL_ALLOCATOR={args.allocator}), TRL on {allocator_name(trl_library)}, "
              f"zerorl on torch {torch.__version__}, TRL {versions.get('trl', '?')} on torch "
              f"{versions.get('torch', '?')} / transformers {versions.get('transformers', '?')}. Load average "
              f"(1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}, {min(loads):.2f}–{max(loads):.2f} "
              f"after each run (other work shares this machine). Settings: {settings.prompts} prompts × G = "
              f"{settings.generations}, "
              f"{settings.completion_length} new tokens, β = {settings.beta}, μ = 1, loss_type grpo, fp32, "
              f"arithmetic prompts (compact template), rewards accuracy + format; {settings.steps} steps per "
              "run, the first not timed; order per round: TRL ckpt on, zerorl, "
              + ("" if args.no_bf16 else "zerorl bf16=true (autocast; reported beside), ")
              + "TRL ckpt off, " + ("" if args.no_lean else "zerorl-lean (cpu_workers=1 micro_batch_size=8), ")
              + "zerorl, each in a fresh process; zerorl with its defaults (native forward, micro_batch_size 16 (32 under "
              "bf16), "
              "cpu_workers 0 = one single-threaded worker per thread).")
    WORK_DIR.mkdir(exist_ok=True)
    (WORK_DIR / "vs_trl_latest.json").write_text(json.dumps({"header": header, "models": raw}, indent=2))
    print(header)
    if not args.no_append:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a") as handle:
            handle.write(f"\n## GRPO step vs TRL GRPOTrainer (benchmarks/vs_trl.py, {stamp})\n\n{header}\n\n"
                         + "\n\n".join(sections) + "\n")
        print(f"appended to {RESULTS}")
    return 0


def _fp32_floor(model_dir: Path, settings: Settings, completion_tokens: float, cache: dict,
                prompt_shared: bool = False) -> float:
    """fp32 FLOP floor of one step with `completion_tokens` on this machine (benchmarks/floor.py);
    `prompt_shared`: the FLOPs zerorl's native forward does (each prompt once per group)."""
    import torch
    from transformers import AutoTokenizer

    sys.path.insert(0, str(BENCH_DIR))
    import floor

    torch.set_num_threads(settings.threads)
    shape = floor.ModelShape.from_model_dir(model_dir)
    work = floor.arithmetic_work(AutoTokenizer.from_pretrained(model_dir), settings.prompts, settings.generations,
                                 completion_tokens, settings.completion_length, steps=settings.steps,
                                 with_reference=settings.beta > 0, prompt_shared=prompt_shared)
    return floor.floor_seconds(floor.step_floor(shape, work, ["fp32"], repeats=3, cache=cache), "fp32")


if __name__ == "__main__":
    sys.exit(main())
