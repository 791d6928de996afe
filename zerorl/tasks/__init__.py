"""Prompt sources: procedural arithmetic and Countdown, user data (JSON Lines, local HF datasets), and
the prompt templates. Torch-free and light to import."""

from __future__ import annotations

import inspect
from typing import Any

from zerorl.tasks.arithmetic import ArithmeticTask
from zerorl.tasks.base import Row, Task, row_rng
from zerorl.tasks.countdown import CountdownTask
from zerorl.tasks.templates import (
    COMPACT_TEMPLATE,
    R1_INSTRUCTION,
    R1_TEMPLATE,
    TEMPLATES,
    chat_messages,
    format_prompt,
)
from zerorl.tasks.user_data import DataFormatError, HFDatasetTask, JsonlTask, RowsTask, read_jsonl

TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
    "countdown": CountdownTask,
    "jsonl": JsonlTask,
    "hf_dataset": HFDatasetTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as ``name`` with keyword settings, e.g.
    ``get_task("arithmetic", seed=1, max_digits=3)``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    parameters = [p for p in inspect.signature(cls).parameters if p not in ("self", "name")]
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(
            f"task {name!r} has no setting(s) {unknown}; its settings are: {', '.join(parameters)}"
        )
    return cls(**kwargs)


__all__ = [
    "COMPACT_TEMPLATE",
    "R1_INSTRUCTION",
    "R1_TEMPLATE",
    "TASKS",
    "TEMPLATES",
    "ArithmeticTask",
    "CountdownTask",
    "DataFormatError",
    "HFDatasetTask",
    "JsonlTask",
    "Row",
    "RowsTask",
    "Task",
    "chat_messages",
    "format_prompt",
    "get_task",
    "read_jsonl",
    "row_rng",
]
