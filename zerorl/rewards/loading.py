"""Load a reward function named on the command line: ``--reward module.path:function`` or
``--reward path/to/file.py:function``, or one of the built-in names."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from zerorl.rewards.accuracy import countdown_accuracy, integer_accuracy, math_accuracy
from zerorl.rewards.format import format_reward
from zerorl.rewards.reward_set import RewardFn

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "integer_accuracy": integer_accuracy,
    "math_accuracy": math_accuracy,
    "countdown_accuracy": countdown_accuracy,
}

_EXAMPLE = "e.g. 'my_package.rewards:length_penalty' or 'rewards/my_reward.py:score'"


class RewardLoadError(ValueError):
    """A reward specification could not be turned into a function (the message says how to fix it)."""


def _import_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"reward file {str(path)!r} does not exist (resolved to {path.resolve()})")
    # A stable, path-derived module name: loading the same file twice gives the same module name, and two
    # files called rewards.py in different folders don't collide.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"zerorl_user_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardLoadError(f"cannot load {str(path)!r} as a Python module; it must be a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    # Let the file import its sibling helpers (appended, so it never shadows installed packages).
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise
    return module


def load_reward_function(spec: str) -> RewardFn:
    """Import the function named by ``spec`` ("module.path:function" or "path/to/file.py:function") and
    check that it can be called as ``fn(prompts=..., completions=..., **columns)``."""
    if not isinstance(spec, str) or ":" not in spec:
        raise RewardLoadError(
            f"reward spec {spec!r} must look like 'module:function' or 'file.py:function', {_EXAMPLE}"
        )
    location, _, function_name = spec.rpartition(":")
    if not location or not function_name.isidentifier():
        raise RewardLoadError(
            f"reward spec {spec!r} must look like 'module:function' or 'file.py:function', {_EXAMPLE}"
        )

    if location.endswith(".py") or "/" in location or "\\" in location:
        module = _import_file(Path(location))
    else:
        try:
            module = importlib.import_module(location)
        except ModuleNotFoundError as error:
            raise RewardLoadError(
                f"reward spec {spec!r}: cannot import module {location!r} ({error}). Install it, add its folder "
                f"to PYTHONPATH, or pass a file path instead, {_EXAMPLE}"
            ) from error

    fn = getattr(module, function_name, None)
    if fn is None:
        available = sorted(
            name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
        )
        raise RewardLoadError(
            f"reward spec {spec!r}: {location!r} has no attribute {function_name!r}; callables there: {available}"
        )
    if not callable(fn):
        raise RewardLoadError(
            f"reward spec {spec!r}: {function_name!r} is a {type(fn).__name__}, not a function"
        )
    check_reward_signature(fn, spec)
    return fn


def check_reward_signature(fn: RewardFn, label: str) -> None:
    """Reward functions receive ``prompts``, ``completions`` and every dataset column as keywords, so they
    need those two parameters and ``**kwargs``."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature; trust them
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        raise RewardLoadError(
            f"reward function {label!r} must accept **kwargs: it is called as fn(prompts=..., completions=..., "
            "**columns) with every dataset column; write it as `def fn(prompts, completions, answer, **kwargs)`"
        )


def resolve_reward(spec: str) -> RewardFn:
    """A built-in reward by name (``BUILTIN_REWARDS``) or a user function by spec."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise RewardLoadError(
            f"unknown reward {spec!r}; built-in rewards are {sorted(BUILTIN_REWARDS)}, or give a user function, {_EXAMPLE}"
        )
    return load_reward_function(spec)
