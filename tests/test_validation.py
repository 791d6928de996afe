"""Bad input is refused by ``zerorl train`` before any work starts, with exit code 2 and a message that
names the field, the value seen and the fix. One test per kind of bad input."""

from __future__ import annotations

import json

import pytest

from zerorl import cli
from zerorl.lm import runtime, sft
from zerorl.lm.models import build_tiny_model

FAST = ["max_steps=1", "eval_at_start=false", "eval_at_end=false", "plots=false", "progress=false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model with a short context (64 positions), so that long prompts are easy to make."""
    return build_tiny_model(tmp_path_factory.mktemp("validation") / "tiny", hidden_size=16, num_layers=1,
                            num_heads=2, num_kv_heads=1, max_position_embeddings=64)


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail loudly if a model is loaded or the embedded base model is built: the check came too late."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(runtime, "load_model_and_tokenizer", forbidden)
    monkeypatch.setattr(sft, "ensure_base_model", forbidden)


def _refused(argv: list[str], capsys) -> str:
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "zerorl train: error: " in err and "Traceback" not in err
    return err


def _assert_words(message: str, *words: str) -> None:
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize("override, words", [
    # G < 2 with std scaling: one completion has no group std.
    ("num_generations=1", ["num_generations=1", "scale_rewards='group'", "Fix: num_generations=2 or more"]),
    ("epsilon=1.5", ["epsilon=1.5", "must lie in (0, 1)", "e.g. 0.2"]),
    ("epsilon=0", ["epsilon=0.0", "must lie in (0, 1)", "e.g. 0.2"]),
    ("epsilon_high=-0.1", ["epsilon_high=-0.1", "must lie in (0, 1)", "e.g. 0.28"]),
    ("max_completion_length=0", ["max_completion_length=0", "must be a positive integer"]),
    ("max_completion_length=-8", ["max_completion_length=-8", "must be a positive integer"]),
    ("max_nonfinite_steps=0", ["max_nonfinite_steps=0", "must be ≥ 1, e.g. 3"]),
    ("reward_timeout_s=-1", ["reward_timeout_s=-1.0", "must be > 0 seconds"]),
    ("reward_errors=ignore", ["reward_errors='ignore'", "raise, zero", "Fix: set reward_errors"]),
])
def test_impossible_config_values(override, words, tmp_path, capsys, no_model_work):
    err = _refused(["--output-dir", str(tmp_path / "run"), override, *FAST], capsys)
    _assert_words(err, *words)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_unknown_key_names_the_closest_one(tmp_path, capsys, no_model_work):
    err = _refused(["--output-dir", str(tmp_path), "num_generation=8"], capsys)
    _assert_words(err, "unknown config key 'num_generation'", "Did you mean num_generations")


def test_unknown_task_fails_before_the_base_model_is_built(tmp_path, capsys, no_model_work):
    cache = tmp_path / "cache"
    err = _refused(["--task", "arithmetics", "--output-dir", str(tmp_path / "run"), f"cache_dir={cache}", *FAST],
                   capsys)
    _assert_words(err, "task='arithmetics'", "Fix: set task to one of", "arithmetic, countdown")
    assert not cache.exists()


def test_bad_task_setting_names_task_args(tmp_path, capsys, no_model_work):
    err = _refused(["--output-dir", str(tmp_path), "task_args={max_digitz: 3}", *FAST], capsys)
    _assert_words(err, "task_args={'max_digitz': 3}", "max_digitz", "Fix:")


def test_jsonl_without_a_model(tmp_path, capsys, no_model_work):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    err = _refused(["--task", "jsonl", "--output-dir", str(tmp_path / "run"), f"task_args={{path: {data}}}", *FAST],
                   capsys)
    _assert_words(err, "model=None with task='jsonl'", "only for arithmetic and countdown", "Fix: pass --model")


def test_model_path_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    err = _refused(["--model", str(missing), "--output-dir", str(tmp_path / "run"), *FAST], capsys)
    _assert_words(err, f"model path {str(missing)!r} does not exist", "zerorl sft")
    assert not (tmp_path / "run").exists()


def _jsonl(tmp_path, rows: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(row + "\n" for row in rows))
    return path


def test_dataset_row_missing_a_column(tiny, tmp_path, capsys, no_model_work):
    data = _jsonl(tmp_path, ['{"prompt": "1+1?", "answer": "2"}', '{"prompt": "2+2?", "solution": "4"}'])
    err = _refused(["--model", str(tiny), "--task", "jsonl", "--output-dir", str(tmp_path / "run"),
                    f"task_args={{path: {data}}}", *FAST], capsys)
    _assert_words(err, f"{data}, line 2", "missing column 'answer'", "columns present: prompt, solution",
                  "answer_column='<name>'")


@pytest.mark.parametrize("prompt", ['""', '"   "', "[]"])
def test_empty_prompt(tiny, tmp_path, capsys, prompt, no_model_work):
    data = _jsonl(tmp_path, ['{"prompt": "1+1?", "answer": "2"}', f'{{"prompt": {prompt}, "answer": "4"}}'])
    err = _refused(["--model", str(tiny), "--task", "jsonl", "--output-dir", str(tmp_path / "run"),
                    f"task_args={{path: {data}}}", *FAST], capsys)
    _assert_words(err, f"{data}, line 2", "column 'prompt'")
    assert "is empty" in err or "non-empty" in err


def test_prompts_longer_than_the_context(tiny, tmp_path, capsys):
    err = _refused(["--model", str(tiny), "--output-dir", str(tmp_path / "run"), "template=compact",
                    "max_completion_length=60", "num_eval=4", *FAST], capsys)
    _assert_words(err, "max_completion_length=60", "exceed the model's context of 64 tokens",
                  "Fix: lower max_completion_length")
    assert not (tmp_path / "run").exists()


def test_missing_reward_file(tiny, tmp_path, capsys):
    err = _refused(["--model", str(tiny), "--output-dir", str(tmp_path / "run"), "template=compact",
                    "max_completion_length=8", "num_eval=4", f"reward_funcs=[{tmp_path}/nope.py:score]", *FAST],
                   capsys)
    _assert_words(err, "nope.py", "does not exist")


def test_resume_without_a_run(tmp_path, capsys, no_model_work):
    err = _refused(["--output-dir", str(tmp_path / "never-ran"), "--resume"], capsys)
    _assert_words(err, "--resume", "config.yaml' does not exist", "Fix: pass the --output-dir of an earlier run")


def test_existing_run_without_resume(tmp_path, capsys, no_model_work):
    from zerorl.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run" / "checkpoints", 2, {"model": {}}, {"step": 2}, keep=1)
    err = _refused(["--output-dir", str(tmp_path / "run"), *FAST], capsys)
    _assert_words(err, f"output_dir={str(tmp_path / 'run')!r} already holds a run", "Fix: pass --resume")


def test_resume_reads_the_saved_config(tmp_path, capsys, no_model_work):
    """--resume takes the run's config.yaml; a bad value written there by hand is refused like a flag."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps({"epsilon": 3.0, "output_dir": str(run)}))
    err = _refused(["--output-dir", str(run), "--resume"], capsys)
    _assert_words(err, "epsilon=3.0", "(0, 1)")
