"""Config: YAML + key=value overrides, TRL names, validation messages that name field, value and fix."""

import pytest

from zerorl.config import ConfigError, TrainConfig, build_config, parse_overrides


def test_overrides_are_typed():
    config = build_config(TrainConfig, None, parse_overrides(
        ["beta=0.0", "num_generations=4", "epsilon_high=0.28", "task_args={max_digits: 3}",
         "eval_at_start=false", "reward_funcs=[format, accuracy]"]))
    assert config.beta == 0.0 and isinstance(config.beta, float)
    assert config.num_generations == 4 and isinstance(config.num_generations, int)
    assert config.epsilon_high == 0.28
    assert config.task_args == {"max_digits": 3}
    assert config.eval_at_start is False
    assert config.reward_funcs == ["format", "accuracy"]


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.1\nlearning_rate: 1.0e-5\nmax_steps: 7\n")
    config = build_config(TrainConfig, path, {"max_steps": "9"})
    assert (config.beta, config.learning_rate, config.max_steps) == (0.1, 1e-5, 9)


def test_trl_boolean_scale_rewards():
    assert build_config(TrainConfig, None, {"scale_rewards": "false"}).scale_rewards == "none"
    assert build_config(TrainConfig, None, {"scale_rewards": True}).scale_rewards == "group"


def test_loss_type_maps_to_aggregation_mode():
    assert build_config(TrainConfig, None, {"loss_type": "dr_grpo"}).loss_agg_mode == "seq-mean-token-sum-norm"
    assert build_config(TrainConfig, None, {"loss_type": "dapo"}).loss_agg_mode == "token-mean"
    assert TrainConfig().loss_agg_mode == "seq-mean-token-mean"


@pytest.mark.parametrize("pair, words", [
    ("num_generations=1", ["num_generations=1", "at least 2"]),
    ("epsilon=1.5", ["epsilon=1.5", "(0, 1)"]),
    ("epsilon=0", ["epsilon=0", "(0, 1)"]),
    ("max_completion_length=0", ["max_completion_length=0", "positive"]),
    ("loss_type=ppo", ["loss_type='ppo'", "grpo"]),
    ("beta=-1", ["beta=-1.0", "negative"]),
    ("temperature=0", ["temperature=0.0", "> 0"]),
    ("learning_rate=abc", ["learning_rate='abc'", "float"]),
])
def test_bad_values_name_field_value_and_fix(pair, words):
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, None, parse_overrides([pair]))
    for word in words:
        assert word in str(err.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="num_generations"):
        build_config(TrainConfig, None, {"num_generation": "8"})


def test_missing_yaml_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["beta"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(TrainConfig, bad)


@pytest.mark.parametrize("pairs, words", [
    (["bf16=true", "dtype=bfloat16"], ["bf16=true", "dtype='bfloat16'", "Fix: dtype=float32"]),
    (["bf16=true", "algo=trpo"], ["algo=trpo", "Fix: bf16=false"]),
    (["vllm_gpu_memory_utilization=1.5"], ["vllm_gpu_memory_utilization=1.5", "(0, 1)"]),
    (["use_vllm=true", "lora_rank=8"], ["lora_rank=8", "Fix: lora_rank=0"]),
])
def test_precision_and_engine_options_that_cannot_go_together(pairs, words):
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, None, parse_overrides(pairs))
    for word in words:
        assert word in str(err.value)


def test_micro_batch_size_default_follows_precision():
    """None (the default) = 16 completions per pass in float32, 32 under bf16; an explicit value is kept."""
    assert build_config(TrainConfig, None, {}).micro_batch_size == 16
    assert build_config(TrainConfig, None, {"bf16": "true"}).micro_batch_size == 32
    assert build_config(TrainConfig, None, {"bf16": "true", "micro_batch_size": "8"}).micro_batch_size == 8
    with pytest.raises(ConfigError, match="micro_batch_size"):
        build_config(TrainConfig, None, {"micro_batch_size": "0"})


def test_options_an_algorithm_never_reads_earn_a_note(tmp_path, capsys):
    from zerorl.lm.runtime import setup_lm_run

    def notes(**values):
        return TrainConfig(**values).unused_options()

    assert notes() == [] and notes(algo="ppo") == [] and notes(algo="trpo") == []  # the defaults: silence
    assert notes(algo="ppo", epsilon=0.3, gamma=0.9) == []  # both are PPO's
    (line,) = notes(algo="trpo", epsilon=0.3)
    assert line.startswith("epsilon=0.3 has no effect with algo=trpo") and "max_kl" in line
    assert [n.split("=")[0] for n in notes(algo="grpo", gamma=0.9, max_kl=0.01, critic="value_head")] == \
        ["gamma", "critic", "max_kl"]
    assert [n.split("=")[0] for n in notes(algo="ppo", loss_type="dr_grpo", scale_rewards="none")] == \
        ["loss_type", "scale_rewards"]
    # TRPO's critic options matter with trpo_advantages=gae (the default), not with group; and the reverse.
    assert notes(algo="trpo", lam=0.9) == []
    assert [n.split("=")[0] for n in notes(algo="trpo", trpo_advantages="group", lam=0.9, learning_rate=1e-3)] \
        == ["lam", "learning_rate"]
    assert [n.split("=")[0] for n in notes(algo="trpo", scale_rewards="none")] == ["scale_rewards"]
    # A run says so first, before anything can fail (here: the task name).
    with pytest.raises(ConfigError, match="task"):
        setup_lm_run(TrainConfig(algo="trpo", epsilon=0.3, task="no-such-task", output_dir=str(tmp_path)))
    assert "note: epsilon=0.3 has no effect with algo=trpo" in capsys.readouterr().err


def test_sft_writes_where_its_output_dir_key_says(tmp_path):
    """`zerorl sft output_dir=DIR` (or the YAML key) is honoured as --output-dir is, not ignored."""
    from zerorl import cli

    target = tmp_path / "base"
    assert cli.main(["sft", f"output_dir={target}", "steps=2", "batch_size=4", "hidden_size=16", "num_layers=1",
                     "num_heads=2", "num_kv_heads=1", "intermediate_size=32", "warmup_steps=0",
                     "progress=false"]) == 0
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def test_eval_writes_where_its_output_dir_key_says(random_tiny_model, tmp_path):
    from zerorl import cli

    target = tmp_path / "eval-here"
    assert cli.main(["eval", "--model", str(random_tiny_model), "--task", "arithmetic", f"output_dir={target}",
                     "num_eval=4", "eval_samples_per_prompt=1", "max_completion_length=8", "template=compact",
                     "progress=false"]) == 0
    assert (target / "eval.json").is_file()
    assert not (random_tiny_model / "eval").exists()
