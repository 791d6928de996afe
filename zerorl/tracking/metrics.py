"""Per-step metrics as JSON lines, named the way TRL and verl users know them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _to_python(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-dim tensors and numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible instead of crashing
    return value


# The keys a console line shows, in this order, where a row has them (TRL's and verl's names); each reward
# function's mean comes after the first two.
ECHO_KEYS = ("reward", "reward_std", "kl", "entropy", "clip_ratio", "completions/mean_length", "grad_norm",
             "learning_rate", "step_time")


def format_row(row: dict[str, Any], total_steps: int | None = None) -> str:
    """One console line of a metrics row (plain Python values, as ``MetricsLogger.log`` writes them): step, the
    ECHO_KEYS and each reward function's mean."""
    rewards = [k for k in row if k.startswith("rewards/") and k.endswith("/mean")]
    keys = [k for k in ECHO_KEYS[:2] if k in row] + rewards + [k for k in ECHO_KEYS[2:] if k in row]

    def value(key: str) -> str:
        v = row[key]
        if key == "step_time":
            return f"{v:.2f}s"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    step = f"step {row['step']}" + (f"/{total_steps}" if total_steps else "")
    return " | ".join([step] + [f"{k} {value(k)}" for k in keys])


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl``, and every ``echo_every`` steps (TRL's
    ``logging_steps``; 0 = never) prints the row as one console line, through ``echo``.

    On resume the file is truncated to the steps that the checkpoint already holds, so a killed
    run never leaves duplicated or orphaned lines behind.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, echo_every: int = 0,
                 total_steps: int | None = None, echo=print):
        self.echo_every, self.total_steps, self.echo = echo_every, total_steps, echo
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
            os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        clean = {key: _to_python(value) for key, value in row.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")
        if self.echo_every and clean.get("step", 0) % self.echo_every == 0:
            self.echo(format_row(clean, self.total_steps))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is suspect
    return rows
