"""PPO for language models — RLHF-style (Ziegler et al. 2019; Ouyang et al. 2022), read top to bottom.

    for each step:
        q_1..q_P  ← next prompts of the task                          (data cursor += P)
        o_i,1..G  ← π_old(·|q_i), G samples each (same sample budget as GRPO; no group is needed)
        score_i   ← Σ_f w_f · reward_f(q, o)   or   reward_model(q + o)
        log π_old, V(q, o_<t) ← policy and critic, no grad;  log π_ref ← reference (β > 0)
        r_t       ← −β·(log π_old − log π_ref) per token  +  score on the last token   (kl_in_reward)
        Â_t, R_t  ← GAE(r, V, γ, λ);  Â ← whiten(Â)                  (core.advantages.gae)
        repeat μ times, for each minibatch:
            L = −min(r_t Â_t, clip(r_t, 1−ε, 1+ε) Â_t)               (core.losses.policy_loss)
              + c_V · ½ max((V−R)², (V_old + clip(V−V_old, ±c) − R)²)  (core.losses.value_loss)
              [+ β·k3(π_θ‖π_ref) when kl_in_reward=False, as GRPO]
            token-mean over the minibatch, backward, clip the policy's and the critic's gradient norms
            separately, AdamW step (one optimizer, the critic in its own parameter group)
        log metrics, checkpoint

Compared with GRPO (grpo.py), the advantage comes from a learned value model instead of the group of G
completions: that critic is the extra model in memory the article's figure shows.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from zerorl.config import TrainConfig
from zerorl.core.advantages import gae
from zerorl.core.kl import kl_estimate
from zerorl.core.logprobs import entropy_from_logits, logprobs_from_logits
from zerorl.core.losses import aggregate, policy_loss, value_loss
from zerorl.lm.batch import RolloutBatch
from zerorl.lm.lora import merge_lora
from zerorl.lm.page_cache import offload_reference, release
from zerorl.lm.parallel import CPUWorkers, Replicas, accumulate_gradients, replica_count
from zerorl.lm.pipeline import completion_metrics, rollout_and_score
from zerorl.lm.runtime import (
    NonFiniteLossError,
    begin_training,
    describe_eval,
    finish_run,
    make_optimizer,
    make_scheduler,
    next_prompts,
    nonfinite_abort_message,
    rollout_seed,
    run_evaluation,
    sampling_params,
    save_training_state,
    setup_lm_run,
)
from zerorl.lm.value_model import (
    build_critic,
    logits_and_values,
    masked_whiten,
    model_state_bytes,
    parameter_counts,
    reference_logprobs,
    reference_model,
    refresh_reference,
    rollout_logprobs_and_values,
    token_level_rewards,
    trainable_parameters,
    training_reward_set,
)

PPO_AGG_MODE = "token-mean"  # PPO averages over all valid tokens of the minibatch (TRL's masked_mean)


def estimate_advantages(policy, critic, ref_model, batch: RolloutBatch, config: TrainConfig,
                        workers: CPUWorkers | None = None) -> torch.Tensor:
    """Fill batch.old_logprobs, values, ref_logprobs, returns and (whitened) advantages; return the raw Â.

        r_t = −β·(log π_old − log π_ref) + score·[t = last]     (β only when kl_in_reward)
        Â_t, R_t = GAE(r, V, γ, λ)                               R_t = Â_t + V_t, the critic's targets
    """
    mask = batch.completion_mask.bool()
    batch.old_logprobs, batch.values = rollout_logprobs_and_values(
        policy, critic, batch, config.micro_batch_size, config.temperature, workers=workers)
    if config.beta > 0:
        batch.ref_logprobs = reference_logprobs(policy, ref_model, batch, config, workers=workers)
    kl_coef = config.beta if config.kl_in_reward else 0.0
    token_rewards = token_level_rewards(batch.rewards, batch.old_logprobs, batch.ref_logprobs, mask, kl_coef)
    advantages, batch.returns = gae(token_rewards, batch.values, mask, gamma=config.gamma, lam=config.lam)
    # Whitening makes the step size independent of the reward scale; the returns stay unwhitened.
    batch.advantages = masked_whiten(advantages, mask) if config.whiten_advantages else advantages
    return advantages


def ppo_loss(policy, critic, micro: RolloutBatch, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate + c_V · clipped value loss of one micro-batch (to minimize), and metrics."""
    logits, values = logits_and_values(policy, critic, micro)
    logprobs = logprobs_from_logits(logits, micro.completion_ids, temperature=config.temperature)
    mask = micro.completion_mask.bool()
    pg_loss, metrics = policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask,
                                   clip_eps_low=config.epsilon, clip_eps_high=config.epsilon_high,
                                   loss_agg_mode=PPO_AGG_MODE)
    vf_loss, value_metrics = value_loss(values, micro.values, micro.returns, mask,
                                        clip_range=config.cliprange_value, loss_agg_mode=PPO_AGG_MODE)
    loss = pg_loss + config.vf_coef * vf_loss
    if micro.ref_logprobs is not None:
        kl = kl_estimate(logprobs, micro.ref_logprobs, config.kl_estimator)
        if not config.kl_in_reward:
            # GRPO's placement: β·KL(π_θ‖π_ref) as a loss term instead of a per-token reward.
            loss = loss + config.beta * aggregate(kl, mask, PPO_AGG_MODE)
        metrics["kl"] = aggregate(kl.detach(), mask, "token-mean")
    with torch.no_grad():
        metrics["entropy"] = aggregate(entropy_from_logits(logits.detach() / config.temperature), mask, "token-mean")
    metrics.update(value_metrics)
    metrics["policy_loss"], metrics["value_loss"] = pg_loss.detach(), vf_loss.detach()
    return loss, metrics


def train(config: TrainConfig, resume: bool = False) -> dict:
    run = setup_lm_run(config, resume=resume)
    policy = run.model
    policy.train()

    # The value model: a copy of the policy's transformer + scalar head, or a head on the policy itself.
    # Built before LoRA so that a separate critic starts from the plain base weights.
    critic = build_critic(policy, config.critic).to(run.device)
    policy_params, critic_params = trainable_parameters(policy, critic, config)  # all, or LoRA adapters

    # π_ref: a frozen copy; with LoRA the base model with adapters switched off, no copy at all.
    ref_model = reference_model(policy, config)
    ref_pages = offload_reference(ref_model, config, run.run_dir, run.device)  # weights in the page cache
    reward_set, scorer = training_reward_set(run, config)

    critic_lr = config.critic_learning_rate or config.learning_rate
    optimizer = make_optimizer([{"params": policy_params, "lr": config.learning_rate},
                                {"params": critic_params, "lr": critic_lr}], config)
    scheduler = make_scheduler(optimizer, config, total_steps=config.max_steps)
    # One gradient accumulator per CPU worker: copies of (policy, critic) sharing their weights (zerorl.lm.parallel).
    pair = nn.ModuleDict({"policy": policy, "critic": critic})
    replicas = Replicas(pair, replica_count(pair, run.workers, forward_of=policy))
    modules = {"model": policy, "critic": critic} | ({"ref_model": ref_model} if ref_model is not None else {})
    held = parameter_counts({"policy": policy, "critic": critic, "reference": ref_model,
                             "reward_model": scorer.model if scorer else None})

    state, _ = begin_training(run, modules, optimizer, scheduler, resume)
    start_step, data_cursor = state["step"], state["data_cursor"]

    sampling = sampling_params(config)
    skipped_in_a_row = state.get("nonfinite_in_a_row", 0)
    bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
               desc=f"ppo {config.task}", unit="step", disable=not config.progress)
    for step in bar:
        step_start = time.perf_counter()
        release(ref_pages)  # a checkpoint's save or load read or wrote them

        # 1. Prompts → samples → scalar scores (verifiers or a reward model).
        prompts, data_cursor = next_prompts(run, data_cursor)
        batch, timings = rollout_and_score(run.engine, prompts, sampling, reward_set,
                                           seed=rollout_seed(config, step))
        train_start = time.perf_counter()
        mask = batch.completion_mask.bool()

        # 2-3. π_old, V and π_ref at rollout time; token rewards; GAE; whitening.
        advantages = estimate_advantages(policy, critic, ref_model, batch, config, workers=run.workers)
        release(ref_pages)

        # 4. μ passes of minibatch updates of policy and critic together.
        shuffle_gen = torch.Generator().manual_seed(config.seed * 7_919 + step)
        step_metrics: dict[str, list[float]] = {}
        grad_norms, critic_grad_norms, skipped = [], [], 0
        minibatch_size = -(-len(batch) // config.num_minibatches)
        for _ in range(config.num_iterations):
            order = torch.randperm(len(batch), generator=shuffle_gen) if config.num_minibatches > 1 \
                else torch.arange(len(batch))
            for mb_start in range(0, len(batch), minibatch_size):
                minibatch = batch.select(order[mb_start:mb_start + minibatch_size])
                tokens = max(1.0, minibatch.completion_mask.sum().item())
                optimizer.zero_grad(set_to_none=True)

                def micro_loss(replica: int, micro: RolloutBatch, tokens=tokens):
                    pair = replicas.models[replica]
                    loss, metrics = ppo_loss(pair["policy"], pair["critic"], micro, config)
                    metrics["loss"] = loss.detach()
                    # token-mean over the minibatch = Σ_micro (tokens_micro / tokens_minibatch) · mean_micro
                    return loss * (micro.completion_mask.sum().item() / tokens), metrics

                micro_batches = list(minibatch.micro_batches(config.micro_batch_size))
                per_micro = accumulate_gradients(run.workers, replicas, micro_batches, micro_loss,
                                                 costs=[float(m.completion_mask.sum()) for m in micro_batches])
                for metrics in per_micro:
                    for key, value in metrics.items():
                        step_metrics.setdefault(key, []).append(float(value))
                # Separate clipping: a large value-loss gradient must not shrink the policy's step.
                grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, config.max_grad_norm)
                critic_grad_norm = torch.nn.utils.clip_grad_norm_(critic_params, config.max_grad_norm)
                if not (torch.isfinite(grad_norm) and torch.isfinite(critic_grad_norm)):
                    optimizer.zero_grad(set_to_none=True)  # a NaN/Inf step would destroy weights and Adam state
                    skipped += 1
                    continue
                optimizer.step()
                grad_norms.append(grad_norm.item())
                critic_grad_norms.append(critic_grad_norm.item())
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # spent: not carried through the next rollout (as in grpo.py)
        run.engine.sync_weights(policy)  # vLLM copies the updated weights; the in-process engine reads them live
        refresh_reference(ref_model, policy, config, step + 1)  # every ref_model_sync_steps (0 = never)
        skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
        if skipped_in_a_row >= config.max_nonfinite_steps:
            raise NonFiniteLossError(nonfinite_abort_message(step + 1, skipped_in_a_row, run.checkpoint_root))

        # 5. Metrics, checkpoint.
        step_time = time.perf_counter() - step_start
        row = {"step": step + 1, **completion_metrics(batch), **timings}
        row.update({key: sum(vals) / len(vals) for key, vals in step_metrics.items()})
        row.update({
            "advantages/mean_raw": float(advantages[mask].mean()) if mask.any() else 0.0,
            "returns/mean": float(batch.returns[mask].mean()) if mask.any() else 0.0,
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "critic_grad_norm": sum(critic_grad_norms) / len(critic_grad_norms) if critic_grad_norms else float("nan"),
            "learning_rate": scheduler.get_last_lr()[0],
            "nonfinite_skipped": skipped,
            "time/train": time.perf_counter() - train_start,
            "step_time": step_time,
            "data_cursor": data_cursor,
        })
        run.logger.log(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", vloss=f"{row.get('value_loss', 0.0):.3f}",
                        len=f"{row['completions/mean_length']:.0f}")
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < config.max_steps:
            save_training_state(run, step + 1, data_cursor, modules, optimizer, scheduler,
                                extra={"nonfinite_in_a_row": skipped_in_a_row})
    bar.close()

    memory = model_state_bytes({"policy": policy, "critic": critic, "reference": ref_model,
                                "reward_model": scorer.model if scorer else None}, optimizer)
    if start_step < config.max_steps:  # else a resume after the last checkpoint: it is already on disk
        save_training_state(run, config.max_steps, data_cursor, modules, optimizer, scheduler,
                            extra={"nonfinite_in_a_row": skipped_in_a_row})
        release(ref_pages)
    if config.eval_at_end:
        print(describe_eval("after", run_evaluation(run, "after")), flush=True)
    if config.lora_rank > 0:
        merge_lora(policy)  # final/ is a plain HF model with the adapters folded in
    return finish_run(run, extra={"models": held, "model_state_bytes": memory})
