"""Rule-based verifiers, the reward-set protocol, loading and process isolation."""

from __future__ import annotations

import math
import re
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import pytest

from zerorl.rewards import (
    BUILTIN_REWARDS,
    ExpressionError,
    ProcessRewardFunction,
    RewardFunctionError,
    RewardLoadError,
    RewardSet,
    RewardTimeoutError,
    RewardWorkerError,
    check_countdown,
    countdown_accuracy,
    evaluate,
    extract_answer,
    format_reward,
    integer_accuracy,
    load_reward_function,
    math_accuracy,
    parse_expression,
    render,
    resolve_reward,
)


def wrap(answer: str) -> str:
    return f"<think>reasoning</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("  <think>\nmulti\nline</think>\n <answer> 85 </answer>\n", 1.0),
        ("<think></think><answer></answer>", 1.0),
        ("<answer>b</answer><think>a</think>", 0.0),  # wrong order
        ("<think>a</think>", 0.0),  # no answer
        ("<answer>b</answer>", 0.0),  # no think
        ("<think>a</think>junk<answer>b</answer>", 0.0),  # text between the blocks
        ("<think>a</think><answer>b</answer>trailing", 0.0),
        ("leading<think>a</think><answer>b</answer>", 0.0),
        ("<think><think>a</think></think><answer>b</answer>", 0.0),  # nested think
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0),  # two answers
        ("<think>a<answer>x</answer></think><answer>b</answer>", 0.0),  # answer tag inside think
        ("<think>a</think><answer>b", 0.0),  # unclosed
        ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0),  # case matters
    ],
)
def test_format_reward_cases(completion, expected):
    assert format_reward(["p"], [completion]) == [expected]


def test_format_reward_accepts_trl_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}],
        [{"role": "assistant", "content": "b"}],
    ]
    assert format_reward(["p", "p"], completions) == [1.0, 0.0]


def test_extract_answer():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <answer>2</answer>") == "2"  # the last one
    assert extract_answer("<answer>1</answer> <answer>2") == "1"  # last *closed* block
    assert extract_answer("no tags") is None
    assert extract_answer("</answer><answer>") is None
    assert extract_answer("<answer>" + "9" * 1001 + "</answer>") is None  # bounded length
    assert extract_answer("<answer>" + "9" * 1000 + "</answer>") == "9" * 1000


# --------------------------------------------------------------------------------------------- integer


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("85", 1.0),
        (" 85 ", 1.0),
        ("+85", 1.0),
        ("085", 1.0),
        ("86", 0.0),
        ("85.0", 0.0),
        ("8.5e1", 0.0),
        ("85 apples", 0.0),
        ("", 0.0),
        ("0x55", 0.0),
        ("8_5", 0.0),
        ("\u0668\u0665", 0.0),
        ("85\n", 1.0),
        ("-85", 0.0),
    ],
)
def test_integer_accuracy_cases(answer, expected):
    assert integer_accuracy(["p"], [wrap(answer)], answer=["85"]) == [expected]


def test_integer_accuracy_negative_and_missing_tags():
    assert integer_accuracy(
        ["p", "p", "p"], [wrap("-11"), "-11", wrap("11")], answer=["-11", "-11", -11]
    ) == [1.0, 0.0, 0.0]


def test_integer_accuracy_bad_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="not an integer"):
        integer_accuracy(["p"], [wrap("1")], answer=["one"])
    with pytest.raises(ValueError, match="column 'answer'"):
        integer_accuracy(["p"], [wrap("1")])


# ------------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("42", "42", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("1/2", "\\frac{1}{2}", 1.0),
        ("\\boxed{3}", "3", 1.0),
        ("x^2+1", "1+x^2", 1.0),
        ("43", "42", 0.0),
        ("2**99999999", "1", 0.0),
        ("9^9^9^9", "1", 0.0),
        ("1000000!", "1", 0.0),
        ("", "1", 0.0),
    ],
)
def test_math_accuracy_cases(answer, reference, expected):
    assert math_accuracy(["p"], [wrap(answer)], answer=[reference]) == [expected]


def test_a_swallowed_verify_timeout_is_followed_by_another(monkeypatch):
    """The first alarm lands where the exception is dropped (as in a gc callback); the timer fires again."""
    import math_verify

    swallowed = []

    def busy(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass

    def stubborn_verify(*args, **kwargs):
        try:
            busy(5.0)
        except BaseException as error:  # noqa: BLE001  (what an unraisable-exception context does)
            swallowed.append(type(error).__name__)
        busy(5.0)
        return True

    monkeypatch.setattr(math_verify, "verify", stubborn_verify)
    start = time.monotonic()
    assert math_accuracy(["p"], [wrap("42")], answer=["42"], timeout_s=0.2) == [0.0]
    assert swallowed == ["_VerifyTimeout"] and time.monotonic() - start < 2.0


def test_math_accuracy_refuses_worker_threads():
    import threading

    errors = []
    thread = threading.Thread(
        target=lambda: errors.append(_capture(math_accuracy, ["p"], [wrap("1")], answer=["1"]))
    )
    thread.start()
    thread.join()
    assert isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])


def _capture(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as error:
        return error
    return None


# ------------------------------------------------------------------------------------------- countdown


def test_expression_values_are_exact():
    assert evaluate(parse_expression("(3+5)*7-2")) == 54
    assert evaluate(parse_expression("1/3*3")) == 1  # exact rationals: no 0.9999999
    assert evaluate(parse_expression("7/2")) == Fraction(7, 2)
    assert evaluate(parse_expression("8-3-2")) == 3  # left associative
    assert evaluate(parse_expression("24/4/2")) == 3
    assert evaluate(parse_expression("2\u00d73 \u00f7 6 \u2212 1 x 0")) == 1  # ×, ÷, −, x spellings
    assert render(parse_expression("((3+5))*(7-(2-1))")) == "(3+5)*(7-(2-1))"
    assert render(parse_expression("3+(5-2)")) == "3+5-2"


@pytest.mark.parametrize(
    ("expression", "numbers", "target", "correct", "reason"),
    [
        ("(3+5)*7", [3, 5, 7], 56, True, ""),
        ("7*(5+3)", [3, 5, 7], 56, True, ""),
        ("3+5+7", [3, 5, 7], 56, False, "evaluates to 15"),
        ("3*3+5", [3, 5, 7], 14, False, "uses 3, which is not"),  # reuse
        ("(3+5)*8", [3, 5, 7], 64, False, "uses 8, which is not"),  # number not given
        ("3+5", [3, 5, 7], 8, False, "does not use [7]"),  # require_all
        ("7/(5-5)", [5, 5, 7], 0, False, "division by zero"),
        ("3**5", [3, 5], 243, False, "expected a number"),  # power is not allowed
        ("3^5", [3, 5], 6, False, "unexpected character '^'"),
        ("-3+5", [3, 5], 2, False, "expected a number"),  # no unary minus
        ("abs(3)+5", [3, 5], 8, False, "unexpected character 'a'"),
        ("__import__('os')", [3], 3, False, "unexpected character '_'"),
        ("(3).real+5", [3, 5], 8, False, "unexpected character '.'"),
        ("[3]+5", [3, 5], 8, False, "unexpected character '['"),
        ("{3}+5", [3, 5], 8, False, "unexpected character '{'"),
        ("3.0+5", [3, 5], 8, False, "unexpected character '.'"),
        ("(3+5", [3, 5], 8, False, "not closed"),
        ("3+5)", [3, 5], 8, False, "unexpected ')'"),
        ("", [3], 3, False, "empty expression"),
        ("3 5", [3, 5], 8, False, "unexpected '5'"),
        ("\u0663+5", [3, 5], 8, False, "unexpected character"),  # Arabic-Indic three
        ("(" * 17 + "3" + ")" * 17, [3], 3, False, "nested deeper than 16"),
        ("(" * 16 + "3" + ")" * 16, [3], 3, True, ""),
        ("1" + "+1" * 100, [1] * 101, 101, False, "longer than 200"),
        ("1" + "+1" * 40, [1] * 41, 41, False, "more than 64 tokens"),
        ("1234567890+1", [1234567890, 1], 1234567891, False, "more than 9 digits"),
    ],
)
def test_check_countdown_cases(expression, numbers, target, correct, reason):
    verdict = check_countdown(expression, numbers, target)
    assert verdict.correct is correct
    assert reason in verdict.reason


def test_countdown_require_all_false_allows_subsets():
    assert check_countdown("3+5", [3, 5, 7], 8, require_all=False).correct
    assert not check_countdown("3+3", [3, 5, 7], 6, require_all=False).correct  # still at most once


def test_countdown_accuracy_reward():
    completions = [wrap("(3+5)*7"), wrap("3*5*7"), "(3+5)*7", wrap(" 7 \u00d7 (3 + 5) ")]
    rewards = countdown_accuracy(["p"] * 4, completions, numbers=[[3, 5, 7]] * 4, target=[56] * 4)
    assert rewards == [1.0, 0.0, 0.0, 1.0]


def test_parse_expression_raises_expression_error():
    with pytest.raises(ExpressionError, match="position 2"):
        parse_expression("3+x+")


# ------------------------------------------------------------------------------------------- RewardSet


def _constant(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    return reward


def test_reward_set_weights_and_columns():
    def echo_answer(prompts, completions, answer, **kwargs):
        return [float(a) for a in answer]

    reward_set = RewardSet([("acc", echo_answer, 2.0), ("fmt", format_reward, 0.5)])
    total, per_func = reward_set(["p", "q"], [wrap("1"), "bad"], {"answer": ["1", "3"], "unused": [0, 0]})
    assert per_func == {"acc": [1.0, 3.0], "fmt": [1.0, 0.0]}
    assert total == [2.0 * 1.0 + 0.5 * 1.0, 2.0 * 3.0 + 0.0]
    assert reward_set.names == ["acc", "fmt"]


def test_reward_set_raise_policy_names_function_and_sample():
    def broken(prompts, completions, **kwargs):
        raise KeyError("boom")

    with pytest.raises(
        RewardFunctionError, match=r"'broken_fn': raised KeyError: 'boom'(.|\n)*offending completion"
    ):
        RewardSet([("broken_fn", broken, 1.0)])(["p"], ["some completion"])
    with pytest.raises(RewardFunctionError, match="'short': returned 1 values for 2 completions"):
        RewardSet([("short", lambda prompts, completions, **kw: [1.0], 1.0)])(["p", "q"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="'nan': value 1 is nan, not a finite number"):
        RewardSet([("nan", _constant_list([1.0, math.nan]), 1.0)])(["p", "q"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="'none': value 0 is None"):
        RewardSet([("none", _constant(None), 1.0)])(["p"], ["a"])
    with pytest.raises(RewardFunctionError, match="'scalar': returned float"):
        RewardSet([("scalar", lambda prompts, completions, **kw: 1.0, 1.0)])(["p"], ["a"])


def _constant_list(values):
    return lambda prompts, completions, **kwargs: list(values)


def test_reward_set_zero_policy_counts_and_warns():
    def broken(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    reward_set = RewardSet(
        [
            ("ok", _constant(1.0), 1.0),
            ("broken", broken, 1.0),
            ("holes", _constant_list([None, 2.0, math.inf]), 1.0),
        ],
        error_policy="zero",
    )
    with pytest.warns(RuntimeWarning) as caught:
        total, per_func = reward_set(["p"] * 3, ["a", "b", "c"])
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2  # one warning per failing function, however many samples failed
    assert "'broken' raised RuntimeError: boom" in messages[0] and "'holes' value 0 is None" in messages[1]
    assert per_func["broken"] == [0.0, 0.0, 0.0]
    assert per_func["holes"] == [0.0, 2.0, 0.0]
    assert total == [1.0, 3.0, 1.0]
    assert reward_set.error_counts == {"ok": 0, "broken": 3, "holes": 2}


def test_reward_set_validates_construction_and_inputs():
    with pytest.raises(ValueError, match="used twice"):
        RewardSet([("a", _constant(1.0), 1.0), ("a", _constant(1.0), 1.0)])
    with pytest.raises(ValueError, match="weight nan"):
        RewardSet([("a", _constant(1.0), math.nan)])
    with pytest.raises(ValueError, match="error_policy"):
        RewardSet([("a", _constant(1.0), 1.0)], error_policy="ignore")
    reward_set = RewardSet([("a", _constant(1.0), 1.0)])
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2"):
        reward_set(["p", "q"], ["a", "b"], {"answer": ["x"]})
    with pytest.raises(ValueError, match="may not be named 'prompts'"):
        reward_set(["p"], ["a"], {"prompts": ["x"]})


# ------------------------------------------------------------------------------------- loading/isolation


@pytest.fixture
def user_reward_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(
        textwrap.dedent(
            """
            import os
            import time

            def exact(prompts, completions, answer, **kwargs):
                return [float(c == a) for c, a in zip(completions, answer)]

            def sleepy(prompts, completions, **kwargs):
                time.sleep(30)
                return [0.0] * len(completions)

            def crash(prompts, completions, **kwargs):
                os._exit(3)

            def raises(prompts, completions, **kwargs):
                raise ValueError("user bug")

            def no_kwargs(prompts, completions):
                return [0.0] * len(completions)

            NOT_A_FUNCTION = 3
            """
        )
    )
    return path


def test_load_reward_function_from_file_and_module(user_reward_file):
    fn = load_reward_function(f"{user_reward_file}:exact")
    assert fn(prompts=["p", "p"], completions=["1", "2"], answer=["1", "1"], extra=[0, 0]) == [1.0, 0.0]
    assert load_reward_function("zerorl.rewards.format:format_reward") is format_reward
    assert resolve_reward("integer_accuracy") is BUILTIN_REWARDS["integer_accuracy"]


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("no_colon", RewardLoadError, "must look like 'module:function'"),
        ("zerorl.rewards.format:", RewardLoadError, "must look like"),
        ("not_a_module_xyz:fn", RewardLoadError, "cannot import module 'not_a_module_xyz'"),
        (
            "zerorl.rewards.format:nope",
            RewardLoadError,
            "no attribute 'nope'; callables there: .*format_reward",
        ),
        ("/does/not/exist.py:fn", FileNotFoundError, "does not exist"),
        ("{file}:NOT_A_FUNCTION", RewardLoadError, "is a int, not a function"),
        ("{file}:no_kwargs", RewardLoadError, "must accept \\*\\*kwargs"),
    ],
)
def test_load_reward_function_errors(user_reward_file, spec, error, message):
    with pytest.raises(error, match=message):
        load_reward_function(spec.format(file=user_reward_file))


def test_resolve_reward_unknown_name_lists_builtins():
    with pytest.raises(RewardLoadError, match="built-in rewards are .*format"):
        resolve_reward("accuracy_typo")


def test_process_reward_function_timeout_kill_and_restart(user_reward_file):
    """A hung function is killed after its timeout, reported by name, and the next call gets a fresh
    worker; a crash and an exception in the worker are reported too."""
    with ProcessRewardFunction(f"{user_reward_file}:sleepy", timeout_s=1.0, name="sleepy") as sleepy:
        start = time.monotonic()
        with pytest.raises(RewardTimeoutError, match=r"'sleepy' did not return within 1 s"):
            sleepy(["p"], ["a"])
        assert 0.9 < time.monotonic() - start < 3.0
        assert sleepy.restarts == 1

    with ProcessRewardFunction(f"{user_reward_file}:exact", timeout_s=5.0) as exact:
        assert exact(["p", "p"], ["1", "2"], answer=["1", "1"]) == [1.0, 0.0]
        # The same function under a RewardSet, as the trainer uses it.
        total, _ = RewardSet([("exact", exact, 1.0)])(["p"], ["7"], {"answer": ["7"]})
        assert total == [1.0]

    with ProcessRewardFunction(f"{user_reward_file}:crash", timeout_s=5.0) as crash:
        with pytest.raises(RewardWorkerError, match="died \\(exit code 3\\)"):
            crash(["p"], ["a"])
    with ProcessRewardFunction(f"{user_reward_file}:raises", timeout_s=5.0) as raises:
        with pytest.raises(RewardWorkerError, match="ValueError: user bug"):
            raises(["p"], ["a"])
        with pytest.raises(RewardFunctionError, match="'user_fn': raised RewardWorkerError"):
            RewardSet([("user_fn", raises, 1.0)])(["p"], ["a"])
    with pytest.raises(RewardLoadError, match="could not be loaded in the worker: .*no attribute 'missing'"):
        ProcessRewardFunction(f"{user_reward_file}:missing", timeout_s=5.0)


def test_math_accuracy_works_in_a_worker_process():
    with ProcessRewardFunction("math_accuracy", timeout_s=20.0) as reward:
        assert reward(["p", "p"], [wrap("\\frac{1}{2}"), wrap("3")], answer=["0.5", "0.5"]) == [1.0, 0.0]


def test_no_eval_exec_or_compile_in_verifiers():
    """Verifiers read text written by a policy being optimised to exploit them: nothing may run it."""
    root = Path(__file__).resolve().parents[1] / "zerorl"
    # Any call of eval/exec/compile (bare or as an attribute, e.g. builtins.eval) except re.compile, and
    # the other ways to run text: ast.literal_eval, sympify, __builtins__, importing ast.
    forbidden = re.compile(
        r"(?<!\bre\.)\b(eval|exec|compile)\s*\(|literal_eval|sympify|__builtins__|^\s*(import|from)\s+ast\b"
    )
    offenders = []
    for folder in ("rewards", "tasks"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if forbidden.search(line):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert (root / "rewards" / "expression.py").exists()
    assert offenders == []
