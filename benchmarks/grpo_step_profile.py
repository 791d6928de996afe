"""Where a zerorl GRPO step spends its time, and what each candidate speed-up would save, measured on a
fixed batch without touching the trainer (evidence for issue 7's "faster step with the same math").

    OMP_NUM_THREADS=1 python benchmarks/grpo_step_profile.py --model benchmarks/_work/models/qwen2-31.5m

The batch: P = 8 arithmetic prompts (compact template) × G = 8 completions sampled by zerorl's engine
(32 new tokens at most), rewards from zerorl's verifiers. Each variant is timed best-of-`--repeats`:

  generate            HFRolloutEngine.generate (the trainer's rollout)
  reference           batched_logprobs on a frozen copy (torch.no_grad), what grpo.py runs for β > 0
  reference/inference the same under torch.inference_mode
  policy fwd+bwd      grpo_loss + backward (with the entropy metric), as grpo.py runs it
  ... no entropy      the same loss without the entropy metric's extra softmax pass
  ... bf16 autocast   the same under torch.autocast("cpu", bfloat16)
  optimizer           clip_grad_norm_ + AdamW.step: default (for-loop), foreach, fused
  eager attention     policy fwd+bwd with attn_implementation="eager" instead of sdpa
  torch.compile       (--compile) policy fwd+bwd through torch.compile(model, dynamic=False)
  bf16 autocast       generate and reference too, under torch.autocast("cpu", bfloat16)

Loss equality is printed for each variant (|Δloss| against the fp32 baseline): a speed-up that changes
the math is not a candidate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from zerorl.config import TrainConfig  # noqa: E402
from zerorl.core import advantages as adv  # noqa: E402
from zerorl.lm.forward import batched_logprobs  # noqa: E402
from zerorl.lm.grpo import grpo_loss  # noqa: E402
from zerorl.lm.models import load_model_and_tokenizer  # noqa: E402
from zerorl.lm.pipeline import render_prompts, rollout_and_score  # noqa: E402
from zerorl.lm.rollout import HFRolloutEngine, SamplingParams  # noqa: E402
from zerorl.lm.runtime import build_reward_set  # noqa: E402
from zerorl.tasks import ArithmeticTask  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles first)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = TrainConfig(model=args.model, prompts_per_step=8, num_generations=8, max_completion_length=32,
                         beta=0.04, template="compact")
    model, tokenizer = load_model_and_tokenizer(args.model)
    task = ArithmeticTask(seed=0)
    rows = [task.train_row(i) for i in range(config.prompts_per_step)]
    prompts = render_prompts(rows, "compact", tokenizer)
    engine = HFRolloutEngine(model, tokenizer)
    sampling = SamplingParams(n=config.num_generations, max_new_tokens=config.max_completion_length)
    reward_set = build_reward_set(task, config)

    results: list[tuple[str, float, str]] = []
    seconds, (batch, _) = best_of(lambda: rollout_and_score(engine, prompts, sampling, reward_set, seed=0),
                                  args.repeats)
    results.append(("generate", seconds, f"{int(batch.completion_mask.sum())} completion tokens"))

    def generate_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return engine.generate(prompts.texts, sampling, seed=0)
    seconds, out = best_of(generate_bf16, args.repeats)
    results.append(("generate, bf16 autocast", seconds, f"{out.num_generated_tokens} completion tokens"))
    batch.advantages = adv.grpo(batch.rewards, config.num_generations, scale=config.scale_rewards)
    # Rewards of a random model are all 0, so the advantages are 0; give them spread so the loss and its
    # gradient are not trivially 0 (the cost of the step does not depend on their values).
    batch.advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(1))

    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    seconds, ref = best_of(lambda: batched_logprobs(ref_model, batch, 64, 1.0), args.repeats)
    results.append(("reference (no_grad)", seconds, ""))

    def ref_inference():
        with torch.inference_mode():
            return batched_logprobs(ref_model, batch, 64, 1.0)
    seconds, _ = best_of(ref_inference, args.repeats)
    results.append(("reference (inference_mode)", seconds, ""))

    def ref_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return batched_logprobs(ref_model, batch, 64, 1.0)
    seconds, ref16 = best_of(ref_bf16, args.repeats)
    mask = batch.completion_mask.bool()
    results.append(("reference, bf16 autocast", seconds,
                    f"max |Δlogp| {float((ref16 - ref)[mask].abs().max()):.1e} (not same math)"))
    batch.ref_logprobs = ref.clone()

    model.train()

    def fwd_bwd(cfg=config, autocast=False, entropy=True):
        def run():
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if entropy:
                    loss, _ = grpo_loss(model, batch, cfg, on_policy=True)
                else:
                    import zerorl.lm.grpo as grpo_module

                    original = grpo_module.completion_logprobs
                    def no_entropy(*a, **k):
                        logprobs, _ = original(*a, **{**k, "with_entropy": False})
                        return logprobs, torch.zeros_like(logprobs.detach())
                    grpo_module.completion_logprobs = no_entropy
                    try:
                        loss, _ = grpo_loss(model, batch, cfg, on_policy=True)
                    finally:
                        grpo_module.completion_logprobs = original
            loss.backward()
            return float(loss.detach())
        return run

    seconds, base_loss = best_of(fwd_bwd(), args.repeats)
    results.append(("policy fwd+bwd (fp32, as grpo.py)", seconds, f"loss {base_loss:.6f}"))
    seconds, loss = best_of(fwd_bwd(entropy=False), args.repeats)
    results.append(("policy fwd+bwd, no entropy metric", seconds, f"|Δloss| {abs(loss - base_loss):.1e}"))
    seconds, loss = best_of(fwd_bwd(autocast=True), args.repeats)
    results.append(("policy fwd+bwd, bf16 autocast", seconds, f"|Δloss| {abs(loss - base_loss):.1e} (not same math)"))

    fwd_bwd()()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    for name, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-9, betas=(0.9, 0.99), **kwargs)

        def step(optimizer=optimizer):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        step()  # allocate the moments
        seconds, _ = best_of(step, args.repeats)
        results.append((f"clip + AdamW.step ({name})", seconds, ""))

    eager, _ = load_model_and_tokenizer(args.model)
    eager.config._attn_implementation = "eager"
    eager.load_state_dict(model.state_dict())
    eager.train()
    model_backup = model
    model = eager  # noqa: F841 - fwd_bwd closes over `model`
    seconds, loss = best_of(fwd_bwd(), args.repeats)
    results.append(("policy fwd+bwd, eager attention", seconds, f"|Δloss| {abs(loss - base_loss):.1e}"))
    model = model_backup

    if args.compile:
        compiled = torch.compile(model, dynamic=False)
        model_backup, model = model, compiled
        start = time.perf_counter()
        loss = fwd_bwd()()
        results.append(("torch.compile: first call (compiles)", time.perf_counter() - start, ""))
        seconds, loss = best_of(fwd_bwd(), args.repeats)
        results.append(("policy fwd+bwd, torch.compile", seconds, f"|Δloss| {abs(loss - base_loss):.1e}"))
        model = model_backup

    width = max(len(name) for name, _, _ in results)
    print(f"model {args.model}, {args.threads} thread(s), best of {args.repeats}, batch {len(batch)} × "
          f"(prompt {batch.prompt_ids.shape[1]} + completion {batch.completion_ids.shape[1]}) columns")
    print(f"| {'part'.ljust(width)} | seconds | note |\n|{'-' * (width + 2)}|---|---|")
    for name, seconds, note in results:
        print(f"| {name.ljust(width)} | {seconds:.3f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
