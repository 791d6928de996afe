"""Small run tracking for classic control: metrics.jsonl, a tqdm progress bar and a learning-curve PNG.

Kept local to zerorl/classic on purpose (the language-model tracking stack is heavier); each
metrics.jsonl line is one JSON object with a "step" (environment steps so far) and either an episode
(`episodic_return`, `episodic_length`) or an update's training metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def _to_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class RunLogger:
    """Writes metrics.jsonl as the run goes and drives the progress bar."""

    def __init__(self, output_dir: str | Path | None, total_steps: int, progress: bool, desc: str) -> None:
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.file = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.output_dir / "metrics.jsonl", "w")  # closed in close()
        self.bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
        self.episode_steps: list[int] = []
        self.episode_returns: list[float] = []
        self.updates: list[dict[str, float]] = []

    def episodes(self, steps: list[int], returns: list[float], lengths: list[int]) -> None:
        self.episode_steps += steps
        self.episode_returns += returns
        if self.file is not None:
            for step, ret, length in zip(steps, returns, lengths):
                self.file.write(json.dumps({"step": step, "episodic_return": ret, "episodic_length": length}) + "\n")

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one update; tensors are converted here, once per update, not in the inner loops."""
        record = {"step": step, **{k: _to_float(v) for k, v in metrics.items()}}
        self.updates.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.bar.update(step - self.bar.n)
        if self.episode_returns:
            recent = self.episode_returns[-20:]
            self.bar.set_postfix(ret=f"{sum(recent) / len(recent):.1f}", refresh=False)

    def recent_return(self, last: int = 20) -> float:
        recent = self.episode_returns[-last:]
        return sum(recent) / len(recent) if recent else math.nan

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
            self.file = None


def plot_learning_curve(
    steps: list[int], returns: list[float], path: str | Path, title: str, eval_mean: float | None = None
) -> None:
    """Episodic training returns (dots), their moving average (line) and the final evaluation mean."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if returns:
        ax.scatter(steps, returns, s=4, alpha=0.3, label="episodic return")
        window = max(1, min(50, len(returns) // 10))
        smoothed = [sum(returns[max(0, i - window + 1) : i + 1]) / len(returns[max(0, i - window + 1) : i + 1])
                    for i in range(len(returns))]
        ax.plot(steps, smoothed, linewidth=2, label=f"moving average ({window} episodes)")
    if eval_mean is not None:
        ax.axhline(eval_mean, color="black", linestyle="--", label=f"final evaluation mean {eval_mean:.1f}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
