"""Procedural arithmetic: ``37+48`` → ``85``. The embedded default task.

Problems are drawn uniformly from ``[lo, hi]²`` (``lo, hi`` from the digit range) for each operator.
The held-out set is the first ``num_eval`` distinct problems of a separate "eval" seed stream, and a
training row that lands on an eval problem (``3+4`` and ``4+3`` count as the same) is redrawn, so train
and eval never share a problem.

Cold-start traces are written digit by digit, least significant first, so that a ~1M-parameter
character-level model can learn to *follow* them (each step depends on a few characters before it)::

    37+48  <think>7+8=15 3+4+1=8</think><answer>85</answer>          carry shown as "+1"
    85-37  <think>15-7=8 8-3-1=4</think><answer>48</answer>          a borrow writes the top digit as 1x
    37*48  <think>37*8=296 37*40=1480 296+1480=1776</think><answer>1776</answer>

A "slip" (probability ``error_rate``) changes one step's result by ±1 (one digit sum, or one partial
product by ±10^i) and carries it through, so the trace stays self-consistent but the answer is wrong.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from zerorl.rewards.accuracy import integer_accuracy
from zerorl.rewards.reward_set import RewardFn
from zerorl.tasks.base import Row, Task, check_error_rate, check_index, row_rng

_PROBLEM_RE = re.compile(r"([0-9]+)([-+*])([0-9]+)")
_MAX_REDRAWS = 10_000


def _digits_lsb_first(value: int, width: int) -> list[int]:
    return [(value // 10**i) % 10 for i in range(width)]


def _slip_delta(value: int, low: int, high: int, rng: random.Random) -> int:
    """+1 or -1, whichever keeps ``value + delta`` inside [low, high] (random when both do)."""
    delta = rng.choice((-1, 1))
    return -delta if not low <= value + delta <= high else delta


def addition_trace(a: int, b: int, slip: tuple[int, random.Random] | None = None,
                   forget_carry: bool = False) -> tuple[str, int]:
    """Column-wise addition; returns (trace, the answer the trace arrives at). ``slip=(column, rng)``
    makes that column's sum off by one; ``forget_carry`` drops every carry (the classic pupil's mistake:
    ``9+4=13`` where ``9+4+1=14`` was due)."""
    width = max(len(str(a)), len(str(b)))
    top, bottom = _digits_lsb_first(a, width), _digits_lsb_first(b, width)
    steps, result, carry = [], 0, 0
    for column in range(width):
        total = top[column] + bottom[column] + carry
        if slip is not None and slip[0] == column:
            total += _slip_delta(total, 0, 19, slip[1])
        steps.append(f"{top[column]}+{bottom[column]}{'+1' if carry else ''}={total}")
        result += (total % 10) * 10**column
        carry = 0 if forget_carry and column < width - 1 else total // 10
    return " ".join(steps), result + carry * 10**width


def subtraction_trace(a: int, b: int, slip: tuple[int, random.Random] | None = None,
                      forget_carry: bool = False) -> tuple[str, int]:
    """Column-wise subtraction for ``a >= b``: a column that must borrow shows its top digit plus ten
    (``15-7=8``) and the next column pays the borrow (``8-3-1=4``). ``forget_carry`` borrows but never
    pays the borrow back (``8-3=5``)."""
    width = len(str(a))
    top, bottom = _digits_lsb_first(a, width), _digits_lsb_first(b, width)
    steps, result, borrow = [], 0, 0
    for column in range(width):
        difference = top[column] - bottom[column] - borrow
        top_text = str(top[column])
        next_borrow = 0
        if difference < 0:
            difference += 10
            top_text = "1" + top_text
            next_borrow = 1
        if slip is not None and slip[0] == column:
            difference += _slip_delta(difference, 0, 9, slip[1])
        steps.append(f"{top_text}-{bottom[column]}{'-1' if borrow else ''}={difference}")
        result += difference * 10**column
        borrow = 0 if forget_carry else next_borrow
    return " ".join(steps), result


def multiplication_trace(a: int, b: int, slip: tuple[int, random.Random] | None = None) -> tuple[str, int]:
    """One partial product per digit of ``b`` (``37*40=1480``), then their sum."""
    width = len(str(b))
    partials, steps = [], []
    for position, digit in enumerate(_digits_lsb_first(b, width)):
        multiplier = digit * 10**position
        partial = a * multiplier
        if slip is not None and slip[0] == position:
            partial += _slip_delta(partial // 10**position, 0, 10**12, slip[1]) * 10**position
        steps.append(f"{a}*{multiplier}={partial}")
        partials.append(partial)
    result = sum(partials)
    if width > 1:
        steps.append("+".join(map(str, partials)) + f"={result}")
    return " ".join(steps), result


@dataclass
class ArithmeticTask(Task):
    """``a op b`` with operands of ``min_digits``..``max_digits`` digits and ``op`` from ``operators``.

    ``allow_negative=False`` orders subtraction operands so results are never negative. ``num_eval``
    distinct held-out problems are reserved; it may be at most a quarter of the problem space.
    """

    seed: int = 0
    min_digits: int = 1
    max_digits: int = 2
    operators: str = "+-"
    allow_negative: bool = False
    num_eval: int = 500
    format_weight: float = 1.0
    slip_kind: str = "digit"  # cold-start mistakes: "digit" (a column off by ±1) or "carry" (carries forgotten)
    name: str = field(default="arithmetic", init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits <= 9:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits <= 9, got min_digits={self.min_digits}, max_digits={self.max_digits}"
            )
        if not self.operators or any(op not in "+-*" for op in self.operators):
            raise ValueError(f"operators must be a non-empty string of '+', '-', '*', got {self.operators!r}")
        if self.slip_kind not in ("digit", "carry"):
            raise ValueError(f"slip_kind must be 'digit' or 'carry', got {self.slip_kind!r}")
        self.operators = "".join(dict.fromkeys(self.operators))  # "++-" would silently weight '+' double
        self._low = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        self._high = 10**self.max_digits - 1
        count = self._high - self._low + 1
        unordered = count * (count + 1) // 2
        space = sum(
            count * count if (op == "-" and self.allow_negative) else unordered for op in self.operators
        )
        if not 0 <= self.num_eval <= space // 4:
            raise ValueError(
                f"num_eval={self.num_eval} is too large for {space} distinct problems (at most a quarter may be "
                f"held out, i.e. num_eval <= {space // 4}); lower num_eval or widen max_digits/operators"
            )
        self._eval_rows: list[Row] = []
        self._eval_keys: set[tuple[str, int, int]] = set()
        self._build_eval_set()

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.operators)
        a, b = rng.randint(self._low, self._high), rng.randint(self._low, self._high)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        return a, op, b

    @staticmethod
    def _key(a: int, op: str, b: int) -> tuple[str, int, int]:
        return (op, min(a, b), max(a, b)) if op in "+*" else (op, a, b)

    def _row(self, a: int, op: str, b: int) -> Row:
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return {"prompt": f"{a}{op}{b}", "answer": str(value)}

    def _build_eval_set(self) -> None:
        index = 0
        while len(self._eval_rows) < self.num_eval:
            a, op, b = self._draw(row_rng(self.seed, "eval", index))
            index += 1
            key = self._key(a, op, b)
            if key not in self._eval_keys:
                self._eval_keys.add(key)
                self._eval_rows.append(self._row(a, op, b))

    def train_row(self, index: int) -> Row:
        check_index(index)
        for attempt in range(_MAX_REDRAWS):
            a, op, b = self._draw(row_rng(self.seed, "train", index, attempt))
            if self._key(a, op, b) not in self._eval_keys:
                return self._row(a, op, b)
        raise RuntimeError(
            f"could not draw a non-eval problem for train row {index}"
        )  # unreachable: <=25% held out

    def eval_rows(self, n: int | None = None) -> list[Row]:
        if n is None:
            n = self.num_eval
        if not 0 <= n <= self.num_eval:
            raise ValueError(
                f"asked for {n} eval rows but the task holds out num_eval={self.num_eval}; raise num_eval"
            )
        return [dict(row) for row in self._eval_rows[:n]]

    def accuracy_reward(self) -> RewardFn:
        return integer_accuracy

    def cold_start_completion(self, row: Row, rng: random.Random, error_rate: float = 0.0) -> str:
        check_error_rate(error_rate)
        match = _PROBLEM_RE.fullmatch(str(row["prompt"]))
        if match is None:
            raise ValueError(f"not an arithmetic prompt like '37+48': {row['prompt']!r}")
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        prefix, sign = "", ""
        if op == "-" and a < b:  # only with allow_negative: compute b-a and negate
            prefix, sign, a, b = f"{a}<{b} ", "-", b, a
        trace_fn = {"+": addition_trace, "-": subtraction_trace, "*": multiplication_trace}[op]
        slip = None
        if self.slip_kind == "carry" and op in "+-":
            # A systematic mistake rather than noise: with probability error_rate every carry (borrow) is
            # forgotten. Problems without a carry come out right either way.
            trace, result = trace_fn(a, b, None, forget_carry=rng.random() < error_rate)
            return f"<think>{prefix}{trace}</think><answer>{sign}{result}</answer>"
        if rng.random() < error_rate:
            steps = len(str(b)) if op == "*" else max(len(str(a)), len(str(b)))
            slip = (rng.randrange(steps), rng)
        trace, result = trace_fn(a, b, slip)
        return f"<think>{prefix}{trace}</think><answer>{sign}{result}</answer>"
