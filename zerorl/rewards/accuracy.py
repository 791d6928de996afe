"""Rule-based accuracy rewards: is the content of ``<answer>`` right?

Each follows the TRL reward shape ``fn(prompts, completions, **columns) -> list[float]`` and reads the
reference from a dataset column (``answer``, or ``numbers`` and ``target`` for Countdown). A missing or
malformed ``<answer>`` scores 0.0; a malformed *reference* is a data bug and raises ``ValueError``.
"""

from __future__ import annotations

import functools
import re
import signal
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from zerorl.rewards.expression import check_countdown
from zerorl.rewards.format import completion_text, extract_answer

# Strict: optional sign, ASCII digits only (int() alone would accept "٣", "1_000" and " 4 \n"), and a
# digit cap that keeps far below Python's int-parsing limit.
_INTEGER_RE = re.compile(r"[+-]?[0-9]{1,100}")


def _column(name: str, values: Any, expected_length: int) -> Sequence:
    if values is None:
        raise ValueError(f"this reward needs the dataset column {name!r}; add it to every row")
    if len(values) != expected_length:
        raise ValueError(f"column {name!r} has {len(values)} values for {expected_length} completions")
    return values


def parse_integer(text: str) -> int | None:
    """The integer written in ``text`` (surrounding whitespace allowed), or None if it is anything else."""
    text = text.strip()
    return int(text) if _INTEGER_RE.fullmatch(text) else None


def integer_accuracy(
    prompts: list, completions: list, answer: Sequence | None = None, **kwargs: Any
) -> list[float]:
    """1.0 where the ``<answer>`` block holds exactly the integer in the ``answer`` column, else 0.0."""
    answers = _column("answer", answer, len(completions))
    rewards = []
    for completion, reference in zip(completions, answers):
        expected = reference if isinstance(reference, int) else parse_integer(str(reference))
        if expected is None:
            raise ValueError(f"integer_accuracy: the answer column holds {reference!r}, not an integer")
        given = extract_answer(completion_text(completion))
        rewards.append(1.0 if given is not None and parse_integer(given) == expected else 0.0)
    return rewards


def countdown_accuracy(
    prompts: list,
    completions: list,
    numbers: Sequence | None = None,
    target: Sequence | None = None,
    require_all: bool = True,
    **kwargs: Any,
) -> list[float]:
    """1.0 where the ``<answer>`` block is an arithmetic expression over the row's ``numbers`` (each at
    most once; exactly once when ``require_all``) equal to its ``target``; see ``expression.py``."""
    numbers = _column("numbers", numbers, len(completions))
    targets = _column("target", target, len(completions))
    rewards = []
    for completion, row_numbers, row_target in zip(completions, numbers, targets):
        if not all(isinstance(n, int) for n in row_numbers):
            raise ValueError(f"countdown_accuracy: the numbers column holds {row_numbers!r}, not integers")
        given = extract_answer(completion_text(completion))
        correct = (
            given is not None
            and check_countdown(given, list(row_numbers), Fraction(row_target), require_all)[0]
        )
        rewards.append(1.0 if correct else 0.0)
    return rewards


# ----------------------------------------------------------------------------------------------------
# math-verify


class _VerifyTimeout(BaseException):
    """Raised by our SIGALRM handler. A BaseException so math-verify's ``except Exception`` can't eat it."""


# Answers math-verify cannot finish quickly: sympy may spend seconds on big powers and factorials inside
# single big-integer C calls, which the timer's signal cannot interrupt (measured: math-verify took 0.66 s
# on 2**99999999 here). They are refused before parsing; a real final answer is never 2**99999999.
# Exponents and factorial arguments are capped at 4 digits, and towers (a^b^c) refused.
_EXPONENT = r"(?:\^|\*\*)\s*[{(]?\s*"
_HUGE_POWER_RE = re.compile(_EXPONENT + r"[0-9]{5,}")
_POWER_TOWER_RE = re.compile(_EXPONENT + r"[0-9a-zA-Z.]+\s*[})]?\s*(?:\^|\*\*)")
_HUGE_FACTORIAL_RE = re.compile(r"[0-9]{5,}\s*[})]?\s*!|\\(?:factorial|Gamma)|factorial")
MATH_MAX_ANSWER_CHARS = 300


def _too_expensive(text: str) -> bool:
    return bool(
        _HUGE_POWER_RE.search(text) or _POWER_TOWER_RE.search(text) or _HUGE_FACTORIAL_RE.search(text)
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(reference: str) -> Any:
    from math_verify import parse

    # math-verify only recognises LaTeX between delimiters; a bare "\frac{1}{2}" in a dataset is common.
    return parse(
        reference if "$" in reference or "\\boxed" in reference else f"${reference}$", parsing_timeout=None
    )


def _silence_math_verify_timeout_warning() -> None:
    # We pass timeout=None (see math_accuracy) and enforce our own timer; math-verify would otherwise
    # log a warning that no timeout is set.
    import math_verify.grader
    import math_verify.parser

    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True


def math_accuracy(
    prompts: list, completions: list, answer: Sequence | None = None, timeout_s: float = 0.5, **kwargs: Any
) -> list[float]:
    """1.0 where math-verify judges the ``<answer>`` block equal to the ``answer`` column (LaTeX or plain
    expressions: ``\\frac{1}{2}`` = ``0.5`` = ``1/2``), else 0.0.

    math-verify's own timeouts use ``signal.alarm`` with whole seconds and nest badly, so we disable them
    and bound each sample with one ``signal.setitimer`` of ``timeout_s`` seconds; a sample that runs out
    scores 0.0. Signals only work in the main thread: call this from the main thread, or run it in a
    worker process (``ProcessRewardFunction``). Inputs over 300 characters, huge powers and factorials
    are refused before parsing (score 0.0), because sympy can spend seconds on them inside single C
    calls that the timer cannot interrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "math_accuracy must run in the main thread (it bounds math-verify with SIGALRM, which only "
            "works there); call the reward from the main thread or isolate it in a ProcessRewardFunction"
        )
    from math_verify import parse, verify

    _silence_math_verify_timeout_warning()
    answers = _column("answer", answer, len(completions))
    rewards = []
    for completion, reference in zip(completions, answers):
        given = extract_answer(completion_text(completion), max_chars=MATH_MAX_ANSWER_CHARS)
        if not given or _too_expensive(given):
            rewards.append(0.0)
            continue
        previous_handler = signal.signal(signal.SIGALRM, _raise_verify_timeout)
        try:
            # Re-armed every 50 ms after the first expiry: an alarm that lands inside a callback which can only
            # report exceptions and drop them (a gc callback, a __del__) is followed by another.
            signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.05)
            gold = _parse_gold(str(reference))
            prediction = parse(
                given if "$" in given or "\\boxed" in given else f"${given}$", parsing_timeout=None
            )
            if not prediction:  # not LaTeX: fall back to math-verify's plain-expression reading
                prediction = parse(given, parsing_timeout=None)
            correct = bool(verify(gold, prediction, timeout_seconds=None))
        except _VerifyTimeout:
            correct = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous_handler)
        rewards.append(1.0 if correct else 0.0)
    return rewards


def _raise_verify_timeout(signum: int, frame: Any) -> None:
    raise _VerifyTimeout
