"""Pure tensor math of the article's RL: advantages, KL estimators, losses, log-probs, trust region.

Nothing here imports the rest of zerorl; every function states its formula and source in its docstring.
See docs/algorithms.md for the formula → function map.
"""

from zerorl.core import advantages, kl, logprobs, losses, trust_region

__all__ = ["advantages", "kl", "logprobs", "losses", "trust_region"]
