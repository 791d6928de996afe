"""Rule-based rewards: the R1 format reward, accuracy verifiers (integer, math-verify, Countdown), the
``RewardSet`` that combines and checks them, and process isolation for user functions.

Torch-free and light to import (math-verify is imported on first use).
"""

from zerorl.rewards.accuracy import countdown_accuracy, integer_accuracy, math_accuracy, parse_integer
from zerorl.rewards.expression import (
    CountdownVerdict,
    ExpressionError,
    check_countdown,
    evaluate,
    numbers_used,
    parse_expression,
    render,
)
from zerorl.rewards.format import completion_text, extract_answer, format_reward, has_r1_format
from zerorl.rewards.isolation import ProcessRewardFunction, RewardTimeoutError, RewardWorkerError
from zerorl.rewards.loading import BUILTIN_REWARDS, RewardLoadError, load_reward_function, resolve_reward
from zerorl.rewards.reward_set import RewardFn, RewardFunctionError, RewardSet

__all__ = [
    "BUILTIN_REWARDS",
    "CountdownVerdict",
    "ExpressionError",
    "ProcessRewardFunction",
    "RewardFn",
    "RewardFunctionError",
    "RewardLoadError",
    "RewardSet",
    "RewardTimeoutError",
    "RewardWorkerError",
    "check_countdown",
    "completion_text",
    "countdown_accuracy",
    "evaluate",
    "extract_answer",
    "format_reward",
    "has_r1_format",
    "integer_accuracy",
    "load_reward_function",
    "math_accuracy",
    "numbers_used",
    "parse_expression",
    "parse_integer",
    "render",
    "resolve_reward",
]
