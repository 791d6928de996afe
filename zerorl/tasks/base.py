"""The ``Task`` interface: where prompts and reference answers come from.

A row is a plain dict ``{"prompt": str | list[{"role", "content"}], "answer": str, **extra_columns}``;
the extra columns are passed to the reward functions by name. ``train_row(index)`` is a pure function
of ``(task settings, seed, index)``, so the trainer's data cursor is a single integer and resuming a run
at step k replays exactly the prompts it would have seen.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from typing import Any

from zerorl.rewards.format import format_reward
from zerorl.rewards.reward_set import RewardFn

Row = dict[str, Any]


def row_rng(seed: int, stream: str, index: int, attempt: int = 0) -> random.Random:
    """A generator seeded from (seed, stream, index, attempt) alone, stable across processes and Python
    versions (no ``hash()``, which is salted per process). Separate streams ("train", "eval") never share
    a seed, and ``attempt`` lets a row be redrawn deterministically when it is rejected."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}/{attempt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


class Task(ABC):
    """Base class of prompt sources.

    Subclasses set ``name`` and implement ``train_row``, ``eval_rows`` and ``cold_start_completion``;
    ``reward_funcs`` defaults to the R1 pair: strict format and the task's accuracy verifier.
    """

    name: str = "task"

    @abstractmethod
    def train_row(self, index: int) -> Row:
        """The ``index``-th training row (deterministic; never one of the eval rows)."""

    @abstractmethod
    def eval_rows(self, n: int | None = None) -> list[Row]:
        """The first ``n`` held-out rows (all of them when ``n`` is None); disjoint from every train row."""

    def accuracy_reward(self) -> RewardFn:
        raise NotImplementedError(f"task {self.name!r} defines no accuracy reward")

    def reward_funcs(self) -> list[tuple[str, RewardFn, float]]:
        """Default rewards as ``(name, fn, weight)``: R1-Zero's rule-based accuracy and format rewards.
        The names become metrics ``rewards/format/mean`` and ``rewards/accuracy/mean``."""
        return [
            ("accuracy", self.accuracy_reward(), 1.0),
            ("format", format_reward, getattr(self, "format_weight", 1.0)),
        ]

    def cold_start_completion(self, row: Row, rng: random.Random, error_rate: float = 0.0) -> str:
        """A synthetic ``<think>…</think><answer>…</answer>`` completion for cold-start SFT; with
        probability ``error_rate`` its reasoning contains one realistic slip, so the answer is wrong."""
        raise NotImplementedError(f"task {self.name!r} cannot write cold-start reasoning traces")

    @property
    def num_train_rows(self) -> int | None:
        """Distinct training rows for finite datasets; None for procedural tasks (unbounded)."""
        return None


def check_error_rate(error_rate: float) -> None:
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate!r}")


def check_index(index: int) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"row index must be a non-negative int, got {index!r}")
