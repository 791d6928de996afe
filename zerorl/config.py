"""Typed configuration: dataclasses with defaults, loaded from YAML, overridden as ``key=value``.

Names follow TRL's ``GRPOConfig`` where one exists (``num_generations``, ``beta``, ``epsilon``,
``epsilon_high``, ``loss_type``, ``scale_rewards``, ``num_iterations``, ``max_completion_length``,
``learning_rate``, ``temperature``, ``save_steps``...), so a TRL user can move a recipe over by
copying keys. Every value is validated once, before any work starts, with a message that names the
field, the value seen and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and the fix."""


@dataclass
class TrainConfig:
    """Everything ``zerorl train`` needs. Defaults are the embedded CPU recipe."""

    # --- what to train -------------------------------------------------------------------------
    algo: str = "grpo"  # grpo | ppo | trpo
    model: str | None = None  # HF directory or hub id; None = the embedded base model (built by `zerorl sft`)
    task: str = "arithmetic"  # arithmetic | countdown | jsonl
    task_args: dict = field(default_factory=dict)  # forwarded to the task (e.g. {"max_digits": 3})
    template: str = "auto"  # auto | compact | r1zero | chat | plain
    reward_funcs: list = field(default_factory=list)  # [] = the task's defaults; else names or "file.py:fn"
    reward_weights: list = field(default_factory=list)
    reward_errors: str = "raise"  # raise | zero
    output_dir: str = "runs/train"
    seed: int = 0

    # --- sampling (the rollout) ----------------------------------------------------------------
    max_steps: int = 150
    prompts_per_step: int = 16
    num_generations: int = 8  # G, completions per prompt
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    # --- the GRPO objective --------------------------------------------------------------------
    advantage_estimator: str = "grpo"  # grpo | rloo | reinforce_pp
    scale_rewards: str = "group"  # group | batch | none (TRL's names; none = Dr. GRPO)
    loss_type: str = "grpo"  # grpo (seq-mean-token-mean) | bnpo/dapo (token-mean) | dr_grpo
    epsilon: float = 0.2  # clip ε (low side; also high side unless epsilon_high is set)
    epsilon_high: float | None = None  # DAPO's clip-higher
    beta: float = 0.04  # KL coefficient; 0 = no reference model is loaded
    kl_estimator: str = "k3"
    ref_model_sync_steps: int = 0  # >0: copy the policy into the reference every N steps
    # The reference's weights in the OS page cache (an unlinked file in output_dir), mapped into the process only
    # for the reference pass (zerorl.lm.page_cache): None = on where that works (a CPU run on Linux), false = in
    # memory. 31.5M model: peak RSS −127 MB, same speed
    ref_offload: bool | None = None
    num_iterations: int = 1  # μ, passes over each rollout batch
    num_minibatches: int = 1  # optimizer steps per pass
    micro_batch_size: int | None = None  # completions per forward/backward (gradients accumulated exactly above
    #   it). None = 16, or 32 under bf16: in float32 16 keeps activation memory low at no cost in speed; under bf16
    #   the matrix products are ~7× faster, so per-pass overheads weigh more and 32 takes 8-11% off a step
    #   (docs/performance.md)

    # --- optimizer -----------------------------------------------------------------------------
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    warmup_steps: int = 5
    lr_scheduler_type: str = "constant"  # constant | linear | cosine
    max_grad_norm: float = 1.0

    # --- evaluation, logging, checkpoints ------------------------------------------------------
    num_eval: int = 500
    eval_samples_per_prompt: int = 4  # k for accuracy at the training temperature and pass@k
    eval_at_start: bool = True
    eval_at_end: bool = True
    save_steps: int = 50
    save_total_limit: int = 2
    logging_steps: int = 10  # a console line of metrics every N steps (TRL's default); 0 = none. metrics.jsonl: every step
    plots: bool = True
    progress: bool = True

    # --- runtime -------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16
    num_threads: int = 0  # torch intra-op threads; 0 = torch's default
    # CPU: micro-batches and rollout shards run on this many single-threaded workers at once (zerorl.lm.parallel;
    # 0 = one per thread of num_threads, 1 = off: every op split across the threads, the plain torch way)
    cpu_workers: int = 0
    native_model: bool = True  # zerorl.lm.native forward for llama/qwen2/qwen3 (same math, leaner); false = transformers'
    bf16: bool = False  # bf16 autocast over float32 weights in rollout, reference and training passes (TRL's bf16)
    use_vllm: bool = False  # sample with vLLM (GPU; pip install zerorl[vllm]); weights synced after each update
    vllm_gpu_memory_utilization: float = 0.3  # share of GPU memory vLLM may take (the trainer needs the rest)
    cache_dir: str | None = None  # where the embedded base model is cached; None = ~/.cache/zerorl

    # --- PPO / TRPO (issue 6) ------------------------------------------------------------------
    # TRL PPOConfig names where one exists. PPO and TRPO also read beta (KL to π_ref), epsilon,
    # num_iterations, num_minibatches, micro_batch_size, learning_rate (policy) from above.
    gamma: float = 1.0  # GAE discount over tokens
    lam: float = 1.0  # GAE λ; 1 = Monte Carlo return minus V (Open-Reasoner-Zero: γ = λ = 1 for outcome rewards)
    vf_coef: float = 0.1  # weight of the value loss (PPO's L = L_π + vf_coef · L_V)
    cliprange_value: float | None = 0.2  # value clipping around the rollout values; None = off
    whiten_advantages: bool = True  # normalize token advantages over the batch's valid tokens
    kl_in_reward: bool = True  # True: −β·KL per token in the reward (RLHF); False: β·k3 in the loss (GRPO)
    critic: str = "separate"  # separate (a copy of the policy + scalar head) | value_head (on the policy)
    critic_learning_rate: float | None = None  # None = learning_rate (PPO, and TRPO with trpo_advantages=gae)
    reward_model: str | None = None  # HF sequence-classification model directory; scores prompt+completion
    max_kl: float = 0.001  # TRPO δ: mean KL(π_old ‖ π_θ) per token (0.01, the classic value, is too far for an LM)
    cg_iters: int = 10  # TRPO conjugate-gradient iterations
    cg_damping: float = 0.1  # TRPO damping of the Fisher matrix
    max_backtracks: int = 10  # TRPO line-search halvings
    trpo_value_steps: int = 4  # TRPO (gae): critic Adam steps per iteration (minibatches)
    fisher_subsample: int = 8  # TRPO: Fisher-vector products on every k-th completion (baselines: 5)
    trpo_advantages: str = "gae"  # gae: critic + token GAE (as PPO) | group: advantage_estimator over the
    #                               G samples of each prompt, as GRPO: no critic held, β·KL in the surrogate
    lora_rank: int = 0  # >0: GRPO/PPO/TRPO train LoRA adapters of this rank only; 0 = all parameters
    lora_alpha: float = 16.0  # LoRA scale α / rank

    # --- reliability (issue 5) -----------------------------------------------------------------
    max_nonfinite_steps: int = 3  # abort after this many steps in a row whose loss or gradient was NaN/Inf
    reward_timeout_s: float | None = None  # >0: user reward functions (file.py:fn) run in worker processes
    #                                        with this per-call timeout; None = called in-process

    def validate(self) -> TrainConfig:
        _check_choice("algo", self.algo, ("grpo", "ppo", "trpo"))
        _check_choice("template", self.template, ("auto", "compact", "r1zero", "chat", "plain"))
        _check_choice("reward_errors", self.reward_errors, ("raise", "zero"))
        _check_choice("advantage_estimator", self.advantage_estimator, ("grpo", "rloo", "reinforce_pp"))
        _check_choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        _check_choice("loss_type", self.loss_type, tuple(LOSS_TYPE_TO_AGG_MODE))
        _check_choice("kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, ("constant", "linear", "cosine"))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        if self.bf16 and self.dtype != "float32":
            raise ConfigError(f"bf16=true with dtype={self.dtype!r}: bf16 autocast computes in bfloat16 over "
                              "float32 weights. Fix: dtype=float32 (with bf16=true), or bf16=false.")
        if self.bf16 and self.algo == "trpo":
            raise ConfigError("bf16=true with algo=trpo: TRPO differentiates the KL twice (Fisher-vector "
                              "products), which needs float32 logits. Fix: bf16=false for TRPO.")
        _check("num_threads", self.num_threads, self.num_threads >= 0, "must be ≥ 0 (0 = torch's default)")
        _check("cpu_workers", self.cpu_workers, self.cpu_workers >= 0, "must be ≥ 0 (0 = one per thread, 1 = off)")
        _check("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization,
               0.0 < self.vllm_gpu_memory_utilization < 1.0, "must be in (0, 1)")
        if self.micro_batch_size is None:
            self.micro_batch_size = 32 if self.bf16 else 16
        for name in ("max_steps", "prompts_per_step", "max_completion_length", "num_iterations",
                     "num_minibatches", "micro_batch_size", "num_eval", "eval_samples_per_prompt"):
            _check(name, getattr(self, name), getattr(self, name) >= 1, "must be a positive integer")
        _check("num_generations", self.num_generations, self.num_generations >= 1, "must be ≥ 1")
        if self.num_generations < 2 and self.scale_rewards != "none" and self.advantage_estimator == "grpo":
            raise ConfigError(
                f"num_generations={self.num_generations}: group-relative advantages with "
                f"scale_rewards='{self.scale_rewards}' need a group of at least 2 completions "
                "(one completion has no group std). Fix: num_generations=2 or more.")
        if self.advantage_estimator == "rloo" and self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: RLOO's leave-one-out baseline needs "
                              "at least 2 completions per prompt. Fix: num_generations=2 or more.")
        _check("epsilon", self.epsilon, 0 < self.epsilon < 1, "the clip range must lie in (0, 1), e.g. 0.2")
        if self.epsilon_high is not None:
            _check("epsilon_high", self.epsilon_high, 0 < self.epsilon_high < 1,
                   "the upper clip range must lie in (0, 1), e.g. 0.28 (DAPO)")
        _check("beta", self.beta, self.beta >= 0, "the KL coefficient cannot be negative; 0 disables it")
        _check("temperature", self.temperature, self.temperature > 0,
               "sampling temperature must be > 0 for RL (greedy completions have no spread to learn from)")
        _check("top_p", self.top_p, 0 < self.top_p <= 1, "must lie in (0, 1]")
        _check("top_k", self.top_k, self.top_k >= 0, "must be ≥ 0 (0 = off)")
        _check("learning_rate", self.learning_rate, self.learning_rate > 0, "must be > 0, e.g. 1e-6 for 1B+ models")
        _check("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "must be > 0")
        _check("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "must be ≥ 0")
        _check("save_steps", self.save_steps, self.save_steps >= 0, "must be ≥ 0 (0 = only at the end)")
        _check("logging_steps", self.logging_steps, self.logging_steps >= 0, "must be ≥ 0 (0 = no console lines)")
        _check("save_total_limit", self.save_total_limit, self.save_total_limit >= 1, "keep at least 1 checkpoint")
        _check("ref_model_sync_steps", self.ref_model_sync_steps, self.ref_model_sync_steps >= 0, "must be ≥ 0")
        if self.ref_offload and self.device.startswith("cuda"):
            raise ConfigError(f"ref_offload=true with device={self.device!r}: the reference's weights go to the page "
                              "cache only where a CPU run reads them; on a GPU they stay in device memory. Fix: drop "
                              "ref_offload (or set it to false).")
        if self.reward_weights and self.reward_funcs and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has "
                f"{len(self.reward_funcs)}. Fix: give one weight per reward function, or none (all 1.0).")
        # --- PPO / TRPO (issue 6) ---
        _check_choice("critic", self.critic, ("separate", "value_head"))
        _check("gamma", self.gamma, 0 < self.gamma <= 1, "the GAE discount must lie in (0, 1], e.g. 1.0")
        _check("lam", self.lam, 0 <= self.lam <= 1, "GAE λ must lie in [0, 1], e.g. 0.95")
        _check("vf_coef", self.vf_coef, self.vf_coef > 0, "must be > 0, e.g. 0.1")
        if self.cliprange_value is not None:
            _check("cliprange_value", self.cliprange_value, self.cliprange_value > 0, "must be > 0, or None (off)")
        if self.critic_learning_rate is not None:
            _check("critic_learning_rate", self.critic_learning_rate, self.critic_learning_rate > 0,
                   "must be > 0, or None (= learning_rate)")
        _check("max_kl", self.max_kl, self.max_kl > 0, "TRPO's δ must be > 0, e.g. 0.01")
        _check("cg_iters", self.cg_iters, self.cg_iters >= 1, "must be ≥ 1, e.g. 10")
        _check("cg_damping", self.cg_damping, self.cg_damping >= 0, "must be ≥ 0, e.g. 0.1")
        _check("max_backtracks", self.max_backtracks, self.max_backtracks >= 1, "must be ≥ 1, e.g. 10")
        _check("trpo_value_steps", self.trpo_value_steps, self.trpo_value_steps >= 0, "must be ≥ 0")
        _check_choice("trpo_advantages", self.trpo_advantages, ("gae", "group"))
        _check("fisher_subsample", self.fisher_subsample, self.fisher_subsample >= 1,
               "must be ≥ 1 (1 = every completion, 5 = every 5th)")
        _check("lora_rank", self.lora_rank, self.lora_rank >= 0, "must be ≥ 0 (0 = train all parameters)")
        if self.use_vllm and self.lora_rank > 0:
            raise ConfigError(f"use_vllm=true with lora_rank={self.lora_rank}: the LoRA-wrapped policy's weights "
                              "do not have the names vLLM loads. Fix: lora_rank=0 with use_vllm, or use_vllm=false.")
        _check("lora_alpha", self.lora_alpha, self.lora_alpha > 0, "must be > 0, e.g. 16")
        if self.lora_rank > 0 and self.ref_model_sync_steps > 0:
            raise ConfigError(f"ref_model_sync_steps={self.ref_model_sync_steps} with lora_rank={self.lora_rank}: a "
                              "LoRA run's reference is the base model with its adapters switched off, which a "
                              "refresh cannot move. Fix: ref_model_sync_steps=0, or lora_rank=0.")
        if self.reward_model is not None and not (Path(self.reward_model) / "config.json").is_file():
            raise ConfigError(f"reward_model={self.reward_model!r} is not a Hugging Face model directory "
                              "(no config.json there). Fix: pass the directory of a sequence-classification "
                              "model (num_labels=1), or reward_model=None to use the reward functions.")
        # --- reliability (issue 5) ---
        _check("max_nonfinite_steps", self.max_nonfinite_steps, self.max_nonfinite_steps >= 1,
               "must be ≥ 1, e.g. 3 (steps in a row with a NaN/Inf loss before the run aborts)")
        if self.reward_timeout_s is not None:
            _check("reward_timeout_s", self.reward_timeout_s, self.reward_timeout_s > 0,
                   "must be > 0 seconds, e.g. 30, or None to call reward functions in-process")
        return self

    @property
    def loss_agg_mode(self) -> str:
        return LOSS_TYPE_TO_AGG_MODE[self.loss_type]

    def unused_options(self) -> list[str]:
        """One line for each option set away from its default that ``algo``'s trainer never reads (TRL and verl
        users bring options across algorithms; a silent no-op would look like a result)."""
        default = TrainConfig()
        unused: dict[str, str] = {}
        if self.algo == "grpo":
            unused |= dict.fromkeys(_CRITIC_OPTIONS + ("vf_coef", "kl_in_reward"), "a PPO/TRPO option (GRPO has no "
                                    "critic and puts β·KL in its loss)")
            unused |= dict.fromkeys(_TRPO_OPTIONS, "a TRPO option")
        elif self.algo == "ppo":
            unused |= {"loss_type": "PPO averages its loss over the tokens of a minibatch (token-mean)",
                       "scale_rewards": "PPO's advantages come from its critic (GAE, then whiten_advantages)",
                       "advantage_estimator": "PPO's advantages come from its critic (GAE)"}
            unused |= dict.fromkeys(_TRPO_OPTIONS, "a TRPO option")
        elif self.algo == "trpo":
            unused |= dict.fromkeys(("epsilon", "epsilon_high"), "TRPO bounds its step by max_kl, not by clipping")
            unused |= dict.fromkeys(("num_iterations", "num_minibatches", "loss_type"),
                                    "TRPO takes one natural-gradient step per batch (trpo_value_steps are the "
                                    "critic's)")
            unused |= dict.fromkeys(("vf_coef", "kl_in_reward"), "TRPO fits its critic on its own loss and puts β·KL "
                                    "in the token rewards (gae) or the surrogate (group)")
            if self.trpo_advantages == "gae":
                unused |= dict.fromkeys(("scale_rewards", "advantage_estimator"), "with trpo_advantages=gae the "
                                        "critic's GAE gives the advantages")
            else:
                unused |= dict.fromkeys(_CRITIC_OPTIONS + ("trpo_value_steps", "learning_rate"),
                                        "with trpo_advantages=group there is no critic (and the policy moves by "
                                        "the natural-gradient step alone)")
        return [f"{name}={getattr(self, name)!r} has no effect with algo={self.algo}: {why}"
                for name, why in unused.items() if getattr(self, name) != getattr(default, name)]


# Options only a trainer with a critic reads (PPO; TRPO with trpo_advantages=gae), and only TRPO's.
_CRITIC_OPTIONS = ("gamma", "lam", "cliprange_value", "whiten_advantages", "critic", "critic_learning_rate")
_TRPO_OPTIONS = ("max_kl", "cg_iters", "cg_damping", "max_backtracks", "trpo_value_steps", "fisher_subsample",
                 "trpo_advantages")


# TRL's loss_type names → the aggregation modes of zerorl.core.losses.aggregate.
LOSS_TYPE_TO_AGG_MODE = {
    "grpo": "seq-mean-token-mean",  # the article: 1/G Σ_i 1/|o_i| Σ_t
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",  # divide by the constant max_completion_length
}


def _check(name: str, value: Any, ok: bool, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {fix}.")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}. "
                          f"Fix: set {name} to one of those.")


# ---------------------------------------------------------------------------------------------
# Loading: YAML file, then key=value overrides, then validation.
# ---------------------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, raw: Any, annotation: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X] / X | None
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(name, raw, non_none[0])
    if isinstance(raw, str) and annotation in (dict, list) or origin in (dict, list):
        if isinstance(raw, str):
            raw = yaml.safe_load(raw)
        expected = origin or annotation
        if not isinstance(raw, expected):
            raise ConfigError(f"{name}={raw!r} should be a {expected.__name__}, e.g. "
                              f"{name}={'{max_digits: 3}' if expected is dict else '[a, b]'}.")
        return raw
    try:
        if annotation is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError
            return int(float(raw)) if isinstance(raw, str) and "e" in raw.lower() else int(raw)
        if annotation is float:
            return float(raw)
        if annotation is str:
            if isinstance(raw, bool):  # TRL accepts scale_rewards=True/False
                return {True: "group", False: "none"}[raw] if name == "scale_rewards" else str(raw)
            text = str(raw)
            if name == "scale_rewards" and text.lower() in ("true", "false"):
                return "group" if text.lower() == "true" else "none"
            return text
    except (TypeError, ValueError):
        pass
    else:
        return raw
    type_name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{name}={raw!r} is not a valid {type_name}. Fix: give a {type_name} value.")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["beta=0.0", "task_args={max_digits: 3}"]`` → ``{"beta": "0.0", ...}``."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value, e.g. beta=0.0")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value
    return out


def apply_values(config: Any, values: dict[str, Any], source: str) -> Any:
    """Set dataclass fields from a mapping, coercing types; unknown keys name the closest match."""
    types_by_name = _field_types(type(config))
    for key, raw in values.items():
        if key not in types_by_name:
            close = difflib.get_close_matches(key, list(types_by_name), n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {source}.{hint} "
                              f"Valid keys: {', '.join(sorted(types_by_name))}.")
        setattr(config, key, _coerce(key, raw, types_by_name[key]))
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. Fix: check the path passed to --config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value pairs, "
                          f"got {type(data).__name__}.")
    return data


def build_config(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                 validate: bool = True) -> Any:
    config = cls()
    if yaml_path is not None:
        apply_values(config, load_yaml(yaml_path), source=str(yaml_path))
    if overrides:
        apply_values(config, overrides, source="the command line")
    return config.validate() if validate and hasattr(config, "validate") else config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
