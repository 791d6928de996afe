"""Held-out evaluation: greedy accuracy, accuracy at the training temperature, pass@k, with 95% CIs."""

from __future__ import annotations

import math
import time

import torch

from zerorl.lm.pipeline import render_prompts, reward_columns
from zerorl.lm.rollout import SamplingParams


def proportion_ci(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (behaves at 0 and 1, unlike the normal interval)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Normal interval of a mean (used for per-prompt means of k samples, which are not 0/1)."""
    n = len(values)
    if n < 2:
        return (0.0, 1.0)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 (Codex): 1 − C(n−c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.prod((num_samples - num_correct - i) / (num_samples - i) for i in range(k))


def _accuracy_values(reward_set, accuracy_name: str, prompts: list[str], completions: list[str],
                     columns: dict) -> tuple[list[float], list[float]]:
    _, per_function = reward_set(prompts, completions, columns)
    accuracy = per_function.get(accuracy_name)
    if accuracy is None:
        raise KeyError(f"no reward function named {accuracy_name!r}; have {sorted(per_function)}")
    fmt = per_function.get("format", [float("nan")] * len(completions))
    return accuracy, fmt


def evaluate(engine, tokenizer, rows: list[dict], template: str, reward_set, *, temperature: float,
             samples_per_prompt: int, max_new_tokens: int, seed: int, accuracy_name: str = "accuracy",
             prompts_per_batch: int = 128, progress=None) -> dict:
    """Greedy and sampled accuracy on ``rows`` (held out from training)."""
    start = time.perf_counter()
    greedy_correct: list[float] = []
    sampled_per_prompt: list[float] = []
    pass_k: list[float] = []
    format_ok: list[float] = []
    lengths: list[float] = []
    greedy = SamplingParams(n=1, temperature=1.0, greedy=True, max_new_tokens=max_new_tokens)
    sampled = SamplingParams(n=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens)
    for offset in range(0, len(rows), prompts_per_batch):
        chunk = render_prompts(rows[offset:offset + prompts_per_batch], template, tokenizer)
        for params, is_greedy in ((greedy, True), (sampled, False)):
            out = engine.generate(chunk.texts, params, seed=seed + offset)
            index = out.prompt_index.tolist()
            accuracy, fmt = _accuracy_values(reward_set, accuracy_name, [chunk.texts[i] for i in index],
                                             out.completion_texts, reward_columns(chunk.rows, index))
            if is_greedy:
                greedy_correct.extend(accuracy)
                continue
            format_ok.extend(fmt)
            lengths.extend(out.completion_mask.sum(dim=1).float().tolist())
            per_prompt = torch.tensor(accuracy).view(len(chunk.rows), params.n)
            sampled_per_prompt.extend(per_prompt.mean(dim=1).tolist())
            correct_counts = (per_prompt >= 1.0 - 1e-6).sum(dim=1).tolist()
            pass_k.extend(pass_at_k(params.n, c, params.n) for c in correct_counts)
        if progress is not None:
            progress.update(len(chunk.rows))
    n = len(rows)
    greedy_acc = sum(greedy_correct) / n
    sampled_acc = sum(sampled_per_prompt) / n
    return {
        "n": n,
        "accuracy_greedy": greedy_acc,
        "accuracy_greedy_ci95": list(proportion_ci(sum(greedy_correct), n)),
        "accuracy_sampled": sampled_acc,
        "accuracy_sampled_ci95": list(mean_ci(sampled_per_prompt)),
        f"pass@{samples_per_prompt}": sum(pass_k) / n,
        "samples_per_prompt": samples_per_prompt,
        "temperature": temperature,
        "format_rate": sum(format_ok) / max(1, len(format_ok)),
        "mean_completion_length": sum(lengths) / max(1, len(lengths)),
        "seconds": time.perf_counter() - start,
    }
