"""Typed configuration for the classic-control PPO and TRPO recipes.

One flat dataclass per algorithm (CleanRL's `Args`), sharing the environment and network fields
through `ClassicConfig`. Values come from, in order of precedence (last wins):

    dataclass defaults < zerorl/configs/classic/<algo>/<env_id>.yaml < --config FILE.yaml
    < key=value overrides < the explicit CLI flags (--env, --steps, --seed)

`load_config` does that merge and validates once, with errors that name the field, the value seen
and the fix.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

ALGOS = ("ppo", "trpo")
VECTORIZATION_MODES = ("sync", "async", "vector_entry_point")

# The tuned defaults live next to the other recipes so that they ship as package data.
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "classic"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class ClassicConfig:
    """Fields every classic-control recipe shares: environment, rollout shape, network, evaluation."""

    env_id: str = "CartPole-v1"
    seed: int = 1
    total_steps: int = 100_000  # environment steps summed over all vectorized copies
    num_envs: int = 8
    num_steps: int = 128  # steps per environment per rollout; batch = num_envs * num_steps
    vectorization_mode: str = "sync"
    gamma: float = 0.99
    gae_lambda: float = 0.95
    # Network: separate actor and critic MLPs (CleanRL, SB3 MlpPolicy), orthogonal init.
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])
    activation: str = "tanh"
    log_std_init: float = 0.0  # continuous actions only: initial log σ of the Gaussian
    # Normalization (SB3 VecNormalize semantics); the usual choice for continuous control.
    normalize_obs: bool = False
    normalize_reward: bool = False
    obs_clip: float = 10.0
    reward_clip: float = 10.0
    normalize_advantages: bool = True
    # Evaluation after training: deterministic policy (argmax / Gaussian mean).
    eval_episodes: int = 20
    torch_threads: int = 1  # small MLPs run fastest single-threaded (measured; see docs/classic.md)
    output_dir: str | None = None  # None: runs/classic/<algo>-<env_id>-seed<seed>
    progress: bool = True

    def validate(self) -> None:
        _check(
            self.total_steps >= self.batch_size,
            "total_steps",
            self.total_steps,
            f"use at least one rollout of num_envs * num_steps = {self.batch_size} env steps",
        )
        _check(self.num_envs >= 1, "num_envs", self.num_envs, "use at least 1 environment")
        _check(self.num_steps >= 1, "num_steps", self.num_steps, "use at least 1 step per rollout")
        _check(
            self.vectorization_mode in VECTORIZATION_MODES,
            "vectorization_mode",
            self.vectorization_mode,
            f"choose one of {VECTORIZATION_MODES}",
        )
        _check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "use a discount in (0, 1]")
        _check(0.0 <= self.gae_lambda <= 1.0, "gae_lambda", self.gae_lambda, "use a value in [0, 1]")
        _check(
            len(self.hidden_sizes) >= 1 and all(int(h) > 0 for h in self.hidden_sizes),
            "hidden_sizes",
            self.hidden_sizes,
            "give a non-empty list of positive layer widths, e.g. [64, 64]",
        )
        _check(self.activation in ("tanh", "relu"), "activation", self.activation, "use 'tanh' or 'relu'")
        _check(self.eval_episodes >= 1, "eval_episodes", self.eval_episodes, "evaluate at least 1 episode")
        _check(self.torch_threads >= 1, "torch_threads", self.torch_threads, "use at least 1 thread")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_iterations(self) -> int:
        # Rounded down: a run never uses more environment steps than its budget ("within N steps").
        return max(1, self.total_steps // self.batch_size)


@dataclass
class PPOConfig(ClassicConfig):
    """PPO-clip (Schulman et al. 2017) with the CleanRL / SB3 implementation details."""

    learning_rate: float = 3e-4
    anneal_lr: bool = True  # linear decay to 0 over the run
    num_minibatches: int = 4
    update_epochs: int = 10
    clip_coef: float = 0.2
    anneal_clip: bool = False  # rl-zoo's lin_0.2 for CartPole
    clip_vloss: bool = True  # value clipping around the rollout's value prediction
    vf_clip_coef: float | None = None  # None: reuse clip_coef (CleanRL); SB3 uses no value clipping
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float | None = None  # stop the epoch loop early when approx KL exceeds this
    adam_eps: float = 1e-5

    def validate(self) -> None:
        super().validate()
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "use a positive learning rate")
        _check(
            self.num_minibatches >= 1 and self.batch_size % self.num_minibatches == 0,
            "num_minibatches",
            self.num_minibatches,
            f"use a divisor of num_envs * num_steps = {self.batch_size}",
        )
        _check(self.update_epochs >= 1, "update_epochs", self.update_epochs, "use at least 1 epoch")
        _check(self.clip_coef > 0, "clip_coef", self.clip_coef, "use a positive clip range, e.g. 0.2")
        _check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "use a positive norm, e.g. 0.5")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches


@dataclass
class TRPOConfig(ClassicConfig):
    """TRPO (Schulman et al. 2015): natural-gradient policy step under a mean-KL trust region δ."""

    max_kl: float = 0.01  # δ: the trust region on the mean KL(π_old ‖ π_θ)
    cg_iters: int = 15
    cg_damping: float = 0.1
    max_backtracks: int = 10
    accept_ratio: float = 0.1  # line search: actual / expected improvement must exceed this
    # The value function is fitted by several gradient steps per batch (TRPO has no value term).
    critic_learning_rate: float = 1e-3
    critic_epochs: int = 10
    critic_minibatch_size: int = 128
    anneal_lr: bool = False

    def validate(self) -> None:
        super().validate()
        _check(self.max_kl > 0, "max_kl", self.max_kl, "use a positive trust region, e.g. 0.01")
        _check(self.cg_iters >= 1, "cg_iters", self.cg_iters, "use at least 1 CG iteration")
        _check(self.cg_damping >= 0, "cg_damping", self.cg_damping, "use a non-negative damping")
        _check(self.max_backtracks >= 1, "max_backtracks", self.max_backtracks, "use at least 1")
        _check(self.critic_epochs >= 1, "critic_epochs", self.critic_epochs, "use at least 1 epoch")
        _check(
            self.critic_minibatch_size >= 1,
            "critic_minibatch_size",
            self.critic_minibatch_size,
            "use a positive minibatch size",
        )


CONFIG_CLASSES: dict[str, type[ClassicConfig]] = {"ppo": PPOConfig, "trpo": TRPOConfig}


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value {name}={value!r}: {fix}")


def default_config_path(algo: str, env_id: str) -> Path:
    return DEFAULT_CONFIG_DIR / algo / f"{env_id}.yaml"


def _coerce(name: str, raw: Any, annotation: Any) -> Any:
    """Convert a YAML value or a `key=value` string to the field's declared type."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:  # `float | None` -> float
        annotation = next(a for a in args if a is not type(None))
    expected = getattr(annotation, "__name__", str(annotation))
    if isinstance(raw, str) and annotation is not str:
        try:
            raw = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"cannot parse {name}={raw!r}: {err}") from err
    if raw is None or (optional and isinstance(raw, str) and raw.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"invalid config value {name}=None: this field needs a {expected}")
    try:
        if annotation is bool:
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if annotation is int:
            # YAML 1.1 reads "1e5" as a string; accept it when it is a whole number.
            if isinstance(raw, bool) or float(raw) != int(float(raw)):
                raise TypeError
            return int(float(raw))
        if annotation is float:
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if typing.get_origin(annotation) is list:
            if not isinstance(raw, (list, tuple)):
                raise TypeError
            return [int(v) for v in raw]
        if annotation is str:
            return str(raw)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid config value {name}={raw!r}: expected {expected}") from err
    return raw


def apply_overrides(config: ClassicConfig, values: dict[str, Any], source: str) -> ClassicConfig:
    """Return a copy of `config` with `values` set, rejecting keys the dataclass does not have."""
    hints = get_type_hints(type(config))
    known = {f.name for f in dataclasses.fields(config)}
    updates = {}
    for name, raw in values.items():
        if name not in known:
            close = sorted(k for k in known if k.split("_")[0] in name or name.split("_")[0] in k)
            hint = f" (did you mean one of {close}?)" if close else ""
            raise ConfigError(
                f"unknown config key {name!r} in {source} for {type(config).__name__}{hint}; "
                f"valid keys: {sorted(known)}"
            )
        updates[name] = _coerce(name, raw, hints[name])
    return dataclasses.replace(config, **updates)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. learning_rate=3e-4")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; pass an existing YAML file")
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value, got {type(data)}")
    return data


def load_config(
    algo: str,
    env_id: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    **explicit: Any,
) -> ClassicConfig:
    """Build and validate the config for `algo` (see module docstring for the precedence order).

    `explicit` holds values from dedicated CLI flags (total_steps, seed, output_dir); None is ignored.
    """
    if algo not in CONFIG_CLASSES:
        raise ConfigError(f"unknown algo {algo!r}; choose one of {ALGOS}")
    config: ClassicConfig = CONFIG_CLASSES[algo]()
    user_file = read_yaml(Path(config_file)) if config_file is not None else {}
    file_algo = user_file.pop("algo", None)
    _check(file_algo in (None, algo), "algo", file_algo, f"{config_file} is for another algorithm; match --algo")
    env_id = env_id or user_file.get("env_id") or config.env_id
    tuned = default_config_path(algo, env_id)
    if tuned.is_file():
        tuned_values = read_yaml(tuned)
        tuned_values.pop("algo", None)
        config = apply_overrides(config, tuned_values, str(tuned))
    config = apply_overrides(config, {"env_id": env_id}, "--env")
    config = apply_overrides(config, user_file, str(config_file))
    config = apply_overrides(config, overrides or {}, "key=value overrides")
    config = apply_overrides(config, {k: v for k, v in explicit.items() if v is not None}, "command line")
    config.validate()
    return config
