"""Fuzzing the built-in verifiers with hostile completions.

The policy is optimised to maximise these functions, so whatever text can crash, hang or fool them
will eventually be sampled. Properties, for every verifier: it returns one score in {0.0, 1.0} per
completion, no call takes over a second, and nothing in the text is executed (builtins eval/exec/
compile are trapped while our own verifiers run; for math-verify, whose plain-expression path hands
text to sympy's parse_expr, only digits, dots, spaces and operators may reach it).
"""

from __future__ import annotations

import builtins
import contextlib
import re
import time
from pathlib import Path

import math_verify.parser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zerorl.rewards import (
    check_countdown,
    countdown_accuracy,
    extract_answer,
    format_reward,
    integer_accuracy,
    math_accuracy,
)

SENTINEL = Path("/tmp/zerorl_fuzz_sentinel_should_never_exist")

FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<answer><answer>",
    "</answer></think>",
    "<think <answer",
    "(",
    ")",
    "((((((((",
    "))))))))",
    "+",
    "-",
    "*",
    "**",
    "/",
    "^",
    "!",
    "x",
    "\u00d7",
    "\u00f7",
    "\u2212",
    "9" * 12,
    "99999999999999999999",
    "0",
    "1",
    "3",
    "5",
    "7",
    "10^{10^{10}}",
    "2**99999999",
    "9^9^9^9",
    "1e999",
    "\\frac{1}{0}",
    "\\sqrt{",
    "\\boxed{",
    "$",
    "{",
    "}",
    "[",
    "]",
    ".",
    ",",
    " ",
    "\n",
    "\t",
    "__import__('os').system('touch " + str(SENTINEL) + "')",
    "open('/etc/passwd')",
    "lambda: 0",
    "().__class__",
    "\u0663",
    "\ud7ff",
    "\U0001f600",
    "\u202e",
    "\x00",
    "NaN",
    "inf",
    "-0",
]
fragment_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=40).map("".join)
# Megabyte strings: one fragment repeated, alone or inside the R1 tags.
huge_text = st.builds(
    lambda piece, repeat, wrapped: (
        f"<think>x</think><answer>{piece * repeat}</answer>" if wrapped else piece * repeat
    ),
    st.sampled_from(["(", "9", "<answer>", "</think>", "1+", "((1))", "\u00d7", " ", "a" * 7]),
    st.integers(1, 1_000_000),
    st.booleans(),
)
completions = st.one_of(
    fragment_text, huge_text, fragment_text.map(lambda t: f"<think>r</think><answer>{t}</answer>")
)
numbers = st.lists(st.integers(0, 10**6), min_size=1, max_size=6)

FUZZ = settings(max_examples=300, deadline=1000, database=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def nothing_may_run():
    """Trap eval/exec/compile for the duration (our verifiers must never need them)."""
    originals = builtins.eval, builtins.exec, builtins.compile

    def trap(*args, **kwargs):
        raise AssertionError(f"a verifier tried to run code: {str(args)[:200]}")

    builtins.eval = builtins.exec = builtins.compile = trap
    try:
        yield
    finally:
        builtins.eval, builtins.exec, builtins.compile = originals


def timed(fn, *args, **kwargs):
    # CPU time of this process, not wall time: on a shared 2-core machine a busy neighbour can stretch
    # the wall clock of a 0.3 s call past 1 s, and that says nothing about the verifier. (The wall-clock
    # maximum over 10,000 inputs per verifier is measured in benchmarks/reliability.py.)
    start = time.process_time()
    result = fn(*args, **kwargs)
    elapsed = time.process_time() - start
    assert elapsed < 1.0, f"{fn.__name__} took {elapsed:.2f} s of CPU"
    return result


def assert_scores(scores, size=1):
    assert len(scores) == size and all(score in (0.0, 1.0) for score in scores)


@FUZZ
@given(completions)
def test_format_and_extract_answer_fuzz(completion):
    with nothing_may_run():
        assert_scores(timed(format_reward, ["p"], [completion]))
        answer = timed(extract_answer, completion)
    assert answer is None or len(answer) <= 1000


@FUZZ
@given(completions, st.integers(-(10**30), 10**30))
def test_integer_accuracy_fuzz(completion, reference):
    with nothing_may_run():
        assert_scores(timed(integer_accuracy, ["p"], [completion], answer=[str(reference)]))


@FUZZ
@given(completions, numbers, st.integers(-(10**6), 10**6), st.booleans())
def test_countdown_fuzz(completion, given_numbers, target, require_all):
    with nothing_may_run():
        assert_scores(
            timed(
                countdown_accuracy,
                ["p"],
                [completion],
                numbers=[given_numbers],
                target=[target],
                require_all=require_all,
            )
        )
        timed(check_countdown, completion, given_numbers, target)
    assert not SENTINEL.exists()


@FUZZ
@given(
    st.recursive(
        st.sampled_from(["1", "3", "7", "99"]),
        lambda inner: st.one_of(
            st.builds(lambda a, op, b: f"{a}{op}{b}", inner, st.sampled_from("+-*/x\u00d7\u00f7"), inner),
            inner.map(lambda e: f"({e})"),
        ),
        max_leaves=40,
    )
)
def test_countdown_checks_well_formed_expressions_fast(expression):
    """Grammatical expressions (deep nesting included) are judged without error or blow-up."""
    with nothing_may_run():
        verdict = timed(check_countdown, expression, [1, 3, 7, 99] * 10, 0, require_all=False)
    assert isinstance(verdict.correct, bool)


# \d, not [0-9]: unicode digits such as "２" or "٣" do reach sympy, and they cannot form code either.
_ARITHMETIC_ONLY = re.compile(r"[\d.\s+\-*/^()\u00d7\u00f7]*")


@FUZZ
@given(completions, st.sampled_from(["42", "\\frac{1}{2}", "x^2+1", "\\sqrt{2}", "-3"]))
# Known bombs, always tried: huge powers, towers and factorials that sympy would try to compute.
@example("<think></think><answer>2**999999999</answer>", "42")
@example("<think></think><answer>$2^{999999999}$</answer>", "42")
@example("<think></think><answer>9^9^9^9</answer>", "42")
@example("<think></think><answer>(10**10)**(10**10)</answer>", "42")
@example("<think></think><answer>$99999999!$</answer>", "42")
@example("<think></think><answer>$\\sqrt{" * 100 + "2" + "}" * 100 + "$</answer>", "42")
def test_math_accuracy_fuzz(completion, reference):
    seen = []
    original = math_verify.parser.parse_expr

    def watched_parse_expr(text, *args, **kwargs):
        seen.append(text)
        return original(text, *args, **kwargs)

    math_verify.parser.parse_expr = watched_parse_expr
    try:
        assert_scores(timed(math_accuracy, ["p"], [completion], answer=[reference]))
    finally:
        math_verify.parser.parse_expr = original
    assert all(_ARITHMETIC_ONLY.fullmatch(text) for text in seen), seen
    assert not SENTINEL.exists()
