"""One TRL GRPOTrainer run for benchmarks/vs_trl.py, executed by the TRL venv's python in a fresh process.

    benchmarks/.venv-trl/bin/python benchmarks/_trl_grpo_runner.py --model DIR --out RESULT.json \
        [--gradient-checkpointing on|off] [--steps 6] [--threads 2] ...

Same work as `zerorl train --task arithmetic template=compact`: the same prompts in the same order
(zerorl.tasks.ArithmeticTask(seed=0).train_row(0, 1, ...) rendered with the compact template), the same
reward functions (zerorl.rewards.integer_accuracy + format_reward, weights 1 + 1: zerorl's task and
rewards are pure Python, imported from the repository without installing it), G completions per prompt,
the same loss (loss_type="grpo": 1/G Σ_i 1/|o_i| Σ_t, the article's aggregation), β, ε, μ, learning rate,
AdamW betas, grad-norm clip, constant LR, fp32 on the CPU. One difference that does not change the work
here: zerorl also stops a completion at the text "</answer>", TRL only at EOS; a random-init model writes
neither, so every completion on both sides runs to max_completion_length.

Writes JSON: per-step wall seconds (TrainerCallback, on_step_begin → on_step_end, i.e. generation,
rewards, reference and policy passes and the optimizer step), completion tokens per step (counted from
the completion_ids TRL hands the reward function), TRL's logged completions/mean_length, and the peak
RSS of this process (getrusage ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO_ROOT))  # zerorl's tasks and rewards are torch-free, pure Python
    from zerorl.rewards import format_reward, integer_accuracy
    from zerorl.tasks import ArithmeticTask, format_prompt

    task = ArithmeticTask(seed=0)
    rows = [task.train_row(i) for i in range(args.prompts * args.steps)]
    dataset = Dataset.from_list([{"prompt": format_prompt(row, "compact"), "answer": row["answer"]}
                                 for row in rows])

    completion_tokens: list[int] = []

    def accuracy(prompts, completions, completion_ids=None, **kwargs):
        """zerorl's integer_accuracy; also counts this step's completion tokens (called once per step)."""
        completion_tokens.append(sum(len(ids) for ids in completion_ids))
        return integer_accuracy(prompts, completions, **kwargs)

    def format(prompts, completions, **kwargs):  # noqa: A001 - the metric name zerorl logs
        return format_reward(prompts, completions, **kwargs)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.logs: list[dict] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.prompts * args.generations,  # P prompts × G per step
            gradient_accumulation_steps=1,
            num_generations=args.generations,
            max_completion_length=args.completion_length,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=args.beta,
            num_iterations=1,
            epsilon=0.2,
            loss_type="grpo",
            scale_rewards="group",
            reward_weights=[1.0, 1.0],
            learning_rate=args.learning_rate,
            lr_scheduler_type="constant",
            adam_beta1=0.9,
            adam_beta2=0.99,
            weight_decay=0.0,
            max_grad_norm=1.0,
            gradient_checkpointing=args.gradient_checkpointing == "on",
            use_cpu=True,
            bf16=False,
            fp16=False,
            model_init_kwargs={"dtype": torch.float32},
            shuffle_dataset=False,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        trainer = GRPOTrainer(model=args.model, reward_funcs=[accuracy, format], args=config,
                              train_dataset=dataset, callbacks=[timer])
        trainer.train()

    mean_lengths = [log["completions/mean_length"] for log in timer.logs if "completions/mean_length" in log]
    import transformers
    import trl

    result = {
        "system": f"trl-ckpt-{args.gradient_checkpointing}",
        "step_seconds": timer.seconds,
        "completion_tokens": completion_tokens,
        "logged_mean_length": mean_lengths,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "pid": os.getpid(),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
