"""Cold-start SFT: the embedded base model that ``zerorl train`` starts from.

DeepSeek-R1 (unlike R1-Zero) first fine-tunes on a small set of reasoning traces, then runs RL. We do
the same at toy scale so a CPU run shows RL doing real work: a tiny transformer with a character
tokenizer is trained from scratch on synthetic ``<think>…</think><answer>…</answer>`` traces of the
task, a fraction of which contain a realistic slip (``error_rate``). The SFT model thus learns the
format and the procedure but also the slips: sampling from it is often wrong, which leaves RL room to
learn — verifiable rewards then teach it to stop slipping.

The result is cached (``~/.cache/zerorl`` or ``cache_dir``) under a hash of its recipe, so later runs
reuse it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zerorl.config import ConfigError
from zerorl.lm.parallel import CPUWorkers, Replicas, accumulate_gradients, default_num_workers, replica_count
from zerorl.optim import AdamW, LRSchedule

SFT_RECIPE_VERSION = 1  # bump when the recipe changes in a way that must invalidate cached models


@dataclass
class SFTConfig:
    task: str = "arithmetic"
    task_args: dict = field(default_factory=dict)
    template: str = "compact"
    error_rate: float = 0.3  # fraction of traces with a slip: the room RL gets to close
    # the tiny model (Qwen2 architecture, character tokenizer)
    arch: str = "qwen2"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    # optimization
    steps: int = 500
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    init_model: str | None = None  # fine-tune an existing HF model instead of building a tiny one
    output_dir: str | None = None  # None = the cache
    num_threads: int = 0
    cpu_workers: int = 0  # batch shards on single-threaded workers (zerorl.lm.parallel); 0 = one per thread
    progress: bool = True

    def validate(self) -> SFTConfig:
        if not 0.0 <= self.error_rate < 1.0:
            raise ConfigError(f"error_rate={self.error_rate!r} must lie in [0, 1), e.g. 0.3.")
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate={self.learning_rate!r} must be > 0.")
        for name in ("num_threads", "cpu_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be ≥ 0 (0 = one per core / torch's default).")
        return self

    def recipe_hash(self) -> str:
        recipe = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("output_dir", "num_threads", "cpu_workers", "progress")}
        recipe["version"] = SFT_RECIPE_VERSION
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZERORL_CACHE", Path.home() / ".cache" / "zerorl"))


def _tokenize_example(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    # Prompt and completion are tokenized separately, exactly as RL sees them (prompt, then sampled ids).
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, completion_ids


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (prompt, completion) in enumerate(examples):
        ids = prompt + completion
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        # Loss on the completion only: the model learns to answer, not to write questions.
        labels[row, len(prompt):len(ids)] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def run_sft(config: SFTConfig, output_dir: str | Path) -> Path:
    """Train the cold-start model and save it as a Hugging Face directory at ``output_dir``."""
    from zerorl.lm.models import build_tiny_model, load_model_and_tokenizer, save_model
    from zerorl.lm.runtime import ZERORL_MODEL_INFO
    from zerorl.tasks import get_task
    from zerorl.tasks.templates import format_prompt

    config.validate()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    task = get_task(config.task, seed=config.seed, **config.task_args)

    work = output_dir.parent / f".building-{output_dir.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    if config.init_model is None:
        init = build_tiny_model(work / "init", arch=config.arch, hidden_size=config.hidden_size,
                                num_layers=config.num_layers, num_heads=config.num_heads,
                                num_kv_heads=config.num_kv_heads, intermediate_size=config.intermediate_size,
                                max_position_embeddings=config.max_position_embeddings, seed=config.seed)
    else:
        init = config.init_model
    model, tokenizer = load_model_and_tokenizer(str(init), dtype="float32", device="cpu")
    model.train()
    # The batch is split into one shard per CPU worker, each run through its own copy of the module; their
    # gradients are summed in the fixed order of zerorl.lm.parallel.accumulate_gradients.
    workers = CPUWorkers(default_num_workers(config.cpu_workers, torch.device("cpu")))
    replicas = Replicas(model, replica_count(model, workers))

    optimizer = AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98),
                      weight_decay=config.weight_decay)
    total = config.steps

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
        return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * progress)).item())

    scheduler = LRSchedule(optimizer, lr_factor)
    # SFT rows come from the END of the task's training stream (indices ≥ 10^9), so the RL run, which
    # reads the stream from 0, sees fresh prompts; held-out rows are excluded from both by the task.
    start_index = 10**9
    bar = tqdm(range(total), desc="cold-start SFT", unit="step", disable=not config.progress)
    started = time.perf_counter()
    losses = []
    for step in bar:
        examples = []
        for i in range(config.batch_size):
            row = task.train_row(start_index + step * config.batch_size + i)
            prompt = format_prompt(row, config.template, tokenizer)
            completion = task.cold_start_completion(row, rng, error_rate=config.error_rate)
            examples.append(_tokenize_example(tokenizer, prompt, completion))
        count = replicas.num_workers
        shards = [examples[k * len(examples) // count:(k + 1) * len(examples) // count] for k in range(count)]
        batches = [_collate(shard, tokenizer.pad_token_id) for shard in shards if shard]
        targets = [int((batch["labels"] != -100).sum()) for batch in batches]

        def shard_loss(replica: int, index: int, batches=batches, targets=targets):
            # The batch's mean token loss = Σ over shards of (shard mean) × (shard tokens / batch tokens).
            loss = replicas.models[replica](**batches[index]).loss * (targets[index] / sum(targets))
            return loss, loss.detach()

        optimizer.zero_grad(set_to_none=True)
        parts = accumulate_gradients(workers, replicas, list(range(len(batches))), shard_loss,
                                     costs=[float(batch["attention_mask"].sum()) for batch in batches])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(sum(parts)))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()

    workers.shutdown()
    model.eval()
    save_model(model, tokenizer, work / "final")
    info = {"template": config.template, "task": config.task, "sft": dataclasses.asdict(config),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "sft_seconds": time.perf_counter() - started}
    (work / "final" / ZERORL_MODEL_INFO).write_text(json.dumps(info, indent=2))
    # Publish atomically: readers see either no model or a complete one.
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(work / "final", output_dir)
    shutil.rmtree(work, ignore_errors=True)
    return output_dir


# The embedded recipes. For arithmetic the cold-start traces forget the carry (borrow) 80% of the
# time: a systematic mistake, not noise, so the SFT model inherits a real misconception (its greedy
# answer to a carry problem is usually wrong) that verifiable rewards can teach it out of.
DEFAULT_RECIPES: dict[str, dict] = {
    "arithmetic": {"task_args": {"slip_kind": "carry"}, "error_rate": 0.8, "steps": 1200},
    "countdown": {"task_args": {}, "error_rate": 0.3},
}


def default_sft_config(task_name: str) -> SFTConfig:
    if task_name not in DEFAULT_RECIPES:
        raise ConfigError(
            f"there is no embedded base model for task {task_name!r} (only for {', '.join(DEFAULT_RECIPES)}). "
            "Fix: pass --model with a Hugging Face model directory or hub id.")
    return SFTConfig(task=task_name, **DEFAULT_RECIPES[task_name])


def ensure_base_model(task_name: str = "arithmetic", cache_dir: str | Path | None = None,
                      config: SFTConfig | None = None) -> Path:
    """The cached cold-start model for ``task_name``; built (minutes on a CPU) on first use."""
    config = config or default_sft_config(task_name)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"base-{config.task}-{config.recipe_hash()}"
    if (path / "config.json").is_file():
        return path
    print(f"Building the embedded base model (cold-start SFT, cached in {path}) ...", flush=True)
    return run_sft(config, path)
