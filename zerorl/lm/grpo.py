"""GRPO for language models — the DeepSeek-R1-Zero recipe, read top to bottom.

    for each step:
        q_1..q_P  ← next prompts of the task                         (data cursor += P)
        o_i,1..G  ← π_old(·|q_i), G completions each                   (rollout engine)
        r_i,j     ← Σ_f w_f · reward_f(q_i, o_i,j)                     (rule-based: accuracy + format)
        Â_i,j     ← (r_i,j − mean_j r_i,·) / (std_j r_i,· + ε)          (core.advantages.grpo)
        log π_ref ← reference forward pass (only when β > 0)
        repeat μ times, for each minibatch:
            r_t = π_θ / π_old per token;  L = −min(r_t Â, clip(r_t, 1−ε, 1+ε) Â) + β·k3(π_θ‖π_ref)
            aggregate over tokens and completions (1/G Σ_i 1/|o_i| Σ_t by default), backward,
            clip the gradient norm, AdamW step
        log metrics, checkpoint

The objective is the article's J_GRPO (DeepSeekMath, Shao et al. 2024, eq. 3); every formula lives in
``zerorl.core`` and is documented in docs/algorithms.md.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from zerorl.config import TrainConfig
from zerorl.core import advantages as adv
from zerorl.core.kl import kl_estimate
from zerorl.core.losses import aggregate, policy_loss
from zerorl.lm.batch import RolloutBatch
from zerorl.lm.forward import batched_logprobs, completion_logprobs
from zerorl.lm.lora import merge_lora
from zerorl.lm.native import NativeDecoder, layer_flops, threads_for
from zerorl.lm.page_cache import offload_reference, release
from zerorl.lm.parallel import Replicas, accumulate_gradients, replica_count
from zerorl.lm.pipeline import completion_metrics, rollout_and_score
from zerorl.lm.runtime import (
    LMRun,
    NonFiniteLossError,
    autocast,
    begin_training,
    describe_eval,
    finish_run,
    make_optimizer,
    make_scheduler,
    native_decoder,
    next_prompts,
    nonfinite_abort_message,
    release_free_memory,
    rollout_seed,
    run_evaluation,
    sampling_params,
    save_training_state,
    setup_lm_run,
    store_for_autocast,
)
from zerorl.lm.value_model import (
    model_state_bytes,
    parameter_counts,
    reference_logprobs,
    reference_model,
    refresh_reference,
    trainable_parameters,
    training_reward_set,
)


def compute_advantages(batch: RolloutBatch, config: TrainConfig) -> torch.Tensor:
    """Outcome advantages, one per completion, from the rewards of its group of G."""
    if config.advantage_estimator == "grpo":
        return adv.grpo(batch.rewards, config.num_generations, scale=config.scale_rewards)
    if config.advantage_estimator == "rloo":
        return adv.rloo(batch.rewards, config.num_generations)
    return adv.reinforce_pp(batch.rewards)


def grpo_loss(model, micro: RolloutBatch, config: TrainConfig, on_policy: bool,
              native: NativeDecoder | None = None) -> tuple[torch.Tensor, dict]:
    """The per-token GRPO loss of one micro-batch (to minimize), and its metrics.

    ``native`` (the policy's NativeDecoder) computes the same log-probs with shared prompts and packed tokens.
    """
    logprobs, entropy = completion_logprobs(model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                            micro.completion_mask, temperature=config.temperature,
                                            with_entropy=True, native=native)
    mask = micro.completion_mask
    # With μ = 1 and one minibatch the policy has not moved since sampling: π_old = π_θ, and using the
    # detached log-probs makes the ratio exactly 1 (no numerical drift between the sampler and trainer).
    old_logprobs = logprobs.detach() if on_policy else micro.old_logprobs
    loss, metrics = policy_loss(logprobs, old_logprobs, micro.advantages, mask,
                                clip_eps_low=config.epsilon, clip_eps_high=config.epsilon_high,
                                loss_agg_mode=config.loss_agg_mode, norm=config.max_completion_length)
    if config.beta > 0:
        # β·D_KL(π_θ‖π_ref) with the k3 estimator, aggregated like the surrogate (the article's J_GRPO).
        kl = kl_estimate(logprobs, micro.ref_logprobs, config.kl_estimator)
        kl_term = aggregate(kl, mask, config.loss_agg_mode, norm=config.max_completion_length)
        loss = loss + config.beta * kl_term
        metrics["kl"] = aggregate(kl.detach(), mask, "token-mean")
    metrics["entropy"] = aggregate(entropy, mask, "token-mean")
    return loss, metrics


def _share(micro: RolloutBatch, minibatch: RolloutBatch, mode: str) -> float:
    """Weight of a micro-batch's loss so that accumulated gradients equal the minibatch's gradient."""
    if mode == "token-mean":
        return micro.completion_mask.sum().item() / max(1.0, minibatch.completion_mask.sum().item())
    return len(micro) / len(minibatch)


def train(config: TrainConfig, resume: bool = False) -> dict:
    run: LMRun = setup_lm_run(config, resume=resume)
    model = run.model
    model.train()

    # What GRPO trains: every parameter, or (lora_rank > 0) LoRA adapters on the linear layers.
    trainable, _ = trainable_parameters(model, None, config)

    # The frozen reference π_ref of the KL penalty: a copy of the policy, whose weights wait in the page cache on
    # a CPU (out of the resident set through the rollout and the training pass); with LoRA the policy with its
    # adapters switched off, no copy at all. Not even loaded when β = 0 (Dr. GRPO / DAPO style).
    ref_model = reference_model(model, config)
    if ref_model is not None:
        store_for_autocast(ref_model, config)
    ref_pages = offload_reference(ref_model, config, run.run_dir, run.device)
    # The task's rule-based rewards, or a reward model (its score the reward, the rules still logged).
    reward_set, scorer = training_reward_set(run, config)

    # zerorl's lean forward (same math: shared prompts, no padding in the matmuls) where supported.
    policy_native = native_decoder(model, config)

    optimizer = make_optimizer(trainable, config)
    # One gradient accumulator per CPU worker: copies of the policy that share its weights (zerorl.lm.parallel).
    replicas = Replicas(model, replica_count(model, run.workers))
    replica_natives = [policy_native] + [native_decoder(copy_, config) for copy_ in replicas.models[1:]]
    scheduler = make_scheduler(optimizer, config, total_steps=config.max_steps)
    modules = {"model": model} | ({"ref_model": ref_model} if ref_model is not None else {})
    held_models = {"policy": model, "reference": ref_model, "reward_model": scorer.model if scorer else None}
    held = parameter_counts(held_models)

    state, evaluated_now = begin_training(run, modules, optimizer, scheduler, resume)
    start_step, data_cursor = state["step"], state["data_cursor"]
    nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
    if evaluated_now and config.save_steps:  # a step-0 checkpoint keeps the (possibly long) evaluation across a kill
        save_training_state(run, 0, data_cursor, modules, optimizer, scheduler)

    sampling = sampling_params(config)
    on_policy = config.num_iterations == 1 and config.num_minibatches == 1
    bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
               desc=f"{config.algo} {config.task}", unit="step", disable=not config.progress)
    for step in bar:
        step_start = time.perf_counter()
        release(ref_pages)  # a checkpoint's save or load, or a refresh, read or wrote them

        # 1. Prompts → G completions each → rule-based rewards.
        prompts, data_cursor = next_prompts(run, data_cursor)
        errors_before = dict(reward_set.error_counts)  # samples scored 0.0 under reward_errors=zero
        batch, timings = rollout_and_score(run.engine, prompts, sampling, reward_set,
                                           seed=rollout_seed(config, step))

        release_free_memory()  # the decode's KV cache and temporaries

        # 2. Group-relative advantages: no critic, the group is the baseline.
        batch.advantages = compute_advantages(batch, config)

        # 3. Log-probs that stay fixed during the update: π_old (when the policy will move between
        #    minibatches) and π_ref (for the KL penalty). No autograd.
        train_start = time.perf_counter()
        # Tokens of a micro-batch (each prompt once): whether a second intra-op thread pays for its passes.
        micro_tokens = (int(batch.completion_mask.sum()) + int(batch.prompt_mask[::config.num_generations].sum())) \
            * min(1.0, config.micro_batch_size / len(batch))
        work = layer_flops(model, int(micro_tokens)) if policy_native is not None else float("inf")
        with autocast(config, run.device), threads_for(work):
            if not on_policy:
                batch.old_logprobs = batched_logprobs(model, batch, config.micro_batch_size, config.temperature,
                                                      native=policy_native, workers=run.workers)
            if config.beta > 0:
                batch.ref_logprobs = reference_logprobs(model, ref_model, batch, config, workers=run.workers)
                release(ref_pages)

        # 4. μ passes of minibatch updates.
        shuffle_gen = torch.Generator().manual_seed(config.seed * 7_919 + step)
        step_metrics: dict[str, list[float]] = {}
        grad_norms = []
        skipped = 0
        minibatch_size = -(-len(batch) // config.num_minibatches)
        for _ in range(config.num_iterations):
            order = torch.randperm(len(batch), generator=shuffle_gen) if config.num_minibatches > 1 \
                else torch.arange(len(batch))
            for mb_start in range(0, len(batch), minibatch_size):
                minibatch = batch.select(order[mb_start:mb_start + minibatch_size])
                optimizer.zero_grad(set_to_none=True)

                def micro_loss(replica: int, micro: RolloutBatch, minibatch=minibatch):
                    with autocast(config, run.device):
                        loss, metrics = grpo_loss(replicas.models[replica], micro, config, on_policy,
                                                  native=replica_natives[replica])
                    metrics["loss"] = loss.detach()
                    return loss * _share(micro, minibatch, config.loss_agg_mode), metrics

                # Micro-batches on the CPU workers at once when there are several (zerorl.lm.parallel). Under
                # bf16 one autocast region spans them, so each worker casts every weight once and its
                # micro-batches share the cast (autocast caches it until its outermost region ends; their
                # backward passes run outside autocast, see parallel._backward); the gradient is the same bits
                # (tests/test_parallel.py); 31.5M model: training phase −2%, peak RSS
                # +~60 MB (step_ab, 3 rounds: each worker's bf16 copies live through its micro-batches).
                micro_batches = list(minibatch.micro_batches(config.micro_batch_size))
                with threads_for(work), autocast(config, run.device):
                    per_micro = accumulate_gradients(run.workers, replicas, micro_batches, micro_loss,
                                                     costs=[float(m.completion_mask.sum()) for m in micro_batches])
                loss_is_finite = all(bool(torch.isfinite(metrics["loss"])) for metrics in per_micro)
                for metrics in per_micro:
                    for key, value in metrics.items():
                        step_metrics.setdefault(key, []).append(float(value))
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if not (loss_is_finite and torch.isfinite(grad_norm)):
                    # A NaN/Inf would destroy the weights (and Adam's moments): skip the update, count it.
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer.step()
                grad_norms.append(grad_norm.item())
        scheduler.step()
        # The gradients are spent: freed now, not at the next backward, so that the rollout and the reference
        # pass do not carry them (a parameter-sized buffer: 126 MB on the 31.5M benchmark model).
        optimizer.zero_grad(set_to_none=True)
        # Not between micro-batches: memory handed back there is page-faulted in again by the next one
        # (measured: +70 ms per micro-batch on the default model).
        release_free_memory()
        run.engine.sync_weights(model)  # vLLM copies the updated weights; the in-process engine reads them live
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
        if skipped:
            tqdm.write(f"warning: step {step + 1}: NaN/Inf loss or gradient, {skipped} update(s) skipped "
                       f"({nonfinite_in_a_row} step(s) in a row; the run stops at {config.max_nonfinite_steps})")

        # 5. Refresh the reference model every N steps (optional; DeepSeek-R1 style long runs).
        refresh_reference(ref_model, model, config, step + 1)

        # 6. Metrics, checkpoint.
        train_seconds = time.perf_counter() - train_start
        step_time = time.perf_counter() - step_start
        row = {"step": step + 1, **completion_metrics(batch), **timings}
        row.update({key: sum(vals) / len(vals) for key, vals in step_metrics.items()})
        row.update({
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "learning_rate": scheduler.get_last_lr()[0],
            "nonfinite_skipped": skipped,
            "time/train": train_seconds,
            "step_time": step_time,
            "tokens_per_second": row["num_tokens"] / max(1e-9, timings["time/generate"]),
            "data_cursor": data_cursor,
        })
        row.update({f"rewards/{name}/errors": count - errors_before[name]
                    for name, count in reward_set.error_counts.items()})
        run.logger.log(row)
        if nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise NonFiniteLossError(nonfinite_abort_message(step + 1, nonfinite_in_a_row, run.checkpoint_root))
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row.get('kl', 0.0):.3f}",
                        len=f"{row['completions/mean_length']:.0f}")
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < config.max_steps:
            save_training_state(run, step + 1, data_cursor, modules, optimizer, scheduler,
                                extra={"nonfinite_in_a_row": nonfinite_in_a_row})
    bar.close()

    memory = model_state_bytes(held_models, optimizer)
    if start_step < config.max_steps:  # else a resume after the last checkpoint: it is already on disk
        save_training_state(run, config.max_steps, data_cursor, modules, optimizer, scheduler,
                            extra={"nonfinite_in_a_row": nonfinite_in_a_row})
        release(ref_pages)
    if config.eval_at_end:
        print(describe_eval("after", run_evaluation(run, "after")), flush=True)
    if config.lora_rank > 0:
        merge_lora(model)  # final/ is a plain HF model with the adapters folded in
    return finish_run(run, extra={"models": held, "model_state_bytes": memory})
