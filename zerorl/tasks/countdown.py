"""Countdown (the TinyZero task): reach ``target`` from ``numbers`` with + - * / and parentheses,
using each number once. Example row::

    {"prompt": "Using the numbers [3, 5, 7], create an equation that equals 32. ...",
     "answer": "32", "numbers": [3, 5, 7], "target": 32, "solution": "5*7-3"}

Every problem is built backwards from a random expression over its numbers (combine two random
operands with a random operator until one value is left; intermediate values stay positive integers),
so a solution always exists and is kept in the ``solution`` column. Eval problems come from a separate
seed stream; a training problem with the same (sorted numbers, target) as an eval one is redrawn.

Cold-start trace: a short search, failed attempts ending in "no", then the solution's steps::

    <think>3+5=8 8+7=15 no 5*7=35 35-3=32</think><answer>5*7-3</answer>

A slip (probability ``error_rate``) miscomputes the last step of a wrong attempt as the target and
answers with it: well-formed, but ``countdown_accuracy`` scores it 0.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

from zerorl.rewards.accuracy import countdown_accuracy
from zerorl.rewards.expression import BinaryOp, Node, Number, evaluate, parse_expression, render
from zerorl.rewards.reward_set import RewardFn
from zerorl.tasks.base import Row, Task, check_error_rate, check_index, row_rng

_MAX_REDRAWS = 10_000
PROMPT_STYLES = ("tinyzero", "compact")


def _combine(left: tuple[Node, int], right: tuple[Node, int], op: str) -> tuple[Node, int] | None:
    """``left op right`` if its value is a positive integer, else None. Operands may be swapped for
    - and / (so 3-8 becomes 8-3)."""
    (left_node, a), (right_node, b) = left, right
    if op == "+":
        return BinaryOp("+", left_node, right_node), a + b
    if op == "*":
        return BinaryOp("*", left_node, right_node), a * b
    if op == "-":
        if a == b:
            return None
        return (
            (BinaryOp("-", left_node, right_node), a - b)
            if a > b
            else (BinaryOp("-", right_node, left_node), b - a)
        )
    if b != 0 and a % b == 0:
        return BinaryOp("/", left_node, right_node), a // b
    if a != 0 and b % a == 0:
        return BinaryOp("/", right_node, left_node), b // a
    return None


def random_expression(numbers: list[int], operators: str, rng: random.Random) -> tuple[Node, int, list[str]]:
    """A random expression using every number once: ``(tree, value, steps)`` where ``steps`` are the
    intermediate computations in order, e.g. ``["5*7=35", "35-3=32"]``."""
    pool: list[tuple[Node, int]] = [(Number(n), n) for n in numbers]
    steps = []
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        left, right = pool[i], pool[j]
        combined = None
        for op in rng.sample(operators, len(operators)):  # first valid operator in a random order
            combined = _combine(left, right, op)
            if combined is not None:
                break
        if combined is None:  # only '-' or '/' allowed and neither fits: add instead
            combined = (BinaryOp("+", left[0], right[0]), left[1] + right[1])
        node = combined[0]
        steps.append(f"{_value(node.left)}{node.op}{_value(node.right)}={combined[1]}")
        pool = [item for k, item in enumerate(pool) if k not in (i, j)] + [combined]
    return pool[0][0], pool[0][1], steps


def _value(node: Node) -> int:
    return int(evaluate(node))


def expression_steps(node: Node) -> list[str]:
    """The computations of a tree in evaluation order, e.g. ``5*7-3`` → ``["5*7=35", "35-3=32"]``."""
    if isinstance(node, Number):
        return []
    value = evaluate(node)
    value_text = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    own = f"{_fraction_text(evaluate(node.left))}{node.op}{_fraction_text(evaluate(node.right))}={value_text}"
    return expression_steps(node.left) + expression_steps(node.right) + [own]


def _fraction_text(value) -> str:
    return str(value.numerator) if value.denominator == 1 else f"({value.numerator}/{value.denominator})"


@dataclass
class CountdownTask(Task):
    """Countdown with ``num_numbers`` numbers in [min_number, max_number] and a target in
    [min_target, max_target]. ``prompt_style``: "tinyzero" (TinyZero's wording) or "compact"
    (``"3,5,7->32"``, for tiny models). ``require_all``: the answer must use every number (TinyZero)."""

    seed: int = 0
    num_numbers: int = 3
    min_number: int = 1
    max_number: int = 99
    min_target: int = 1
    max_target: int = 999
    operators: str = "+-*/"
    num_eval: int = 500
    prompt_style: str = "tinyzero"
    require_all: bool = True
    max_failed_attempts: int = 2
    format_weight: float = 1.0
    name: str = field(default="countdown", init=False)

    def __post_init__(self) -> None:
        if not 2 <= self.num_numbers <= 6:
            raise ValueError(f"num_numbers must be in 2..6, got {self.num_numbers}")
        if not 1 <= self.min_number <= self.max_number:
            raise ValueError(f"need 1 <= min_number <= max_number, got {self.min_number}, {self.max_number}")
        if not 1 <= self.min_target <= self.max_target:
            raise ValueError(f"need 1 <= min_target <= max_target, got {self.min_target}, {self.max_target}")
        if not self.operators or any(op not in "+-*/" for op in self.operators):
            raise ValueError(
                f"operators must be a non-empty string of '+', '-', '*', '/', got {self.operators!r}"
            )
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.num_eval < 0:
            raise ValueError(f"num_eval must be >= 0, got {self.num_eval}")
        self.operators = "".join(dict.fromkeys(self.operators))
        self._eval_rows: list[Row] = []
        self._eval_keys: set[tuple[tuple[int, ...], int]] = set()
        index = 0
        while len(self._eval_rows) < self.num_eval:
            row = self._generate("eval", index, 0)
            index += 1
            if index > 100 * (self.num_eval + 10):
                raise ValueError(
                    f"could not find num_eval={self.num_eval} distinct problems; widen the number/target ranges"
                )
            if row is not None and self._key(row) not in self._eval_keys:
                self._eval_keys.add(self._key(row))
                self._eval_rows.append(row)

    @staticmethod
    def _key(row: Row) -> tuple[tuple[int, ...], int]:
        return tuple(sorted(row["numbers"])), row["target"]

    def _generate(self, stream: str, index: int, attempt: int) -> Row | None:
        rng = row_rng(self.seed, stream, index, attempt)
        numbers = [rng.randint(self.min_number, self.max_number) for _ in range(self.num_numbers)]
        node, target, _ = random_expression(numbers, self.operators, rng)
        if not self.min_target <= target <= self.max_target:
            return None
        return {
            "prompt": self._prompt(numbers, target),
            "answer": str(target),
            "numbers": numbers,
            "target": target,
            "solution": render(node),
        }

    def _prompt(self, numbers: list[int], target: int) -> str:
        if self.prompt_style == "compact":
            return ",".join(map(str, numbers)) + f"->{target}"
        return (
            f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
            "arithmetic operations (+, -, *, /) and each number can only be used once"
        )

    def train_row(self, index: int) -> Row:
        check_index(index)
        for attempt in range(_MAX_REDRAWS):
            row = self._generate("train", index, attempt)
            if row is not None and self._key(row) not in self._eval_keys:
                return row
        raise RuntimeError(
            f"no valid problem for train row {index} after {_MAX_REDRAWS} draws; widen min_target..max_target"
        )

    def eval_rows(self, n: int | None = None) -> list[Row]:
        if n is None:
            n = self.num_eval
        if not 0 <= n <= self.num_eval:
            raise ValueError(
                f"asked for {n} eval rows but the task holds out num_eval={self.num_eval}; raise num_eval"
            )
        return [dict(row, numbers=list(row["numbers"])) for row in self._eval_rows[:n]]

    def accuracy_reward(self) -> RewardFn:
        if self.require_all:
            return countdown_accuracy
        return functools.partial(countdown_accuracy, require_all=False)

    def cold_start_completion(self, row: Row, rng: random.Random, error_rate: float = 0.0) -> str:
        check_error_rate(error_rate)
        numbers, target = list(row["numbers"]), row["target"]
        attempts = []
        for _ in range(rng.randint(0, self.max_failed_attempts)):
            _, value, steps = random_expression(numbers, self.operators, rng)
            if value != target:
                attempts.append(" ".join(steps) + " no")
        if rng.random() < error_rate:
            node, steps = self._slipped_attempt(numbers, target, rng)
        else:
            node = parse_expression(row["solution"])
            steps = expression_steps(node)
        return f"<think>{' '.join(attempts + steps)}</think><answer>{render(node)}</answer>"

    def _slipped_attempt(self, numbers: list[int], target: int, rng: random.Random) -> tuple[Node, list[str]]:
        """A wrong expression whose last step is miscomputed as the target (the realistic slip)."""
        for _ in range(100):
            node, value, steps = random_expression(numbers, self.operators, rng)
            if value != target:
                steps[-1] = steps[-1].rsplit("=", 1)[0] + f"={target}"
                return node, steps
        # Every random path hit the target (tiny ranges): answer with one number short instead.
        node = Number(numbers[0])
        return node, [f"{numbers[0]}={target}"]
