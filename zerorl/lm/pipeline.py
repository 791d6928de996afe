"""The stage every LM trainer shares: prompts → completions → rewards, as one RolloutBatch.

    rows (tasks/) ─► prompt texts (templates) ─► rollout engine ─► completions + sampling log-probs
        ─► reward functions (rewards/) ─► RolloutBatch with rewards and per-function rewards

Advantages, reference log-probs and values are the trainers' business: they differ per algorithm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from zerorl.lm.batch import RolloutBatch
from zerorl.lm.rollout import RolloutEngine, SamplingParams
from zerorl.tasks.templates import format_prompt


@dataclass
class PromptBatch:
    rows: list[dict]  # task rows: {"prompt", "answer", ...extra columns}
    texts: list[str]  # the rows' prompts rendered with the template


def render_prompts(rows: list[dict], template: str, tokenizer) -> PromptBatch:
    return PromptBatch(rows=rows, texts=[format_prompt(row, template, tokenizer) for row in rows])


def reward_columns(rows: list[dict], prompt_index: list[int]) -> dict[str, list]:
    """Each extra dataset column, repeated so that it lines up with the completions (TRL's convention)."""
    names = [key for key in rows[0] if key != "prompt"] if rows else []
    return {name: [rows[i].get(name) for i in prompt_index] for name in names}


def rollout_and_score(engine: RolloutEngine, prompts: PromptBatch, sampling: SamplingParams, reward_set,
                      seed: int) -> tuple[RolloutBatch, dict[str, float]]:
    """Sample ``sampling.n`` completions per prompt and score them. Returns the batch and timings."""
    start = time.perf_counter()
    out = engine.generate(prompts.texts, sampling, seed=seed)
    generate_seconds = time.perf_counter() - start

    prompt_index = out.prompt_index.tolist()
    prompt_texts = [prompts.texts[i] for i in prompt_index]
    start = time.perf_counter()
    total, per_function = reward_set(prompt_texts, out.completion_texts, reward_columns(prompts.rows, prompt_index))
    reward_seconds = time.perf_counter() - start

    # The scores go where the completions are (the model's device): the loss combines them with the
    # log-probs token by token, and torch mixes devices only for 0-dim CPU tensors.
    device = out.completion_ids.device
    batch = RolloutBatch(
        prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask,
        completion_ids=out.completion_ids, completion_mask=out.completion_mask,
        sampling_logprobs=out.sampling_logprobs, prompt_index=out.prompt_index,
        completion_texts=list(out.completion_texts), finish_reasons=list(out.finish_reasons),
        rewards=torch.tensor(total, dtype=torch.float32, device=device),
        reward_components={name: torch.tensor(values, dtype=torch.float32, device=device)
                           for name, values in per_function.items()},
    )
    return batch, {"time/generate": generate_seconds, "time/reward": reward_seconds}


def completion_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Length and reward statistics under the names TRL users know."""
    lengths = batch.completion_mask.sum(dim=1).float()
    finished = torch.tensor([reason != "length" for reason in batch.finish_reasons], dtype=torch.float32)
    metrics = {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": 1.0 - finished.mean().item(),
        "reward": batch.rewards.mean().item(),
        "reward_std": batch.rewards.std().item() if len(batch) > 1 else 0.0,
        "num_tokens": lengths.sum().item(),
    }
    for name, values in batch.reward_components.items():
        metrics[f"rewards/{name}/mean"] = values.mean().item()
        metrics[f"rewards/{name}/std"] = values.std().item() if len(values) > 1 else 0.0
    return metrics
