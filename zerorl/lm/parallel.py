"""Data parallelism across a CPU's cores inside one process: W workers, one intra-op thread each.

torch parallelizes each op across its intra-op threads. A GRPO step on a small model is thousands of
small ops (a [450 × 512] by [512 × 2048] matrix product, a norm, a rotary embedding), and splitting each
of them across cores pays a wake-up and a join per op while the element-wise ops barely scale. Splitting
the *work* instead — micro-batches of the reference and training passes, prompt shards of the rollout —
gives each core whole passes of the model on one thread (measured on 2 cores, benchmarks/RESULTS.md:
the 31.5M model's training phase 2.48 → 1.88 s, the 1.0M model's 0.27 → 0.12 s).

The weights are shared, not copied: the workers are threads of this process, and torch releases the
GIL while an op runs. What a worker needs of the caller's thread-local state (grad mode, autocast) is
carried over explicitly.

Same math: a reference or π_old pass gives each micro-batch exactly the numbers a one-thread serial pass
gives it. The training gradient is the same sum, in a different order: each worker accumulates its
micro-batches, and the workers' sums are added in a fixed order — deterministic for a given number of
workers, different in the last bits from another number of workers. A rollout split into shards samples
each shard from its own random stream, so another number of workers samples other completions (same
distribution). Runs therefore repeat exactly, and resume exactly, for a given number of workers; the trainers
record it in their checkpoints and warn when a resumed run has another.

Memory: each extra worker that trains holds one more gradient accumulator, so ``training_replicas`` caps
their number at what ``REPLICA_GRADIENT_BUDGET`` bytes of extra gradients allow (a 31.5M-parameter model:
all workers; 0.5B: none — its matrix products are big enough for the intra-op threads anyway).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class CPUWorkers:
    """A pool of ``num_workers`` single-threaded workers (``num_workers`` ≤ 1: everything runs inline)."""

    def __init__(self, num_workers: int):
        self.num_workers = max(1, int(num_workers))
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="zerorl-cpu") \
            if self.num_workers > 1 else None
        # Idle threads go away with this object even when a run fails before calling shutdown().
        self._finalizer = weakref.finalize(self, self._pool.shutdown, False) if self._pool is not None else None

    @property
    def parallel(self) -> bool:
        return self._pool is not None

    def run(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Run the tasks, up to ``num_workers`` at once, each on one intra-op thread; results in order.

        Tasks run under the caller's grad mode and autocast. Inline when there is one task or one worker.
        """
        if self._pool is None or len(tasks) <= 1:
            return [task() for task in tasks]
        threads = torch.get_num_threads()
        grad_enabled = torch.is_grad_enabled()
        inference = torch.is_inference_mode_enabled()
        autocast_on = torch.is_autocast_enabled("cpu")
        autocast_dtype = torch.get_autocast_dtype("cpu")

        def in_worker(task: Callable[[], T]) -> T:
            # This thread's OpenMP and MKL counts; it also sets torch's default for threads started later,
            # which is process-wide, hence the restore below.
            torch.set_num_threads(1)
            autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_on else contextlib.nullcontext()
            with torch.inference_mode(inference), torch.set_grad_enabled(grad_enabled), autocast:
                return task()

        futures = [self._pool.submit(in_worker, task) for task in tasks]
        # Every task finishes (or fails) before this returns or raises: none may still be writing into shared
        # buffers or gradients, or resetting the thread count, once the caller moves on.
        concurrent.futures.wait(futures)
        torch.set_num_threads(threads)
        return [future.result() for future in futures]  # raises the first task's error, if any

    def shutdown(self) -> None:
        if self._pool is not None:
            self._finalizer.detach()
            self._pool.shutdown(wait=True)
            self._pool = None


class Replicas:
    """The model and ``count − 1`` copies of it whose parameters share its storage but are leaves of their own.

    A backward pass through copy k accumulates into copy k's ``.grad`` — in place, one parameter at a time, as
    ``loss.backward()`` does — so workers accumulate concurrently without racing on ``.grad`` and without a
    second full gradient per micro-batch in flight. Optimizer steps and ``load_state_dict`` write the
    shared storage in place, so the copies never go stale. Buffers (e.g. rotary frequencies) are copied.
    """

    def __init__(self, model: torch.nn.Module, count: int):
        self.models = [model]
        for _ in range(count - 1):
            memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
            self.models.append(copy.deepcopy(model, memo))

    def __len__(self) -> int:
        return len(self.models)

    def discard_gradients(self) -> None:
        """Drop the copies' gradients (the model's own are the caller's)."""
        for other in self.models[1:]:
            for twin in other.parameters():
                twin.grad = None

    def reduce_gradients(self) -> None:
        """model.grad += copy_k.grad for k = 1, 2, ... (this order always); the copies' gradients are freed."""
        main = list(self.models[0].parameters())
        for other in self.models[1:]:
            for param, twin in zip(main, other.parameters()):
                if twin.grad is None:
                    continue
                param.grad = twin.grad if param.grad is None else param.grad.add_(twin.grad)
                twin.grad = None


def accumulate_gradients(workers: CPUWorkers | None, replicas: Replicas, micro_batches: Sequence,
                         loss_fn: Callable[[int, object], tuple[torch.Tensor, T]], costs: Sequence[float]) -> list[T]:
    """Accumulate ∇ Σ_m loss_fn(r, m) over the micro-batches into the model's ``.grad``; return the second
    output of ``loss_fn`` per micro-batch, in order. ``loss_fn(r, micro)`` computes through replica r.

    Serial (one worker, one replica or one micro-batch): ``loss.backward()`` per micro-batch on replica 0, the
    plain loop. Parallel: the micro-batches are split into shards of near-equal ``costs`` (e.g. tokens), shard
    k runs on replica k, and the replicas' sums are added into the model's ``.grad`` in replica order — the
    result does not depend on which worker finishes first.
    """
    parallel = workers is not None and workers.parallel and len(replicas) > 1 and len(micro_batches) > 1
    shards = balanced_shards(costs, min(len(replicas), workers.num_workers)) if parallel \
        else [list(range(len(micro_batches)))]

    def run_shard(replica: int, shard: list[int]) -> list[tuple[int, T]]:
        extras = []
        for index in shard:
            loss, extra = loss_fn(replica, micro_batches[index])
            loss.backward()
            extras.append((index, extra))
        return extras

    if not parallel:
        return [extra for _, extra in run_shard(0, shards[0])]
    try:
        results = workers.run([functools.partial(run_shard, replica, shard)
                               for replica, shard in enumerate(shards)])
    except BaseException:
        replicas.discard_gradients()  # a half-accumulated sum must not reach a later step
        raise
    replicas.reduce_gradients()
    by_index = dict(pair for extras in results for pair in extras)
    return [by_index[i] for i in range(len(micro_batches))]


def balanced_shards(costs: Sequence[float], num_shards: int) -> list[list[int]]:
    """Split items 0..n−1 into ``num_shards`` lists of near-equal total cost (largest first onto the least
    loaded shard). Deterministic; each shard keeps its items in increasing order."""
    shards: list[list[int]] = [[] for _ in range(max(1, num_shards))]
    loads = [0.0] * len(shards)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        # Ties (e.g. zero costs) go to the shard with fewer items, so equal work still spreads out.
        target = min(range(len(shards)), key=lambda s: (loads[s], len(shards[s]), s))
        shards[target].append(item)
        loads[target] += costs[item]
    return [sorted(shard) for shard in shards if shard]


# At most this many bytes of extra gradient accumulators (one per training worker beyond the first).
REPLICA_GRADIENT_BUDGET = 1 << 30


def training_replicas(model: torch.nn.Module, num_workers: int) -> int:
    """How many of ``num_workers`` workers train at once: 1 + as many extra gradient copies as fit the budget."""
    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    extra = REPLICA_GRADIENT_BUDGET // max(1, gradient_bytes)
    return max(1, min(num_workers, 1 + extra))


def thread_safe_forward(model: torch.nn.Module) -> bool:
    """Whether several threads may run ``model``'s forward at once: zerorl's native family with a RoPE whose
    frequencies never change (dynamic and long-rope variants rewrite them inside the forward) and no dropout."""
    from zerorl.lm.native import unsupported_reason

    if unsupported_reason(model) is not None:
        return False
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    dropout = any(getattr(config, key, 0.0) for key in ("attention_dropout", "hidden_dropout", "dropout"))
    return rope_type in ("default", "linear", "llama3") and not dropout


def run_tasks(workers: CPUWorkers | None, tasks: Sequence[Callable[[], T]], forward_of: torch.nn.Module) -> list[T]:
    """Run ``tasks`` (passes of ``forward_of``) on ``workers`` when its forward is thread-safe, else one
    after another on this thread. Results in order."""
    if workers is not None and thread_safe_forward(forward_of):
        return workers.run(tasks)
    return [task() for task in tasks]


def replica_count(model: torch.nn.Module, workers: CPUWorkers | None,
                  forward_of: torch.nn.Module | None = None) -> int:
    """The replicas a trainer builds for ``model``: one per training worker when the forward (of
    ``forward_of``, default ``model``) is thread-safe, else 1 (micro-batches in series)."""
    if workers is None or not workers.parallel or not thread_safe_forward(forward_of or model):
        return 1
    return training_replicas(model, workers.num_workers)


def default_num_workers(requested: int, device: torch.device) -> int:
    """``cpu_workers`` resolved: 0 = one per intra-op thread on a CPU; never more than one on an accelerator."""
    if device.type != "cpu":
        return 1
    return requested if requested > 0 else torch.get_num_threads()


__all__ = ["REPLICA_GRADIENT_BUDGET", "CPUWorkers", "Replicas", "accumulate_gradients", "balanced_shards",
           "default_num_workers", "replica_count", "run_tasks", "thread_safe_forward", "training_replicas"]
