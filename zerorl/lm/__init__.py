"""Language-model side of zerorl: models, tokenizers, rollout engines and the LM trainers.

Nothing is imported here on purpose: `import zerorl.lm` must stay cheap (no torch/transformers
import), so callers import the module they need, e.g. `from zerorl.lm.rollout import HFRolloutEngine`.
"""
