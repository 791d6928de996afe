"""TRPO for language models — the article's constrained problem, solved on an LLM, read top to bottom.

    max_θ  E[ π_θ(o_t|q,o_<t) / π_old(o_t|q,o_<t) · Â_t ]   s.t.   mean_t KL(π_old(·|q,o_<t) ‖ π_θ(·|q,o_<t)) ≤ δ

    for each step:
        q, o ← prompts and G samples each (same sample budget as GRPO and PPO); score them
        log π_old (token and whole vocabulary) ← policy, no grad;  log π_ref ← reference (β > 0)
        advantages, one of (trpo_advantages):
            "group"  Â_i ← advantage_estimator over the G samples of prompt i (as GRPO), on every token;
                     no critic; β·k(π_θ‖π_ref) is subtracted from the surrogate (GRPO's placement)
            "gae"    V(q, o_<t) ← critic;  r_t ← −β·(log π_old − log π_ref) + score on the last token;
                     Â, R ← GAE;  Â ← whiten(Â)  (as PPO)
        policy: ONE natural-gradient step (core.trust_region.trpo_step):
            g = ∇ surrogate;  x ≈ F⁻¹g by cg_iters of CG on Fisher-vector products (double backprop
            of the exact vocabulary KL);  s = sqrt(2δ / xᵀFx)·x;  backtracking line search on the
            measured mean KL over the whole batch (≤ δ) and the surrogate (must improve)
        critic ("gae" only): trpo_value_steps Adam steps on the value loss (TRPO itself has no value term)
        log the accepted step's KL, the backtracks, the surrogate improvement; checkpoint

The trainable parameters are the whole model, or only LoRA adapters (lora_rank > 0) for large ones:
conjugate gradient then works in the adapters' small space. Log-probs are recomputed from float32 logits
with plain autograd (the KL is differentiated twice); dtype=bfloat16 is refused.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from zerorl.config import ConfigError, TrainConfig
from zerorl.core import advantages as adv
from zerorl.core.kl import kl_estimate
from zerorl.core.logprobs import entropy_from_logits
from zerorl.core.losses import aggregate, policy_loss, value_loss
from zerorl.core.trust_region import TRPOStepInfo, flat_grad, trpo_step
from zerorl.lm.batch import RolloutBatch
from zerorl.lm.forward import completion_logits
from zerorl.lm.grpo import compute_advantages
from zerorl.lm.lora import merge_lora
from zerorl.lm.page_cache import offload_reference, release
from zerorl.lm.parallel import CPUWorkers, Replicas, balanced_shards, replica_count, run_tasks
from zerorl.lm.pipeline import completion_metrics, rollout_and_score
from zerorl.lm.runtime import (
    begin_training,
    describe_eval,
    finish_run,
    make_optimizer,
    make_scheduler,
    next_prompts,
    rollout_seed,
    run_evaluation,
    sampling_params,
    save_training_state,
    setup_lm_run,
)
from zerorl.lm.value_model import (
    ValueHead,
    build_critic,
    completion_hidden,
    critic_values,
    logits_and_values,
    masked_whiten,
    model_state_bytes,
    parameter_counts,
    reference_logprobs,
    reference_model,
    refresh_reference,
    token_level_rewards,
    trainable_parameters,
    training_reward_set,
)

NO_CLIP = math.inf  # policy_loss without the clip is TRPO's surrogate r·Â


def vocab_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / τ) over the vocabulary, float32 with plain autograd (twice differentiable)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def vocab_kl_sum(old_log_probs: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over valid positions of the exact KL(π_old(·|s) ‖ π_θ(·|s)) = Σ_v π_old(v) (log π_old(v) − log π_θ(v)).

    The exact KL (not a sampled estimate) has the Fisher matrix as its Hessian at θ = θ_old, which is
    what TRPO's Fisher-vector products need. old_log_probs, log_probs [B, T, V]; mask [B, T].
    """
    per_position = (old_log_probs.exp() * (old_log_probs - log_probs)).sum(dim=-1)
    return torch.where(mask.bool(), per_position, torch.zeros_like(per_position)).sum()


class TrustRegionProblem:
    """surrogate_fn and kl_fn of one rollout batch, for ``core.trust_region.trpo_step``.

    ``micros`` are the batch's micro-batches with old_logprobs and advantages; ``old_vocab`` their
    log π_old over the vocabulary [b, w, V]. Both functions recompute from the policy's current weights.
    Under no_grad (the line search calls them back to back at the same weights) one forward pass serves
    both. With fisher_subsample = k > 1 the Fisher-vector products (the only calls with autograd on the
    KL) use every k-th completion, as OpenAI baselines' TRPO does; every KL the line search tests and
    every KL logged is measured on the whole batch. With kl_coef = β > 0 (and ref_logprobs in the
    micro-batches) the surrogate also pays β·k(π_θ‖π_ref) per token (GRPO's placement of the KL penalty).
    """

    def __init__(self, policy: torch.nn.Module, params: list[torch.Tensor], micros: list[RolloutBatch],
                 old_vocab: list[torch.Tensor], temperature: float, fisher_subsample: int = 1,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", workers: CPUWorkers | None = None,
                 replicas: Replicas | None = None):
        self.policy, self.params, self.temperature = policy, params, temperature
        self.workers, self.replicas = workers, replicas
        self.kl_coef, self.kl_estimator = kl_coef, kl_estimator
        self.micros, self.old_vocab = micros, old_vocab
        self.tokens = max(1.0, sum(m.completion_mask.sum().item() for m in micros))
        self.fisher_pairs = list(zip(micros, old_vocab))
        if fisher_subsample > 1:
            self.fisher_pairs = []
            for micro, old in zip(micros, old_vocab):
                rows = torch.arange(0, len(micro), fisher_subsample)
                sub = micro.select(rows)
                self.fisher_pairs.append((sub, old[rows, :sub.completion_ids.shape[1]]))
        self.fisher_tokens = max(1.0, sum(m.completion_mask.sum().item() for m, _ in self.fisher_pairs))
        self._cache_key, self._cache = None, []

    def _log_probs(self, micros: list[RolloutBatch]) -> list[torch.Tensor]:
        if torch.is_grad_enabled():
            return [self._vocab_log_probs(m) for m in micros]
        key = tuple(p._version for p in self.params)
        if key != self._cache_key:  # the weights changed since the last forward pass
            # The line search's forward passes: one micro-batch per task, on the CPU workers when there are some.
            tasks = [functools.partial(self._vocab_log_probs, m) for m in self.micros]
            self._cache = run_tasks(self.workers, tasks, self.policy)
            self._cache_key = key
        return self._cache

    def _vocab_log_probs(self, micro: RolloutBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        """log π_θ over the vocabulary at every completion position, through ``model`` (default the policy)."""
        logits = completion_logits(model or self.policy, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                   micro.completion_mask)
        return vocab_log_softmax(logits, self.temperature)

    def _kl_sum(self, pairs, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Σ over the valid tokens of ``pairs`` (micro-batch, log π_old) of the exact KL(π_old ‖ π_θ), with graph."""
        return sum(vocab_kl_sum(old, self._vocab_log_probs(micro, model), micro.completion_mask)
                   for micro, old in pairs)

    def _surrogate_term(self, micro: RolloutBatch, log_probs: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of L: −(its token-mean loss) × (its tokens / the batch's tokens)."""
        logp = log_probs.gather(-1, micro.completion_ids.unsqueeze(-1)).squeeze(-1)
        mask = micro.completion_mask.bool()
        loss, _ = policy_loss(logp, micro.old_logprobs, micro.advantages, mask,
                              clip_eps_low=NO_CLIP, loss_agg_mode="token-mean")
        if self.kl_coef > 0 and micro.ref_logprobs is not None:
            penalty = kl_estimate(logp, micro.ref_logprobs, self.kl_estimator)
            loss = loss + self.kl_coef * aggregate(penalty, mask, "token-mean")
        return -loss * (micro.completion_mask.sum().item() / self.tokens)

    def surrogate(self) -> torch.Tensor:
        """L(θ) = mean over valid tokens of π_θ/π_old · Â  [− β·k(π_θ‖π_ref)]  (to maximize)."""
        total = 0.0
        for micro, log_probs in zip(self.micros, self._log_probs(self.micros)):
            total = total + self._surrogate_term(micro, log_probs)
        return total

    def kl(self) -> torch.Tensor:
        """Mean over valid tokens of the exact KL(π_old ‖ π_θ) (the Fisher subsample under autograd)."""
        if torch.is_grad_enabled():
            return self._kl_sum(self.fisher_pairs) / self.fisher_tokens
        total = sum(vocab_kl_sum(old, lp, m.completion_mask)
                    for m, old, lp in zip(self.micros, self.old_vocab, self._log_probs(self.micros)))
        return total / self.tokens

    # --- the same two quantities split across CPU workers (zerorl.lm.parallel) ------------------------
    @property
    def parallel(self) -> bool:
        return self.replicas is not None and self.replicas.num_workers > 1 and len(self.micros) > 1

    def _shards(self) -> list[tuple[torch.nn.Module, list[torch.Tensor], list[int]]]:
        """(copy of the policy, its parameters matching ``params``, micro-batch indices) per worker."""
        position = {id(p): i for i, p in enumerate(self.policy.parameters())}
        costs = [float(m.completion_mask.sum()) for m in self.micros]
        shards = balanced_shards(costs, min(self.replicas.num_workers, self.workers.num_workers))
        out = []
        for k, shard in enumerate(shards):
            model = self.replicas.models[k + 1]
            own = list(model.parameters())
            out.append((model, [own[position[id(p)]] for p in self.params], shard))
        return out

    def surrogate_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, ∇L): each worker differentiates its micro-batches' terms through its own copy; the per-worker
        results are added in worker order."""
        def task(model, params, shard):
            part = sum(self._surrogate_term(self.micros[i], self._vocab_log_probs(self.micros[i], model)) for i in shard)
            return part.detach(), flat_grad(part, params)

        parts = self.workers.run([functools.partial(task, *shard) for shard in self._shards()])
        return sum(value for value, _ in parts), sum(grad for _, grad in parts)

    def fisher(self, damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ (F + damping·I) v with F the Hessian of the (Fisher-subsample) mean KL: each worker keeps the
        graph of ∇ of its micro-batches' KL terms and answers its share of every product."""
        def build(model, params, shard):
            kl = self._kl_sum([self.fisher_pairs[i] for i in shard], model) / self.fisher_tokens
            return params, flat_grad(kl, params, create_graph=True)

        graphs = self.workers.run([functools.partial(build, *shard) for shard in self._shards()])

        def product(params, kl_grad, vector):
            return flat_grad(kl_grad @ vector, params, retain_graph=True)

        def fvp(vector: torch.Tensor) -> torch.Tensor:
            vector = vector.detach()
            parts = self.workers.run([functools.partial(product, params, kl_grad, vector)
                                      for params, kl_grad in graphs])
            return sum(parts) + damping * vector

        return fvp


@torch.no_grad()
def rollout_statistics(policy, critic, batch: RolloutBatch, micro_batch_size: int, temperature: float,
                       workers: CPUWorkers | None = None) -> list[torch.Tensor]:
    """Fill batch.old_logprobs (and batch.values when there is a critic); return log π_old over the
    vocabulary per micro-batch. With ``workers`` the micro-batches run concurrently (same numbers)."""
    was_training = policy.training
    policy.eval()
    batch.old_logprobs = torch.zeros(batch.completion_ids.shape, dtype=torch.float32,
                                     device=batch.completion_ids.device)
    values_out = torch.zeros_like(batch.old_logprobs) if critic is not None else None
    micros = batch.micro_batches(micro_batch_size)

    def statistics(micro: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = None
        if critic is not None:
            logits, values = logits_and_values(policy, critic, micro)
        else:
            logits = completion_logits(policy, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                       micro.completion_mask)
        return vocab_log_softmax(logits, temperature), values

    results = run_tasks(workers, [functools.partial(statistics, micro) for micro in micros], forward_of=policy)
    old_vocab = []
    for start, micro, (log_probs, values) in zip(range(0, len(batch), micro_batch_size), micros, results):
        width, rows = micro.completion_ids.shape[1], slice(start, start + len(micro))
        batch.old_logprobs[rows, :width] = log_probs.gather(-1, micro.completion_ids.unsqueeze(-1)).squeeze(-1)
        if values_out is not None:
            values_out[rows, :width] = values
        old_vocab.append(log_probs)
    policy.train(was_training)
    mask = batch.completion_mask.bool()
    batch.old_logprobs = batch.old_logprobs * mask
    if values_out is not None:
        batch.values = values_out * mask
    return old_vocab


def group_advantages(batch: RolloutBatch, config: TrainConfig) -> torch.Tensor:
    """Token advantages [N, Lc] without a critic: each completion's outcome advantage against the other
    samples of its prompt (advantage_estimator, as GRPO: (r − mean_group r) / std_group r by default),
    the same on each of its tokens; 0 on padding."""
    outcome = compute_advantages(batch, config)  # GRPO's, one per completion
    mask = batch.completion_mask.bool()
    return torch.where(mask, outcome.float().to(mask.device).unsqueeze(1), torch.zeros(mask.shape, device=mask.device))


def gae_advantages(batch: RolloutBatch, config: TrainConfig) -> torch.Tensor:
    """PPO's token advantages from the critic (fills batch.returns); returns them whitened (or not)."""
    mask = batch.completion_mask.bool()
    token_rewards = token_level_rewards(batch.rewards, batch.old_logprobs, batch.ref_logprobs, mask, config.beta)
    advantages, batch.returns = adv.gae(token_rewards, batch.values, mask, gamma=config.gamma, lam=config.lam)
    return masked_whiten(advantages, mask) if config.whiten_advantages else advantages


def trust_region_update(policy, params, batch: RolloutBatch, old_vocab: list[torch.Tensor],
                        config: TrainConfig, workers: CPUWorkers | None = None,
                        replicas: Replicas | None = None) -> TRPOStepInfo:
    """One TRPO step of ``params`` in place; batch carries old_logprobs and advantages. With CPU workers (and
    ``replicas``: copies of the policy sharing its weights) the gradient, the Fisher-vector products and the
    line search's forward passes are split across them by micro-batch."""
    # With a critic the KL to π_ref is already in the token rewards; without one it goes in the surrogate.
    kl_coef = config.beta if config.trpo_advantages == "group" else 0.0
    problem = TrustRegionProblem(policy, params, batch.micro_batches(config.micro_batch_size), old_vocab,
                                 config.temperature, config.fisher_subsample, kl_coef, config.kl_estimator,
                                 workers=workers, replicas=replicas)
    split = {"gradient_fn": problem.surrogate_gradient, "fisher_fn": problem.fisher} if problem.parallel else {}
    # The fused CPU/GPU attention kernels have no double backward; the math kernel is plain autograd.
    with sdpa_kernel([SDPBackend.MATH]):
        return trpo_step(params, problem.surrogate, problem.kl, max_kl=config.max_kl, cg_iters=config.cg_iters,
                         damping=config.cg_damping, max_backtracks=config.max_backtracks, **split)


def fit_critic(policy, critic, critic_params, optimizer, batch: RolloutBatch, config: TrainConfig,
               generator: torch.Generator) -> dict[str, float]:
    """trpo_value_steps Adam steps on ½(V − R)² (clipped around V_old), one minibatch each."""
    metrics: dict[str, list[float]] = {}
    steps = config.trpo_value_steps
    if steps == 0:
        return {}
    order = torch.randperm(len(batch), generator=generator)
    size = -(-len(batch) // steps)
    for start in range(0, len(batch), size):
        minibatch = batch.select(order[start:start + size])
        tokens = max(1.0, minibatch.completion_mask.sum().item())
        optimizer.zero_grad(set_to_none=True)
        for micro in minibatch.micro_batches(config.micro_batch_size):
            if isinstance(critic, ValueHead):
                # The head reads the policy's features but must not move them: only the trust-region
                # step may change the policy, or its KL bound would not hold.
                with torch.no_grad():
                    hidden = completion_hidden(policy.base_model, micro.prompt_ids, micro.prompt_mask,
                                               micro.completion_ids, micro.completion_mask)
                values = critic(hidden)
            else:
                values = critic_values(policy, critic, micro)
            loss, value_metrics = value_loss(values, micro.values, micro.returns, micro.completion_mask.bool(),
                                             clip_range=config.cliprange_value, loss_agg_mode="token-mean")
            (loss * (micro.completion_mask.sum().item() / tokens)).backward()
            value_metrics["value_loss"] = loss.detach()
            for key, value in value_metrics.items():
                metrics.setdefault(key, []).append(float(value))
        grad_norm = torch.nn.utils.clip_grad_norm_(critic_params, config.max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        metrics.setdefault("critic_grad_norm", []).append(float(grad_norm))
    return {key: sum(vals) / len(vals) for key, vals in metrics.items()}


def train(config: TrainConfig, resume: bool = False) -> dict:
    if config.dtype != "float32":
        raise ConfigError(f"dtype={config.dtype!r}: TRPO differentiates the KL twice (Fisher-vector products), "
                          "which needs float32 logits. Fix: dtype=float32 (use lora_rank>0 for large models).")
    run = setup_lm_run(config, resume=resume)
    policy = run.model
    policy.train()

    # The critic exists only for GAE advantages; group advantages need no model beyond the policy (and π_ref).
    with_critic = config.trpo_advantages == "gae"
    critic = build_critic(policy, config.critic).to(run.device) if with_critic else None
    policy_params, critic_params = trainable_parameters(policy, critic, config)
    ref_model = reference_model(policy, config)
    ref_pages = offload_reference(ref_model, config, run.run_dir, run.device)  # weights in the page cache
    reward_set, scorer = training_reward_set(run, config)
    # Copies of the policy sharing its weights, one per CPU worker, for the split trust-region step.
    replicas = Replicas(policy, replica_count(policy, run.workers))

    # Only the critic has an optimizer: the policy moves by the natural-gradient step alone.
    optimizer = scheduler = None
    if with_critic:
        critic_lr = config.critic_learning_rate or config.learning_rate
        optimizer = make_optimizer([{"params": critic_params, "lr": critic_lr}], config)
        scheduler = make_scheduler(optimizer, config, total_steps=config.max_steps)
    modules = {"model": policy} | ({"critic": critic} if critic is not None else {}) \
        | ({"ref_model": ref_model} if ref_model is not None else {})
    held_models = {"policy": policy, "critic": critic, "reference": ref_model,
                   "reward_model": scorer.model if scorer else None}
    held = parameter_counts(held_models)

    state, _ = begin_training(run, modules, optimizer, scheduler, resume)
    start_step, data_cursor = state["step"], state["data_cursor"]

    sampling = sampling_params(config)
    bar = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
               desc=f"trpo {config.task}", unit="step", disable=not config.progress)
    for step in bar:
        step_start = time.perf_counter()
        release(ref_pages)  # a checkpoint's save or load read or wrote them

        # 1. Prompts → samples → scores.
        prompts, data_cursor = next_prompts(run, data_cursor)
        batch, timings = rollout_and_score(run.engine, prompts, sampling, reward_set,
                                           seed=rollout_seed(config, step))
        train_start = time.perf_counter()
        mask = batch.completion_mask.bool()

        # 2. π_old (tokens and whole vocabulary: the KL constraint is exact), V, π_ref.
        old_vocab = rollout_statistics(policy, critic, batch, config.micro_batch_size, config.temperature,
                                       workers=run.workers)
        if config.beta > 0:
            batch.ref_logprobs = reference_logprobs(policy, ref_model, batch, config, workers=run.workers)
            release(ref_pages)

        # 3. Advantages: from the group of G samples, or token rewards + GAE from the critic (as PPO).
        batch.advantages = group_advantages(batch, config) if not with_critic else gae_advantages(batch, config)

        # 4. The natural-gradient step with its line search, then the critic.
        info = trust_region_update(policy, policy_params, batch, old_vocab, config, run.workers, replicas)
        run.engine.sync_weights(policy)  # vLLM copies the updated weights; the in-process engine reads them live
        refresh_reference(ref_model, policy, config, step + 1)  # every ref_model_sync_steps (0 = never)
        critic_metrics = {}
        if with_critic:
            critic_metrics = fit_critic(policy, critic, critic_params, optimizer, batch, config,
                                        torch.Generator().manual_seed(config.seed * 7_919 + step))
            scheduler.step()

        # 5. Metrics, checkpoint.
        row = {"step": step + 1, **completion_metrics(batch), **timings, **critic_metrics}
        with torch.no_grad():
            if batch.ref_logprobs is not None:
                row["kl"] = float(aggregate(kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k1"), mask,
                                            "token-mean"))
            row["entropy"] = float(torch.stack([
                aggregate(entropy_from_logits(old), m.completion_mask.bool(), "token-mean")  # log-probs are logits
                for m, old in zip(batch.micro_batches(config.micro_batch_size), old_vocab)
            ]).mean())
        row.update({
            "trust_region/kl": info.kl,  # mean KL(π_old ‖ π_θ) measured after the step (≤ max_kl when accepted)
            "trust_region/accepted": float(info.accepted),
            "trust_region/backtracks": info.backtracks,
            "trust_region/step_fraction": info.step_fraction,
            "trust_region/surrogate_improvement": info.surrogate_after - info.surrogate_before,
            "trust_region/expected_improvement": info.expected_improvement,
            "grad_norm": info.grad_norm,
            "time/train": time.perf_counter() - train_start,
            "step_time": time.perf_counter() - step_start,
            "data_cursor": data_cursor,
        })
        if scheduler is not None:
            row["learning_rate"] = scheduler.get_last_lr()[0]  # the critic's
        run.logger.log(row)
        bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{info.kl:.4f}", bt=info.backtracks)
        if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < config.max_steps:
            save_training_state(run, step + 1, data_cursor, modules, optimizer, scheduler)
    bar.close()

    memory = model_state_bytes(held_models, optimizer)
    if start_step < config.max_steps:  # else a resume after the last checkpoint: it is already on disk
        save_training_state(run, config.max_steps, data_cursor, modules, optimizer, scheduler)
        release(ref_pages)
    if config.eval_at_end:
        print(describe_eval("after", run_evaluation(run, "after")), flush=True)
    if config.lora_rank > 0:
        merge_lora(policy)  # final/ is a plain HF model with the adapters folded in
    return finish_run(run, extra={"models": held, "model_state_bytes": memory})
