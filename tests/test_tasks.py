"""Tasks: determinism, train/eval disjointness, cold-start traces, user data and templates."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from zerorl.rewards import check_countdown, countdown_accuracy, format_reward, integer_accuracy
from zerorl.tasks import (
    R1_TEMPLATE,
    TASKS,
    ArithmeticTask,
    CountdownTask,
    DataFormatError,
    HFDatasetTask,
    JsonlTask,
    format_prompt,
    get_task,
)


def arithmetic_key(row):
    a, op, b = next(row["prompt"].partition(op) for op in "+-*" if op in row["prompt"])
    a, b = int(a), int(b)
    return (op, min(a, b), max(a, b)) if op in "+*" else (op, a, b)


def countdown_key(row):
    return tuple(sorted(row["numbers"])), row["target"]


# ------------------------------------------------------------------------------------- determinism/split


@pytest.mark.parametrize("task_cls", [ArithmeticTask, CountdownTask])
def test_rows_are_a_pure_function_of_seed_and_index(task_cls):
    first, second = task_cls(seed=3), task_cls(seed=3)
    backwards = [second.train_row(i) for i in reversed(range(200))][::-1]  # call order must not matter
    assert [first.train_row(i) for i in range(200)] == backwards
    assert first.eval_rows(50) == second.eval_rows(50)
    other_task = task_cls(seed=4)
    other = [other_task.train_row(i) for i in range(200)]
    assert sum(a != b for a, b in zip(backwards, other)) > 150


# Small problem spaces on purpose: drawn independently, about half of these train rows would be eval
# problems (measured: 7049 of 15514 for the small Countdown), so the test fails if the redraw is lost.
@pytest.mark.parametrize(
    ("task", "key", "min_distinct"),
    [
        (ArithmeticTask(), arithmetic_key, 5_000),
        (CountdownTask(max_number=9, max_target=30), countdown_key, 1_000),
    ],
)
def test_train_and_eval_are_disjoint(task, key, min_distinct):
    eval_keys = [key(row) for row in task.eval_rows(500)]
    assert len(eval_keys) == len(set(eval_keys)) == 500  # distinct eval problems
    train_keys = {key(task.train_row(i)) for i in range(20_000)}
    assert train_keys.isdisjoint(eval_keys)
    assert len(train_keys) > min_distinct  # and training is not starved of variety


def test_arithmetic_rows_and_settings():
    task = ArithmeticTask(min_digits=2, max_digits=3, operators="*")
    for i in range(300):
        row = task.train_row(i)
        a, _, b = row["prompt"].partition("*")
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999 and int(row["answer"]) == int(a) * int(b)
    minus_task, negative_task = (
        ArithmeticTask(operators="-"),
        ArithmeticTask(operators="-", allow_negative=True),
    )
    assert all(int(minus_task.train_row(i)["answer"]) >= 0 for i in range(500))
    negative = [negative_task.train_row(i) for i in range(500)]
    assert 150 < sum(int(row["answer"]) < 0 for row in negative) < 350
    with pytest.raises(
        ValueError, match=r"num_eval=500 is too large for 55 distinct problems .* num_eval <= 13"
    ):
        ArithmeticTask(max_digits=1, operators="+")
    with pytest.raises(ValueError, match="operators must be"):
        ArithmeticTask(operators="+/")
    with pytest.raises(ValueError, match="asked for 501 eval rows"):
        ArithmeticTask().eval_rows(501)
    with pytest.raises(ValueError, match="non-negative int"):
        ArithmeticTask().train_row(-1)


def test_countdown_targets_are_solved_by_the_generators_own_expression():
    task = CountdownTask(num_numbers=4, max_target=500)
    for i in range(2000):
        row = task.train_row(i)
        assert len(row["numbers"]) == 4 and all(1 <= n <= 99 for n in row["numbers"])
        assert 1 <= row["target"] <= 500 and row["answer"] == str(row["target"])
        verdict = check_countdown(row["solution"], row["numbers"], row["target"], require_all=True)
        assert verdict.correct, (row, verdict)


def test_countdown_prompts():
    verbose = CountdownTask().train_row(0)
    assert verbose["prompt"] == (
        f"Using the numbers {verbose['numbers']}, create an equation that equals {verbose['target']}. You can use "
        "basic arithmetic operations (+, -, *, /) and each number can only be used once"
    )
    compact = CountdownTask(prompt_style="compact").train_row(0)
    assert compact["prompt"] == ",".join(map(str, compact["numbers"])) + f"->{compact['target']}"


# ------------------------------------------------------------------------------------------ cold start


def test_arithmetic_traces_by_hand():
    task = ArithmeticTask(operators="+-*", max_digits=3)
    rng = random.Random(0)
    cases = {
        "37+48": "<think>7+8=15 3+4+1=8</think><answer>85</answer>",
        "99+99": "<think>9+9=18 9+9+1=19</think><answer>198</answer>",
        "5+37": "<think>5+7=12 0+3+1=4</think><answer>42</answer>",
        "85-37": "<think>15-7=8 8-3-1=4</think><answer>48</answer>",
        "100-1": "<think>10-1=9 10-0-1=9 1-0-1=0</think><answer>99</answer>",
        "37*48": "<think>37*8=296 37*40=1480 296+1480=1776</think><answer>1776</answer>",
        "3-48": "<think>3<48 8-3=5 4-0=4</think><answer>-45</answer>",
    }
    for prompt, expected in cases.items():
        assert task.cold_start_completion({"prompt": prompt}, rng) == expected


def _score(task, rows, completions):
    prompts = [row["prompt"] for row in rows]
    formats = format_reward(prompts, completions)
    if isinstance(task, CountdownTask):
        accuracy = countdown_accuracy(
            prompts, completions, numbers=[r["numbers"] for r in rows], target=[r["target"] for r in rows]
        )
    else:
        accuracy = integer_accuracy(prompts, completions, answer=[r["answer"] for r in rows])
    return formats, accuracy


@pytest.mark.parametrize(
    "task",
    [ArithmeticTask(), ArithmeticTask(operators="+-*", allow_negative=True), CountdownTask(num_numbers=4)],
)
def test_cold_start_traces_are_well_formed_and_right_without_errors(task):
    rng = random.Random(1)
    rows = [task.train_row(i) for i in range(1000)]
    completions = [task.cold_start_completion(row, rng, error_rate=0.0) for row in rows]
    formats, accuracy = _score(task, rows, completions)
    assert formats == [1.0] * 1000
    assert accuracy == [1.0] * 1000


@pytest.mark.parametrize("task", [ArithmeticTask(), ArithmeticTask(operators="*"), CountdownTask()])
def test_cold_start_error_rate_makes_that_fraction_wrong(task):
    rng = random.Random(2)
    rows = [task.train_row(i) for i in range(1000)]
    completions = [task.cold_start_completion(row, rng, error_rate=0.3) for row in rows]
    formats, accuracy = _score(task, rows, completions)
    assert formats == [1.0] * 1000  # the slip is in the reasoning, never in the format
    assert 0.25 <= 1 - sum(accuracy) / 1000 <= 0.35


def test_arithmetic_completions_fit_a_tiny_context():
    task, rng = ArithmeticTask(), random.Random(3)
    lengths = [len(task.cold_start_completion(task.train_row(i), rng, 0.3)) for i in range(2000)]
    assert max(lengths) <= 60
    assert max(len(format_prompt(task.train_row(i), "compact")) for i in range(2000)) <= 8


def test_cold_start_error_rate_is_validated():
    with pytest.raises(ValueError, match="error_rate"):
        ArithmeticTask().cold_start_completion({"prompt": "1+2"}, random.Random(0), error_rate=1.5)


# ------------------------------------------------------------------------------------------- user data


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_task_loads_renames_and_splits(tmp_path):
    lines = [{"question": f"q{i}", "solution": i, "level": i % 3} for i in range(100)]
    lines.append({"question": "q0", "solution": 0, "level": 0})  # a duplicate prompt
    path = write_jsonl(tmp_path / "data.jsonl", lines + [""])  # blank lines are fine
    task = JsonlTask(path, prompt_column="question", answer_column="solution", eval_fraction=0.1, seed=7)
    eval_rows = task.eval_rows()
    assert len({r["prompt"] for r in eval_rows}) == 10
    assert eval_rows[0].keys() == {"prompt", "answer", "level"}
    assert isinstance(eval_rows[0]["answer"], str)
    train_prompts = [task.train_row(i)["prompt"] for i in range(task.num_train_rows)]
    assert len(train_prompts) + len(eval_rows) == 101  # every row on exactly one side
    assert set(train_prompts).isdisjoint(r["prompt"] for r in eval_rows)
    # one epoch visits every training row once; the next epoch is another order of the same rows
    epoch0 = train_prompts
    epoch1 = [task.train_row(task.num_train_rows + i)["prompt"] for i in range(task.num_train_rows)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    again = JsonlTask(path, prompt_column="question", answer_column="solution", eval_fraction=0.1, seed=7)
    assert again.eval_rows() == eval_rows and again.train_row(5) == task.train_row(5)


def test_jsonl_task_with_eval_path_drops_overlap(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "answer": "1"} for i in range(10)])
    held_out = write_jsonl(
        tmp_path / "eval.jsonl", [{"prompt": "p3", "answer": "1"}, {"prompt": "new", "answer": "2"}]
    )
    with pytest.warns(UserWarning, match="dropped 1 training rows"):
        task = JsonlTask(train, eval_path=held_out)
    assert task.num_train_rows == 9 and [r["prompt"] for r in task.eval_rows()] == ["p3", "new"]


def test_jsonl_chat_prompts(tmp_path):
    messages = [{"role": "user", "content": "2+2?"}]
    task = JsonlTask(
        write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "answer": "4"}] * 3), eval_fraction=0
    )
    assert task.train_row(0)["prompt"] == messages and task.eval_rows() == []


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": 2'],
            r"bad\.jsonl, line 2: not valid JSON",
        ),
        (
            ['{"prompt": "a", "answer": "1"}', '{"question": "b", "answer": "2"}'],
            r"line 2: missing column 'prompt' \(columns present: answer, question\).*prompt_column='<name>'",
        ),
        (['{"prompt": "a"}'], r"line 1: missing column 'answer' \(columns present: prompt\).*answer_column="),
        (['{"prompt": "  ", "answer": "1"}'], r"line 1: column 'prompt' is empty"),
        (['["prompt", "answer"]'], r"line 1: expected a JSON object, got list"),
        (['{"prompt": 5, "answer": "1"}'], r"line 1: column 'prompt' holds int"),
        (['{"prompt": [{"role": "user"}], "answer": "1"}'], r"message 0 is"),
        (['{"prompt": "a", "answer": null}'], r"column 'answer' is None"),
        (['{"prompt": "a", "answer": "1", "completions": "x"}'], r"column 'completions' would clash"),
        ([""], r"no rows"),
    ],
)
def test_jsonl_bad_files_name_file_line_and_column(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=message):
        JsonlTask(path)


def test_jsonl_missing_file_and_bad_fraction(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlTask(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "1"}])
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        JsonlTask(path, eval_fraction=1.0)
    with pytest.raises(ValueError, match="asked for 5 eval rows but only 1"):
        JsonlTask(path, eval_fraction=0.5).eval_rows(5)


def test_jsonl_reward_funcs_and_cold_start(tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": f"p{i}", "answer": "1", "completion": "<think>x</think><answer>1</answer>"}
            for i in range(5)
        ],
    )
    reward_file = tmp_path / "score.py"
    reward_file.write_text(
        "def length(prompts, completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    default = JsonlTask(data).reward_funcs()
    assert [name for name, _, _ in default] == ["accuracy", "format"]
    custom = JsonlTask(data, rewards=[f"{reward_file}:length", "integer_accuracy"]).reward_funcs()
    assert [name for name, _, _ in custom] == ["format", "length", "integer_accuracy"]
    assert custom[1][1](prompts=["p"], completions=["abc"]) == [3.0]
    isolated = JsonlTask(data, rewards=f"{reward_file}:length", reward_timeout_s=5).reward_funcs()
    try:
        assert isolated[1][1](["p"], ["abcd"]) == [4.0]
    finally:
        isolated[1][1].close()
    row = JsonlTask(data).train_row(0)
    with pytest.raises(NotImplementedError, match="completion_column"):
        JsonlTask(data).cold_start_completion(row, random.Random(0))
    assert (
        JsonlTask(data, completion_column="completion").cold_start_completion(row, random.Random(0))
        == row["completion"]
    )


def test_hf_dataset_task_without_datasets_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        HFDatasetTask(tmp_path)


# ------------------------------------------------------------------------------------ registry/templates


def test_registry():
    assert {"arithmetic", "countdown", "jsonl"} <= set(TASKS)
    assert isinstance(get_task("arithmetic", seed=2, max_digits=3), ArithmeticTask)
    with pytest.raises(ValueError, match="unknown task 'arith'; valid tasks: arithmetic, countdown"):
        get_task("arith")
    with pytest.raises(ValueError, match=r"no setting\(s\) \['digits'\]; its settings are: seed, min_digits"):
        get_task("arithmetic", digits=2)


def test_default_reward_funcs():
    names = {name: (fn, weight) for name, fn, weight in ArithmeticTask().reward_funcs()}
    assert names["accuracy"][0] is integer_accuracy and names["format"] == (format_reward, 1.0)
    loose = dict((n, f) for n, f, _ in CountdownTask(require_all=False).reward_funcs())["accuracy"]
    assert loose(["p"], ["<think></think><answer>3+5</answer>"], numbers=[[3, 5, 7]], target=[8]) == [1.0]


def test_templates_exact_strings():
    row = {"prompt": "37+48", "answer": "85"}
    assert format_prompt(row, "compact") == "37+48=?\n"
    assert format_prompt(row, "plain") == "37+48"
    assert format_prompt(row, "r1") == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
        "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
        "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
        "User: 37+48. Assistant:"
    )
    assert format_prompt(row, "r1zero") == format_prompt(row, "r1")
    assert R1_TEMPLATE.endswith("Assistant:") and not format_prompt(row, "r1").endswith("<think>")
    with pytest.raises(ValueError, match="unknown prompt template 'r2'"):
        format_prompt(row, "r2")
    with pytest.raises(ValueError, match="list of chat messages"):
        format_prompt({"prompt": [{"role": "user", "content": "hi"}]}, "r1")


def _tiny_chat_tokenizer(chat_template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_chat_template_with_a_local_tokenizer():
    tokenizer = _tiny_chat_tokenizer(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    row = {"prompt": "37+48", "answer": "85"}
    text = format_prompt(row, "chat", tokenizer)
    assert text.startswith("<|system|>A conversation between User and Assistant.")
    assert text.endswith("</answer>.\n<|user|>37+48\n<|assistant|>")
    assert format_prompt(row, "chat", tokenizer, system_prompt=None) == "<|user|>37+48\n<|assistant|>"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"}]
    assert (
        format_prompt({"prompt": messages}, "chat", tokenizer)
        == "<|system|>Be brief.\n<|user|>2+2\n<|assistant|>"
    )
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt(row, "chat")
    with pytest.raises(ValueError, match="has no chat_template"):
        format_prompt(row, "chat", _tiny_chat_tokenizer(None))


def test_carry_slips_forget_every_carry_and_only_where_there_is_one():
    from zerorl.rewards import extract_answer
    from zerorl.tasks.arithmetic import addition_trace, subtraction_trace

    # Written out: 37+48 forgets the carry of 7+8=15 → 3+4=7 → 75; 85-37 never pays the borrow → 58.
    assert addition_trace(37, 48, forget_carry=True) == ("7+8=15 3+4=7", 75)
    assert subtraction_trace(85, 37, forget_carry=True) == ("15-7=8 8-3=5", 58)
    assert addition_trace(98, 42, forget_carry=True) == ("8+2=10 9+4=13", 130)  # the last carry-out stays
    task = get_task("arithmetic", seed=0, slip_kind="carry")
    rng = random.Random(0)
    wrong_with_carry, with_carry, wrong_without = 0, 0, 0
    for index in range(2000):
        row = task.train_row(index)
        completion = task.cold_start_completion(row, rng, error_rate=0.7)
        correct = extract_answer(completion) == row["answer"]
        # A problem has a carry (borrow) exactly when forgetting it changes the trace.
        has_carry = task.cold_start_completion(row, random.Random(1), error_rate=0.0) != \
            task.cold_start_completion(row, random.Random(1), error_rate=1.0)
        with_carry += has_carry
        wrong_with_carry += has_carry and not correct
        wrong_without += (not has_carry) and not correct
    assert wrong_without == 0
    assert 0.65 < wrong_with_carry / with_carry < 0.75
    with pytest.raises(ValueError, match="slip_kind"):
        get_task("arithmetic", slip_kind="typo")
