"""Several reward functions, weighted and checked, as one call.

Total reward (DeepSeek-R1 section 2.2.2 sums an accuracy and a format reward)::

    r_i = sum_k  w_k * f_k(prompts, completions, **columns)[i]

The per-function values are returned too, so the trainer logs each as ``rewards/<name>/mean``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

RewardFn = Callable[..., Sequence[Any]]
"""``fn(prompts: list[str], completions: list[str], **columns) -> list[float]`` (TRL's shape)."""

_RESERVED_COLUMNS = ("prompts", "completions")
_SAMPLE_CHARS = 200


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something other than one finite number per completion."""

    def __init__(self, name: str, problem: str, sample: str | None = None):
        self.name = name
        message = f"reward function {name!r}: {problem}"
        if sample is not None:
            message += f"\n  offending completion (first {_SAMPLE_CHARS} chars): {sample[:_SAMPLE_CHARS]!r}"
        super().__init__(message)


def _as_finite_float(value: Any) -> float | None:
    """``value`` as a finite float, or None if it is not one (None, NaN, inf, strings, ...)."""
    if value is None or isinstance(value, (str, bytes)):  # float("1.0") would succeed: too lenient
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class RewardSet:
    """Weighted reward functions with checked outputs.

    ``funcs``: ``[(name, fn, weight), ...]``; names must be unique (they become metric names).
    ``error_policy``:
      - ``"raise"`` (default): an exception inside a function, a result of the wrong length, or any
        value that is not a finite number (None and NaN included) raises ``RewardFunctionError``
        naming the function and showing the offending completion.
      - ``"zero"``: such a function scores 0.0 instead, for the whole batch when it raised or returned
        the wrong length, for the one sample when a value is None/NaN/inf/non-numeric; each zeroed
        sample is counted in ``error_counts[name]`` and the first failure of each function warns.
        Use it for long runs where a rare crash in a user verifier should not end the run.
    """

    funcs: list[tuple[str, RewardFn, float]]
    error_policy: Literal["raise", "zero"] = "raise"
    error_counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.error_policy not in ("raise", "zero"):
            raise ValueError(f"error_policy must be 'raise' or 'zero', got {self.error_policy!r}")
        if not self.funcs:
            raise ValueError("RewardSet needs at least one (name, fn, weight) reward function")
        names = [entry[0] for entry in self.funcs]
        for entry in self.funcs:
            if len(entry) != 3:
                raise ValueError(f"each reward must be a (name, fn, weight) triple, got {entry!r}")
            name, fn, weight = entry
            if not callable(fn):
                raise ValueError(f"reward {name!r} is not callable: {fn!r}")
            if _as_finite_float(weight) is None:
                raise ValueError(f"reward {name!r} has weight {weight!r}; use a finite number")
            if names.count(name) > 1:
                raise ValueError(
                    f"reward name {name!r} is used twice; names must be unique (they are metric keys)"
                )
            self.error_counts.setdefault(name, 0)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.funcs]

    def __call__(
        self, prompts: list, completions: list, columns: dict[str, Sequence] | None = None
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Score a batch: ``(total per completion, {name: values per completion})``.

        ``columns`` holds the dataset's extra fields, each a list aligned with ``completions`` (for
        GRPO the trainer repeats each row's values ``num_generations`` times, as it does the prompts).
        """
        columns = dict(columns or {})
        size = len(completions)
        if len(prompts) != size:
            raise ValueError(f"got {len(prompts)} prompts for {size} completions; they must be aligned")
        for key, values in columns.items():
            if key in _RESERVED_COLUMNS:
                raise ValueError(
                    f"a dataset column may not be named {key!r} (it is a reward argument); rename it"
                )
            if len(values) != size:
                raise ValueError(f"column {key!r} has {len(values)} values for {size} completions; align it")

        per_func: dict[str, list[float]] = {}
        for name, fn, _ in self.funcs:
            per_func[name] = self._score_one(name, fn, prompts, completions, columns)
        total = [
            sum(float(weight) * per_func[name][i] for name, _, weight in self.funcs) for i in range(size)
        ]
        return total, per_func

    def _score_one(
        self, name: str, fn: RewardFn, prompts: list, completions: list, columns: dict
    ) -> list[float]:
        size = len(completions)
        try:
            raw = fn(prompts=prompts, completions=completions, **columns)
        except Exception as error:
            if self.error_policy == "raise":
                sample = str(completions[0]) if completions else None
                raise RewardFunctionError(name, f"raised {type(error).__name__}: {error}", sample) from error
            return self._zero_batch(name, size, f"raised {type(error).__name__}: {error}")

        if raw is None or isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__"):
            problem = f"returned {type(raw).__name__}; it must return a list with one float per completion"
            if self.error_policy == "raise":
                raise RewardFunctionError(name, problem)
            return self._zero_batch(name, size, problem)
        if len(raw) != size:
            problem = f"returned {len(raw)} values for {size} completions"
            if self.error_policy == "raise":
                raise RewardFunctionError(name, problem)
            return self._zero_batch(name, size, problem)

        values = []
        for i, value in enumerate(raw):
            number = _as_finite_float(value)
            if number is None:
                problem = (
                    f"value {i} is {value!r}, not a finite number "
                    "(return 0.0 for completions the function does not apply to)"
                )
                if self.error_policy == "raise":
                    raise RewardFunctionError(name, problem, str(completions[i]))
                self._count(name, 1, problem)
                number = 0.0
            values.append(number)
        return values

    def _zero_batch(self, name: str, size: int, problem: str) -> list[float]:
        self._count(name, size, problem)
        return [0.0] * size

    def _count(self, name: str, samples: int, problem: str) -> None:
        if self.error_counts[name] == 0:
            warnings.warn(
                f"reward function {name!r} {problem}; scoring 0.0 (error_policy='zero'), "
                "further failures are only counted in RewardSet.error_counts",
                RuntimeWarning,
                stacklevel=4,
            )
        self.error_counts[name] += samples
