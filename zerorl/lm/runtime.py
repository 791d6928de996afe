"""What every LM trainer needs around its algorithm: device, model, task, rewards, optimizer,
checkpoints, evaluation and the run directory. Trainers (grpo.py, ppo.py, trpo.py) stay recipes.

Run directory layout::

    DIR/config.yaml        the resolved config (``--resume`` reads it back)
    DIR/metrics.jsonl      one JSON object per step
    DIR/checkpoints/       step-NNNNNN/ (atomic, last ``save_total_limit`` kept)
    DIR/final/             a Hugging Face model directory (safetensors + tokenizer)
    DIR/summary.json       eval_before, eval_after, wall_seconds, ...
    DIR/training.png       learning curves
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from zerorl.checkpoint import (
    CheckpointError,
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from zerorl.config import ConfigError, TrainConfig, config_to_dict
from zerorl.lm.evaluate import evaluate
from zerorl.lm.models import load_model_and_tokenizer, save_model
from zerorl.lm.native import NativeDecoder, unsupported_reason
from zerorl.lm.parallel import CPUWorkers, default_num_workers
from zerorl.lm.pipeline import render_prompts
from zerorl.lm.rollout import HFRolloutEngine, SamplingParams
from zerorl.optim import AdamW, LRSchedule
from zerorl.rewards import BUILTIN_REWARDS, ProcessRewardFunction, RewardSet, load_reward_function
from zerorl.tasks import TASKS, get_task
from zerorl.tracking import MetricsLogger, plot_lm_run

ZERORL_MODEL_INFO = "zerorl.json"  # written next to models zerorl builds: which template they expect
EMBEDDED_BASE_TASKS = ("arithmetic", "countdown")  # tasks `zerorl sft` can build a base model for


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is visible. Fix: device=cpu or device=auto.")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_template(config: TrainConfig, model_path: str) -> str:
    if config.template != "auto":
        return config.template
    info = Path(model_path) / ZERORL_MODEL_INFO
    if info.is_file():
        return json.loads(info.read_text()).get("template", "r1zero")
    return "r1zero"


def build_reward_set(task, config: TrainConfig) -> RewardSet:
    """The task's default rewards, or the ones named in ``reward_funcs``: a task reward's name, a built-in
    verifier's name, or a user function "file.py:fn" / "module:fn". User functions are untrusted code:
    with ``reward_timeout_s`` each runs in its own worker process (``ProcessRewardFunction``), so a hang
    or a crash inside it is reported with its name instead of freezing or killing the trainer."""
    defaults = {name: fn for name, fn, _ in task.reward_funcs()}
    if not config.reward_funcs:
        funcs = list(task.reward_funcs())
    else:
        funcs = []
        for spec in config.reward_funcs:
            spec = str(spec)
            if spec in defaults:
                funcs.append((spec, defaults[spec], 1.0))
            elif spec in BUILTIN_REWARDS:
                funcs.append((spec, BUILTIN_REWARDS[spec], 1.0))
            elif config.reward_timeout_s is not None:
                name = spec.rpartition(":")[2]
                funcs.append((name, ProcessRewardFunction(spec, config.reward_timeout_s, name=name), 1.0))
            else:
                fn = load_reward_function(spec)
                funcs.append((getattr(fn, "__name__", spec), fn, 1.0))
    if config.reward_weights:
        funcs = [(name, fn, float(w)) for (name, fn, _), w in zip(funcs, config.reward_weights)]
    return RewardSet(funcs, error_policy=config.reward_errors)


def make_optimizer(params, config: TrainConfig) -> AdamW:
    """AdamW (zerorl.optim: torch's fused kernel, without importing torch.optim's dynamo machinery)."""
    return AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                 weight_decay=config.weight_decay)


_LIBC = None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim); a no-op elsewhere.

    A step frees hundreds of MB of activations in pieces of every size; glibc keeps much of it mapped,
    and the next phase's allocations do not always fit the holes, so resident memory creeps up step by
    step. Trimming between phases keeps the peak at what a phase really needs (measured in
    benchmarks/vs_trl.py: the 31.5M model's peak RSS −15%), for a few milliseconds per call.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # musl or another libc without malloc_trim
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def make_scheduler(optimizer: AdamW, config: TrainConfig, total_steps: int) -> LRSchedule:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0."""
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        if config.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return LRSchedule(optimizer, factor)


@dataclass
class LMRun:
    """The state a trainer carries: built once by ``setup_lm_run``."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    task: Any
    model: torch.nn.Module
    tokenizer: Any
    template: str
    engine: HFRolloutEngine
    reward_set: RewardSet
    eval_rows: list[dict]
    workers: CPUWorkers | None = None  # single-threaded workers for micro-batches and rollout shards (CPU)
    logger: MetricsLogger | None = None
    start_time: float = field(default_factory=time.perf_counter)
    wall_seconds_before: float = 0.0  # wall time of earlier segments of a resumed run
    summary: dict = field(default_factory=dict)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"


def setup_lm_run(config: TrainConfig, resume: bool = False) -> LMRun:
    """Validate, seed, build task/model/rewards; everything that can fail on bad input fails here.

    Cheapest checks first (config values, the run directory, the task and its data), so that a typo is
    reported in a second, before a model is loaded or the embedded base model is built."""
    config.validate()
    for line in config.unused_options():
        print(f"note: {line}", file=sys.stderr, flush=True)
    run_dir = Path(config.output_dir)
    if not resume and latest_checkpoint(run_dir / "checkpoints") is not None:
        raise ConfigError(f"output_dir={str(run_dir)!r} already holds a run with checkpoints. "
                          "Fix: pass --resume to continue it, or choose another --output-dir.")
    _check_task_name(config)
    if config.model is None and config.task not in EMBEDDED_BASE_TASKS:
        raise ConfigError(f"model=None with task={config.task!r}: the embedded base model exists only for "
                          f"{' and '.join(EMBEDDED_BASE_TASKS)}. Fix: pass --model with a Hugging Face model "
                          "directory or hub id (e.g. --model Qwen/Qwen2.5-0.5B-Instruct).")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    task = build_task(config)
    try:
        eval_rows = task.eval_rows(config.num_eval)
    except ValueError as error:
        raise ConfigError(f"num_eval={config.num_eval}: {error}. Fix: lower num_eval.") from error

    model_path = config.model
    if model_path is None:
        from zerorl.lm.sft import ensure_base_model

        model_path = str(ensure_base_model(task_name=config.task, cache_dir=config.cache_dir))
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=config.dtype, device=str(device))
    template = resolve_template(config, model_path)
    reward_set = build_reward_set(task, config)
    _check_prompt_lengths(task, eval_rows, template, tokenizer, model, config)

    run_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: `--resume` reads this file back, and a kill while it is written must not leave it empty.
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False))
    workers = CPUWorkers(default_num_workers(config.cpu_workers, device))
    engine = build_engine(config, model, tokenizer, model_path, workers)
    return LMRun(config=config, run_dir=run_dir, device=device, task=task, model=model, tokenizer=tokenizer,
                 template=template, engine=engine, reward_set=reward_set, eval_rows=eval_rows, workers=workers)


def build_engine(config: TrainConfig, model, tokenizer, model_path: str, workers: CPUWorkers | None = None):
    """The rollout engine: vLLM when use_vllm (the trainer syncs its weights after every update), else
    the in-process engine over the live policy module."""
    if config.use_vllm:
        from zerorl.lm.vllm_engine import VLLMRolloutEngine

        # Under bf16 autocast the rollout samples in bf16 as the in-process engine does (vLLM's load_weights
        # casts the float32 policy's weights at every sync); float32 otherwise (a float32 run's own numbers).
        return VLLMRolloutEngine(model_path, tokenizer, dtype="bfloat16" if config.bf16 else config.dtype,
                                 gpu_memory_utilization=config.vllm_gpu_memory_utilization, seed=config.seed)
    return HFRolloutEngine(model, tokenizer, native=config.native_model,
                           autocast_dtype=torch.bfloat16 if config.bf16 else None, workers=workers)


def native_decoder(model, config: TrainConfig) -> NativeDecoder | None:
    """zerorl's lean forward for ``model`` when native_model is on and the architecture is supported."""
    if not config.native_model or unsupported_reason(model) is not None:
        return None
    return NativeDecoder(model)


def autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast when bf16=true (float32 weights, bfloat16 matrix products), else a no-op context."""
    if not config.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def store_for_autocast(frozen: torch.nn.Module, config: TrainConfig) -> None:
    """bf16=true: keep a frozen model's matrix weights (its nn.Linear layers, except one tied to the input
    embedding) in bfloat16. Under autocast every matrix product casts its weight to bfloat16 anyway — for a
    frozen model, at every call, since autocast caches only weights that require grad — so the numbers are
    the same bits, the casts are gone and the weights take half the memory (31.5M model: −63 MB). Loading
    a float32 state dict into it (reference refresh, resume) rounds the same way the casts did."""
    if not config.bf16:
        return
    embedding = frozen.get_input_embeddings().weight if hasattr(frozen, "get_input_embeddings") else None
    for module in frozen.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)


def _check_task_name(config: TrainConfig) -> None:
    if config.task not in TASKS:
        raise ConfigError(f"task={config.task!r} is not a known task. Fix: set task to one of "
                          f"{', '.join(sorted(TASKS))} (user data: task=jsonl task_args={{path: data.jsonl}}).")


def build_task(config: TrainConfig):
    """The task named by ``config.task``; its own errors (bad settings, bad data) name ``task_args``."""
    _check_task_name(config)
    task_args = dict(config.task_args)
    accepted = inspect.signature(TASKS[config.task]).parameters
    if config.reward_timeout_s is not None and "reward_timeout_s" in accepted and "reward_timeout_s" not in task_args:
        task_args["reward_timeout_s"] = config.reward_timeout_s  # the data's own reward specs are isolated too
    try:
        return get_task(config.task, seed=config.seed, **task_args)
    except (ValueError, TypeError) as error:
        if type(error) not in (ValueError, TypeError):
            raise  # DataFormatError and friends already name the file, line, column and fix
        raise ConfigError(f"task={config.task!r} with task_args={config.task_args!r}: {error}. "
                          "Fix: change task_args as the message says.") from error


def _check_prompt_lengths(task, eval_rows, template, tokenizer, model, config: TrainConfig) -> None:
    """Refuse prompts that cannot fit the model's context together with the completion budget."""
    from zerorl.tasks.templates import format_prompt

    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    sample = eval_rows[:64] + [task.train_row(i) for i in range(64)]
    longest = max(len(tokenizer(format_prompt(row, template, tokenizer))["input_ids"]) for row in sample)
    if longest + config.max_completion_length > limit:
        raise ConfigError(
            f"prompts of up to {longest} tokens plus max_completion_length={config.max_completion_length} "
            f"exceed the model's context of {limit} tokens (template={template!r}). Fix: lower "
            "max_completion_length, use a shorter template (template=compact), or a model with a longer context.")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced a NaN/Inf loss or gradient."""


def nonfinite_abort_message(step: int, in_a_row: int, checkpoint_root) -> str:
    """Why the run stopped and what to try; shared by the LM trainers."""
    return (f"step {step}: the loss or gradient was NaN/Inf for {in_a_row} steps in a row (each update was "
            "skipped; max_nonfinite_steps sets the limit). Likely causes: a learning rate too high for this "
            "model (lower learning_rate, e.g. by 10x), bf16 overflow (try dtype=float32), or a base model that "
            "already holds NaN/Inf weights (check --model). The last good checkpoint is in "
            f"{checkpoint_root}.")


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _worker_count(run) -> int:
    """The CPU workers the run's rollouts are sharded over (checkpoints record it: resume is exact for it)."""
    workers = getattr(run, "workers", None)
    return workers.num_workers if workers is not None else 1


def save_training_state(run: LMRun, step: int, data_cursor: int, modules: dict[str, torch.nn.Module],
                        optimizer, scheduler, extra: dict | None = None) -> Path:
    tensors = {name: module.state_dict() for name, module in modules.items()}
    tensors["optimizer"] = optimizer.state_dict() if optimizer is not None else {}
    tensors["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    tensors["rng"] = rng_state()
    state = {"step": step, "data_cursor": data_cursor,
             "wall_seconds": run.wall_seconds_before + time.perf_counter() - run.start_time,
             "summary": run.summary, "cpu_workers": _worker_count(run),
             **(extra or {})}
    return save_checkpoint(run.checkpoint_root, step, tensors, state, keep=run.config.save_total_limit)


def restore_training_state(run: LMRun, modules: dict[str, torch.nn.Module], optimizer, scheduler
                           ) -> dict[str, Any] | None:
    """Load the newest loadable checkpoint into modules/optimizer/scheduler/RNG; None when there is none.

    A damaged newest checkpoint (a disk filled up, a file truncated by hand) is reported and the one
    before it used: losing ``save_steps`` of work beats refusing to resume."""
    candidates = (latest_checkpoint(run.checkpoint_root), *reversed(list_checkpoints(run.checkpoint_root)[:-1]))
    for path in candidates:
        if path is None:
            return None
        try:
            tensors, state = load_checkpoint(path)
        except CheckpointError as error:
            print(f"warning: {error} Trying the previous checkpoint.", file=sys.stderr, flush=True)
            continue
        break
    else:
        raise CheckpointError(f"no loadable checkpoint in {str(run.checkpoint_root)!r}. "
                              "Fix: start the run again without --resume in a fresh --output-dir.")
    for name, module in modules.items():
        module.load_state_dict(tensors[name])
    if optimizer is not None and tensors.get("optimizer"):
        optimizer.load_state_dict(tensors["optimizer"])
    if scheduler is not None and tensors.get("scheduler"):
        scheduler.load_state_dict(tensors["scheduler"])
    set_rng_state(tensors["rng"])
    workers_now = _worker_count(run)
    if state.get("cpu_workers", workers_now) != workers_now:
        # The completions draw the same random numbers whatever the worker count (one stream per prompt) and
        # the gradient is summed in micro-batch order, but the passes round differently (a rollout shard pads
        # its prompts to its own width; one worker splits each op over the threads). The run goes on
        # correctly, but not bit for bit as it would have on the machine that wrote the checkpoint.
        print(f"warning: this run was checkpointed with {state['cpu_workers']} CPU workers and resumes with "
              f"{workers_now}: it continues correctly but not bit-identically. For an exact resume set "
              f"cpu_workers={state['cpu_workers']} (and num_threads ≥ it) in {run.run_dir / 'config.yaml'}.",
              file=sys.stderr, flush=True)
    run.wall_seconds_before = state.get("wall_seconds", 0.0)
    run.summary = state.get("summary", {})
    return state


def begin_training(run: LMRun, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                   resume: bool) -> tuple[dict[str, Any], bool]:
    """What every trainer does before its first step: restore the newest checkpoint (when resuming), open
    metrics.jsonl (cut back to the restored step), and evaluate the starting model once.

    Returns (trainer state — ``step`` and ``data_cursor`` are 0 for a fresh run — and whether the
    evaluation ran just now).
    """
    state = (restore_training_state(run, modules, optimizer, scheduler) if resume else None) or {}
    state = {"step": 0, "data_cursor": 0, **state}
    # Every step goes to metrics.jsonl; every logging_steps-th also to the console, above the progress bar.
    run.logger = MetricsLogger(run.run_dir / "metrics.jsonl", resume_step=state["step"] if resume else None,
                               echo_every=run.config.logging_steps, total_steps=run.config.max_steps,
                               echo=tqdm.write)  # above any progress bar
    evaluated_now = False
    if run.config.eval_at_start and "eval_before" not in run.summary:
        print(describe_eval("before", run_evaluation(run, "before")), flush=True)
        evaluated_now = True
    return state, evaluated_now


def sampling_params(config: TrainConfig) -> SamplingParams:
    """The training rollout's sampling settings (G samples per prompt)."""
    return SamplingParams(n=config.num_generations, temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k, max_new_tokens=config.max_completion_length)


def next_prompts(run: LMRun, data_cursor: int) -> tuple[list[str], int]:
    """The step's prompts_per_step training prompts, rendered, from ``data_cursor``; and the cursor after them."""
    count = run.config.prompts_per_step
    rows = [run.task.train_row(data_cursor + i) for i in range(count)]
    return render_prompts(rows, run.template, run.tokenizer), data_cursor + count


def rollout_seed(config: TrainConfig, step: int) -> int:
    """The sampling seed of a step: a function of (seed, step) only, so a resumed run samples the same."""
    return config.seed * 1_000_003 + step


# ---------------------------------------------------------------------------------------------
# Evaluation and the end of a run
# ---------------------------------------------------------------------------------------------

def run_evaluation(run: LMRun, label: str) -> dict:
    config = run.config
    with tqdm(total=len(run.eval_rows), desc=f"eval ({label})", unit="prompt", leave=False,
              disable=not config.progress) as bar:
        result = evaluate(run.engine, run.tokenizer, run.eval_rows, run.template, run.reward_set,
                          temperature=config.temperature, samples_per_prompt=config.eval_samples_per_prompt,
                          max_new_tokens=config.max_completion_length, seed=config.seed + 7919,
                          progress=bar)
    run.summary[f"eval_{label}"] = result
    return result


def describe_eval(label: str, result: dict) -> str:
    lo_g, hi_g = result["accuracy_greedy_ci95"]
    lo_s, hi_s = result["accuracy_sampled_ci95"]
    return (f"[{label}] n={result['n']}  greedy {100 * result['accuracy_greedy']:.1f}% "
            f"[{100 * lo_g:.1f}, {100 * hi_g:.1f}]  sampled(T={result['temperature']}) "
            f"{100 * result['accuracy_sampled']:.1f}% [{100 * lo_s:.1f}, {100 * hi_s:.1f}]  "
            f"format {100 * result['format_rate']:.1f}%")


def close_reward_workers(run: LMRun) -> None:
    """Stop the worker processes of isolated reward functions (they also exit when the trainer dies)."""
    for _, fn, _ in run.reward_set.funcs:
        if isinstance(fn, ProcessRewardFunction):
            fn.close()


def finish_run(run: LMRun, extra: dict | None = None) -> dict:
    """Save final/, summary.json and plots; return the summary."""
    close_reward_workers(run)
    if run.workers is not None:
        run.workers.shutdown()
    save_model(run.model, run.tokenizer, run.run_dir / "final")
    for leftover in run.run_dir.glob(".final.tmp-*"):  # a save_model killed mid-write in an earlier segment
        shutil.rmtree(leftover, ignore_errors=True)
    info = {"template": run.template, "task": run.config.task}
    (run.run_dir / "final" / ZERORL_MODEL_INFO).write_text(json.dumps(info))
    summary = dict(run.summary)
    summary.update(extra or {})
    summary["wall_seconds"] = run.wall_seconds_before + time.perf_counter() - run.start_time
    summary["algo"] = run.config.algo
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        summary["delta_accuracy_sampled"] = after["accuracy_sampled"] - before["accuracy_sampled"]
        summary["delta_accuracy_greedy"] = after["accuracy_greedy"] - before["accuracy_greedy"]
    tmp = run.run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run.run_dir / "summary.json")
    if run.config.plots:
        plot_lm_run(run.run_dir, summary)
    return summary
