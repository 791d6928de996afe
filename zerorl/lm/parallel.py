"""Data parallelism across a CPU's cores inside one process: W workers, one intra-op thread each.

torch parallelizes each op across its intra-op threads. A GRPO step on a small model is thousands of
small ops (a [450 × 512] by [512 × 2048] matrix product, a norm, a rotary embedding), and splitting each
of them across cores pays a wake-up and a join per op while the element-wise ops barely scale. Splitting
the *work* instead — micro-batches of the reference and training passes, prompt shards of the rollout —
gives each core whole passes of the model on one thread (measured on 2 cores, benchmarks/RESULTS.md:
the 31.5M model's training phase 2.48 → 1.88 s, the 1.0M model's 0.27 → 0.12 s). A decode step is the
exception once it is big: its few matrix products carry nearly all the work, and split over the threads
each streams only its share of every weight, where every shard streams all of them (``rollout.decode_on_threads``).

The weights are shared, not copied: the workers are threads of this process, and torch releases the
GIL while an op runs. What a worker needs of the caller's thread-local state (grad mode, autocast) is
carried over explicitly.

Same math: a reference or π_old pass gives each micro-batch exactly the numbers a one-thread serial pass
gives it, and the training gradient is the serial sum bit for bit: each worker's gradient of a micro-batch
is handed over parameter by parameter as autograd completes it, and added into the model's ``.grad`` in
micro-batch order (``OrderedGradientSum``), whichever worker finishes first. A rollout split into shards
draws what one batch draws: each prompt samples from its own random stream (``rollout.sampling_uniforms``).
Runs repeat exactly, and resume exactly, for a given number of workers. Another number rounds differently
(a shard pads its prompts to its own width; one worker splits each op over the threads), so the trainers
record the count in their checkpoints and warn when a resumed run has another.

Memory: no worker keeps a gradient accumulator of its own. What a worker adds is its micro-batch's
activations, and the gradients that wait for their turn in the sum (at most ``PENDING_GRADIENT_BUDGET`` in
all). Few wait: the sum runs over the micro-batches from the cheapest up, so of two that run side by side
the one whose turn comes first is the one that finishes first (31.5M model on 2 workers: the training
phase's live heap 1,055 → 949 MB against index order). ``training_replicas`` caps the training workers of
big models.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import os
import threading
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
            # which is process-wide, hence the restore below. One thread even where cores idle (fewer tasks than
            # workers): a worker on more keeps an OpenMP team of its own, and once libgomp manages more threads
            # than CPUs it stops spinning in every team — measured here after two workers ran on two threads
            # each: the caller's two-thread ops 2.4× slower from then on, the 31.5M rollout 0.72 → 1.07 s.
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
    """The model and, for parallel training, ``count`` copies of it (one per worker) whose parameters share the
    model's storage but are leaves of their own.

    A backward pass through a copy hands each parameter's gradient, as soon as it is complete, to an
    ``OrderedGradientSum`` that adds it into the model's ``.grad`` in a fixed micro-batch order — the order
    the serial loop of ``accumulate_gradients`` uses. So no worker holds a gradient accumulator of its own, and
    the sum is bit for bit the serial one. Optimizer steps and ``load_state_dict`` write the shared storage in
    place, so the copies never go stale. Buffers (e.g. rotary frequencies) are copied.

    ``models[0]`` is the model (what the serial path trains); ``models[1:]`` are the workers' copies.
    """

    def __init__(self, model: torch.nn.Module, count: int):
        self.models = [model]
        self._sum: OrderedGradientSum | None = None  # the accumulation in progress, if any
        if count <= 1:
            return
        trained = [(index, p) for index, p in enumerate(model.parameters()) if p.requires_grad]
        for _ in range(count):
            memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
            twin = copy.deepcopy(model, memo)
            twin_params = list(twin.parameters())
            for slot, (index, _) in enumerate(trained):
                twin_params[index].register_post_accumulate_grad_hook(functools.partial(self._hand_over, slot))
            self.models.append(twin)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def num_workers(self) -> int:
        """How many workers train through these replicas at once (1: the serial path)."""
        return max(1, len(self.models) - 1)

    def _hand_over(self, slot: int, twin: torch.Tensor) -> None:
        """Post-accumulate hook of a copy's parameter: its gradient for this micro-batch is complete."""
        gradient_sum = self._sum
        if gradient_sum is None:  # a backward through a copy outside accumulate_gradients: plain .grad
            return
        gradient, twin.grad = twin.grad, None
        gradient_sum.deliver(slot, gradient)

    def discard_gradients(self) -> None:
        """Drop the copies' gradients (the model's own are the caller's)."""
        for other in self.models[1:]:
            for twin in other.parameters():
                twin.grad = None


# At most this many bytes of gradients may wait for their turn (a micro-batch that finished before an
# earlier one); beyond it a worker waits instead. Every parameter's gradient is complete long before it is
# added, so in practice little waits: the workers run their micro-batches in the order of the sum.
PENDING_GRADIENT_BUDGET = 256 << 20

_NOTHING = object()


class OrderedGradientSum:
    """Σ_t g_t(θ) into each parameter's ``.grad``, added in increasing turn t (the caller's order of the
    micro-batches) whatever order the workers finish in: bit for bit what ``loss.backward()`` per micro-batch
    gives in series in that order (the first term is taken as is, the others added in place, as autograd
    accumulates).

    A gradient whose turn has not come waits in ``pending`` (within ``PENDING_GRADIENT_BUDGET``, else its
    worker waits). There is no deadlock: each worker runs its micro-batches in increasing turn, so the
    earliest turn in flight always finds every earlier term already there. A parameter a
    micro-batch does not reach gets an empty term (``skip_missing``), so later turns never wait for it.
    """

    def __init__(self, parameters: Sequence[torch.Tensor], budget: int = PENDING_GRADIENT_BUDGET):
        self.parameters = list(parameters)
        self.budget = budget
        self.next_turn = [0] * len(self.parameters)
        self.pending: list[dict[int, torch.Tensor | None]] = [{} for _ in self.parameters]
        self.adding = [False] * len(self.parameters)
        self.pending_bytes = 0
        self.aborted = False
        self.condition = threading.Condition()
        self.local = threading.local()  # this worker's micro-batch index and the parameters it reached

    def begin(self, turn: int) -> None:
        self.local.turn, self.local.reached = turn, set()

    def deliver(self, slot: int, gradient: torch.Tensor | None) -> None:
        turn = self.local.turn
        self.local.reached.add(slot)
        size = 0 if gradient is None else gradient.numel() * gradient.element_size()
        with self.condition:
            while True:
                if self.aborted:
                    return
                if turn == self.next_turn[slot] and not self.adding[slot]:
                    self.adding[slot] = True
                    break
                if turn != self.next_turn[slot] and self.pending_bytes + size <= self.budget:
                    self.pending[slot][turn] = gradient
                    self.pending_bytes += size
                    return
                self.condition.wait()
        # This term's turn: add it, then every consecutive term that was waiting. The add runs outside the
        # lock (other parameters go on meanwhile); ``adding`` keeps this parameter's terms in order.
        while True:
            self._add(slot, gradient)
            with self.condition:
                self.next_turn[slot] += 1
                gradient = self.pending[slot].pop(self.next_turn[slot], _NOTHING)
                if gradient is _NOTHING:
                    self.adding[slot] = False
                    self.condition.notify_all()
                    return
                if gradient is not None:
                    self.pending_bytes -= gradient.numel() * gradient.element_size()
                self.condition.notify_all()

    def _add(self, slot: int, gradient: torch.Tensor | None) -> None:
        if gradient is None:
            return
        param = self.parameters[slot]
        if param.grad is None:
            param.grad = gradient
        else:
            param.grad.add_(gradient)

    def skip_missing(self) -> None:
        """After a micro-batch's backward: an empty term for each parameter it did not reach."""
        for slot in range(len(self.parameters)):
            if slot not in self.local.reached:
                self.deliver(slot, None)

    def abort(self) -> None:
        """A worker failed: from now on terms are dropped and nobody waits (the caller clears the sum)."""
        with self.condition:
            self.aborted = True
            self.condition.notify_all()


def _backward(loss: torch.Tensor) -> None:
    """``loss.backward()`` with autocast off. A caller may keep one autocast region open over its micro-batches
    (so that they share autocast's weight casts), but backward passes belong outside autocast: inside it, the
    matrix products of a custom autograd Function's backward would run in the low precision. A disabled
    region inside the caller's does not end it, so the cached casts survive for the next micro-batch."""
    with torch.autocast(loss.device.type, enabled=False):
        loss.backward()


def accumulate_gradients(workers: CPUWorkers | None, replicas: Replicas, micro_batches: Sequence,
                         loss_fn: Callable[[int, object], tuple[torch.Tensor, T]], costs: Sequence[float]) -> list[T]:
    """Accumulate ∇ Σ_m loss_fn(r, m) over the micro-batches into the model's ``.grad``; return the second
    output of ``loss_fn`` per micro-batch, in order. ``loss_fn(r, micro)`` computes through ``replicas.models[r]``.

    The terms are summed in increasing ``costs`` (e.g. tokens; ties by index), serial or parallel alike.
    Serial (one worker, one replica or one micro-batch): ``loss.backward()`` per micro-batch on the model, in
    that order. Parallel: worker k runs every W-th micro-batch of that order on copy k + 1, and an
    ``OrderedGradientSum`` adds each parameter's terms in that order — the serial sum, bit for bit, whichever
    worker finishes first. The order is why few terms wait: the micro-batches that run side by side start
    together, and the one whose turn comes first is the cheaper, so it is done first. If a micro-batch
    fails, the model's gradients are cleared (they would be a partial sum) and the error is raised once the
    other workers have stopped.
    """
    order = sorted(range(len(micro_batches)), key=lambda i: (costs[i], i))
    parallel = workers is not None and workers.parallel and len(replicas) > 1 and len(micro_batches) > 1
    if not parallel:
        extras: dict[int, T] = {}
        for index in order:
            loss, extras[index] = loss_fn(0, micro_batches[index])
            _backward(loss)
        return [extras[i] for i in range(len(micro_batches))]

    model = replicas.models[0]
    trained = [p for p in model.parameters() if p.requires_grad]
    gradient_sum = OrderedGradientSum(trained)
    count = min(replicas.num_workers, workers.num_workers)
    turns = [list(range(k, len(order), count)) for k in range(count)]  # worker k: turns k, k + W, ...

    def run_shard(replica: int, shard_turns: list[int]) -> list[tuple[int, T]]:
        extras = []
        try:
            for turn in shard_turns:
                index = order[turn]
                loss, extra = loss_fn(replica, micro_batches[index])
                gradient_sum.begin(turn)
                _backward(loss)
                gradient_sum.skip_missing()
                extras.append((index, extra))
        except BaseException:
            gradient_sum.abort()  # the others must not wait for a term that will never come
            raise
        return extras

    replicas._sum = gradient_sum
    try:
        results = workers.run([functools.partial(run_shard, replica + 1, shard_turns)
                               for replica, shard_turns in enumerate(turns) if shard_turns])
    except BaseException:
        replicas.discard_gradients()
        for param in trained:  # a partial sum must not reach an optimizer step
            param.grad = None
        raise
    finally:
        replicas._sum = None
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


# Workers that train at once are capped so that their extra memory — per worker about one gradient's size
# (its micro-batch's activations, the terms that wait for their turn) — stays within this many bytes: all
# workers for a 31.5M-parameter model, none beyond the first for 0.5B, whose matrix products are big enough
# for the intra-op threads anyway.
REPLICA_GRADIENT_BUDGET = 1 << 30


def training_replicas(model: torch.nn.Module, num_workers: int) -> int:
    """How many of ``num_workers`` workers train at once (see ``REPLICA_GRADIENT_BUDGET``)."""
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


def openmp_waits_passively() -> bool:
    """Whether OpenMP's idle threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``), so that every op split over the
    intra-op threads pays for waking them: work is then better split over single-threaded workers."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def default_num_workers(requested: int, device: torch.device) -> int:
    """``cpu_workers`` resolved: 0 = one per intra-op thread on a CPU; never more than one on an accelerator."""
    if device.type != "cpu":
        return 1
    return requested if requested > 0 else torch.get_num_threads()


__all__ = ["PENDING_GRADIENT_BUDGET", "REPLICA_GRADIENT_BUDGET", "CPUWorkers", "OrderedGradientSum", "Replicas",
           "accumulate_gradients", "balanced_shards", "default_num_workers", "openmp_waits_passively", "replica_count", "run_tasks",
           "thread_safe_forward", "training_replicas"]
