"""zerorl.lm.parallel: single-threaded CPU workers give the same numbers as the serial passes — bit for bit
where each micro-batch is computed alone (reference pass, decoding), to float rounding where gradients are
summed in another order, and the same on every run."""

from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
from safetensors.torch import load_file

import zerorl.lm.rollout as rollout_module
from zerorl.config import TrainConfig
from zerorl.lm import grpo, ppo
from zerorl.lm.batch import RolloutBatch
from zerorl.lm.forward import batched_logprobs, completion_logprobs
from zerorl.lm.grpo import grpo_loss
from zerorl.lm.models import load_model_and_tokenizer
from zerorl.lm.native import NativeDecoder
from zerorl.lm.parallel import CPUWorkers, Replicas, accumulate_gradients, balanced_shards
from zerorl.lm.rollout import HFRolloutEngine, SamplingParams


@pytest.fixture
def one_thread():
    """Serial references are computed on one thread, as each worker computes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_and_tokenizer(random_tiny_model):
    return load_model_and_tokenizer(str(random_tiny_model))


def _batch(model, tokenizer, rows_per_prompt: int = 4, seed: int = 0) -> RolloutBatch:
    engine = HFRolloutEngine(model, tokenizer)
    out = engine.generate(["12+3=", "7*8=", "100-1=", "5="], SamplingParams(n=rows_per_prompt, max_new_tokens=10),
                          seed=seed)
    batch = RolloutBatch(prompt_ids=out.prompt_ids, prompt_mask=out.prompt_mask, completion_ids=out.completion_ids,
                         completion_mask=out.completion_mask, sampling_logprobs=out.sampling_logprobs,
                         prompt_index=out.prompt_index)
    batch.advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(seed))
    batch.ref_logprobs = out.sampling_logprobs.clone()
    return batch


def test_balanced_shards_by_hand():
    # Largest first onto the least-loaded shard: 5→A, 4→B, 3→B (4 < 5), 2→A (5 < 7), 1→A (7 = 7: first shard).
    assert balanced_shards([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    assert balanced_shards([1.0], 3) == [[0]]  # never an empty shard


def test_workers_carry_grad_mode_autocast_inference_and_restore_the_thread_count():
    workers = CPUWorkers(2)
    barrier = threading.Barrier(2, timeout=10)

    def probe():
        barrier.wait()  # both tasks are in flight at once: two workers really run
        return (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.is_inference_mode_enabled(),
                torch.get_num_threads(), threading.current_thread().name)

    before = torch.get_num_threads()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seen = workers.run([probe, probe])
    with torch.inference_mode():
        inference = workers.run([probe, probe])
    workers.shutdown()
    assert [s[:4] for s in seen] == [(False, True, False, 1)] * 2
    assert all(s[2] for s in inference)
    assert len({s[4] for s in seen}) == 2 and all(s[4].startswith("zerorl-cpu") for s in seen)
    # A worker's set_num_threads(1) also sets torch's default for threads started later: it must be undone.
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert fresh == [before] and torch.get_num_threads() == before


def test_a_failing_task_lets_the_others_finish_and_leaves_no_half_summed_gradient(model_and_tokenizer):
    model, _ = model_and_tokenizer
    workers, replicas = CPUWorkers(2), Replicas(model, 2)
    finished = []

    def loss_fn(replica, index):
        if index == 0:
            raise RuntimeError("reward function exploded")
        loss = sum(p.sum() for p in replicas.models[replica].parameters())
        finished.append(index)
        return loss, None

    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="exploded"):
        accumulate_gradients(workers, replicas, [0, 1, 2, 3], loss_fn, costs=[1.0, 1.0, 1.0, 1.0])
    workers.shutdown()
    # Shards by cost: {0, 2} and {1, 3}. The first stops at micro-batch 0; the other runs to its end (its
    # terms, which would wait forever for micro-batch 0, are dropped instead).
    assert sorted(finished) == [1, 3]
    for replica in replicas.models:  # no partial sum is carried into an optimizer step
        assert all(p.grad is None for p in replica.parameters())


def test_big_models_train_on_fewer_workers_and_unsafe_forwards_stay_serial(model_and_tokenizer, monkeypatch):
    import zerorl.lm.parallel as parallel

    model, _ = model_and_tokenizer
    gradient_bytes = sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(parallel, "REPLICA_GRADIENT_BUDGET", 2 * gradient_bytes)
    assert parallel.training_replicas(model, 8) == 3  # 1 + 2 workers' extra memory fits
    monkeypatch.setattr(parallel, "REPLICA_GRADIENT_BUDGET", gradient_bytes - 1)
    assert parallel.training_replicas(model, 8) == 1
    assert parallel.thread_safe_forward(model)
    dynamic = copy.deepcopy(model)
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    assert not parallel.thread_safe_forward(dynamic)  # its forward rewrites the RoPE frequencies
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=2))
    assert not parallel.thread_safe_forward(gpt2)  # outside the native family (and it has dropout)
    monkeypatch.setattr(parallel, "REPLICA_GRADIENT_BUDGET", 1 << 30)
    workers = CPUWorkers(2)
    assert parallel.replica_count(dynamic, workers) == 1 and parallel.replica_count(model, workers) == 2
    workers.shutdown()


def test_parallel_reference_pass_equals_the_serial_pass_bit_for_bit(model_and_tokenizer, one_thread):
    model, tokenizer = model_and_tokenizer
    batch = _batch(model, tokenizer)
    native = NativeDecoder(model)
    serial = batched_logprobs(model, batch, micro_batch_size=4, temperature=0.7, native=native)
    workers = CPUWorkers(2)
    parallel = batched_logprobs(model, batch, micro_batch_size=4, temperature=0.7, native=native, workers=workers)
    workers.shutdown()
    assert torch.equal(parallel, serial)
    assert serial[batch.completion_mask.bool()].abs().min() > 0  # real numbers, not an untouched buffer


def _gradients(model, batch, workers, replicas, config, bf16=None):
    """bf16: None (float32), "per micro-batch" (an autocast region around each micro-batch's forward), or
    "around all" (also one around the whole accumulation, as the trainer does: each worker's casts of the
    weights are cached and shared by its micro-batches)."""
    model.zero_grad(set_to_none=True)
    micro_batches = list(batch.micro_batches(4))
    natives = [NativeDecoder(m) for m in replicas.models]

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def loss_fn(replica, micro):
        with autocast():
            loss, metrics = grpo_loss(replicas.models[replica], micro, config, on_policy=True,
                                      native=natives[replica])
        return loss * len(micro) / len(batch), float(loss.detach())

    with autocast() if bf16 == "around all" else contextlib.nullcontext():
        losses = accumulate_gradients(workers, replicas, micro_batches, loss_fn,
                                      costs=[float(m.completion_mask.sum()) for m in micro_batches])
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("num_workers", [1, 2])
def test_backward_passes_run_outside_the_caller_s_autocast_region(num_workers, one_thread):
    """Inside autocast a custom Function's backward would compute its products in bf16."""
    backward_dtypes = []

    class TimesWeight(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.save_for_backward(x, weight)
            return x @ weight

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            grad_weight = x.t() @ grad
            backward_dtypes.append(grad_weight.dtype)
            return None, grad_weight

    model = torch.nn.Linear(4, 4, bias=False)
    inputs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def loss_fn(replica, x):
        with torch.autocast("cpu", enabled=False):  # a float32 product, as native attention computes under bf16
            return TimesWeight.apply(x, replicas.models[replica].weight).sum(), None

    workers, replicas = CPUWorkers(num_workers), Replicas(model, num_workers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        accumulate_gradients(workers, replicas, inputs, loss_fn, costs=[1.0] * 4)
    workers.shutdown()
    assert backward_dtypes == [torch.float32] * 4
    assert torch.allclose(model.weight.grad, sum(x.t() @ torch.ones(3, 4) for x in inputs))


@pytest.mark.parametrize("num_workers", [1, 2])
def test_bf16_weight_casts_shared_by_micro_batches_give_the_same_gradient(model_and_tokenizer, one_thread,
                                                                         num_workers):
    """One autocast region around the accumulation: a worker casts each weight once and its micro-batches'
    backward passes all go through that cast. The gradient is the same, bit for bit."""
    model, tokenizer = model_and_tokenizer
    batch = _batch(model, tokenizer)
    config = TrainConfig(beta=0.04, max_completion_length=10)
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}
    casts = []

    class CountWeightCasts(TorchDispatchMode):  # sees the calling thread's ops: the serial path's
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in weights:
                casts[-1] += 1
            return func(*args, **(kwargs or {}))

    workers, replicas = CPUWorkers(num_workers), Replicas(model, num_workers)
    casts.append(0)
    with CountWeightCasts():
        each_losses, each = _gradients(model, batch, workers, replicas, config, bf16="per micro-batch")
    casts.append(0)
    with CountWeightCasts():
        shared_losses, shared = _gradients(model, batch, workers, replicas, config, bf16="around all")
    _, float32 = _gradients(model, batch, workers, replicas, config)
    workers.shutdown()
    if num_workers == 1:  # every micro-batch cast the weights again; shared, once
        assert casts[0] == len(list(batch.micro_batches(4))) * casts[1] > 0
    assert shared_losses == each_losses
    for name, grad in each.items():
        assert torch.equal(shared[name], grad), name
    assert any(not torch.equal(float32[name], grad) for name, grad in each.items())  # bf16 really ran


def test_parallel_gradients_are_the_serial_sum_bit_for_bit(model_and_tokenizer, one_thread):
    model, tokenizer = model_and_tokenizer
    batch = _batch(model, tokenizer)
    config = TrainConfig(beta=0.04, max_completion_length=10)
    serial_losses, serial = _gradients(model, batch, None, Replicas(model, 1), config)

    workers, replicas = CPUWorkers(2), Replicas(model, 2)
    losses, first = _gradients(model, batch, workers, replicas, config)
    _, second = _gradients(model, batch, workers, replicas, config)
    workers.shutdown()

    assert losses == serial_losses  # each micro-batch's loss is computed alone: identical
    for name, grad in serial.items():
        # The terms are added in micro-batch order whichever worker finished first: the serial sum exactly.
        assert torch.equal(first[name], grad), name
        assert torch.equal(second[name], grad), name
    for replica in replicas.models[1:]:  # the copies handed every gradient over
        assert all(p.grad is None for p in replica.parameters())


def test_replicas_share_the_weights_but_not_the_gradients(model_and_tokenizer):
    model, _ = model_and_tokenizer
    replicas = Replicas(model, 2)
    original, twin = next(model.parameters()), next(replicas.models[1].parameters())
    assert twin is not original and twin.data_ptr() == original.data_ptr()
    before = original.detach().clone()
    with torch.no_grad():
        original.add_(1.0)  # an optimizer step writes in place: the copy sees it
    assert torch.equal(twin, before + 1.0)
    with torch.no_grad():
        original.sub_(1.0)


def test_small_passes_drop_to_one_thread_only_when_openmp_waits_passively(monkeypatch):
    from zerorl.lm.native import SMALL_WORK_FLOPS_PER_LAYER, threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for policy, work, expected in ((None, 1.0, 2), ("PASSIVE", 1.0, 1), ("PASSIVE", SMALL_WORK_FLOPS_PER_LAYER, 2),
                                       ("ACTIVE", 1.0, 2)):
            if policy is None:
                monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
            else:
                monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            with threads_for(work):
                assert torch.get_num_threads() == expected, (policy, work)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_each_worker_runs_on_one_thread_even_where_cores_idle():
    """Two tasks on four workers with four threads: each task still gets one thread. A worker on more keeps an OpenMP
    team of its own, and once libgomp manages more threads than CPUs it stops spinning in every team (measured:
    the caller's split ops 2.4× slower from then on), so idle cores are the cheaper loss."""
    workers = CPUWorkers(4)
    seen = []
    lock = threading.Lock()
    barrier = threading.Barrier(2)

    def task():
        barrier.wait()  # both at once: each on its own worker
        with lock:
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        workers.run([task, task])
        assert torch.get_num_threads() == 4  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
        workers.shutdown()
    assert seen == [1, 1]


def test_a_big_decode_runs_on_the_intra_op_threads_unless_openmp_waits_passively(model_and_tokenizer, monkeypatch):
    """From THREADED_DECODE_FLOPS_PER_LAYER up, the rollout decodes one batch on all the intra-op threads instead
    of one shard per worker — except under OMP_WAIT_POLICY=PASSIVE, or on one thread — and both draw the same
    completions (each prompt samples from its own stream)."""
    model, tokenizer = model_and_tokenizer
    prompts, params = ["12+3=", "7*8=", "100-1=", "5="], SamplingParams(n=3, max_new_tokens=10, temperature=1.0)
    work = rollout_module.layer_flops(model, len(prompts) * params.n)
    monkeypatch.setattr(rollout_module, "SMALL_WORK_FLOPS_PER_LAYER", 0)  # shards pay when they are chosen
    sharded = []
    original_run = CPUWorkers.run
    monkeypatch.setattr(CPUWorkers, "run", lambda self, tasks: sharded.append(len(tasks)) or original_run(self, tasks))
    workers = CPUWorkers(2)
    engine = HFRolloutEngine(model, tokenizer, workers=workers)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = {}
        for label, threshold, policy in (("threads", work, None), ("shards: small", work + 1, None),
                                          ("shards: passive", work, "passive")):
            monkeypatch.setattr(rollout_module, "THREADED_DECODE_FLOPS_PER_LAYER", threshold)
            if policy is None:
                monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
            else:
                monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            sharded.clear()
            outs[label] = engine.generate(prompts, params, seed=5)
            assert sharded == ([] if label == "threads" else [2]), label
            assert torch.get_num_threads() == 2  # the workers gave the caller its threads back
        torch.set_num_threads(1)
        monkeypatch.setattr(rollout_module, "THREADED_DECODE_FLOPS_PER_LAYER", 0)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        sharded.clear()
        outs["one thread"] = engine.generate(prompts, params, seed=5)
        assert sharded == [2]  # one thread to split ops over: the workers decode shards
    finally:
        torch.set_num_threads(before)
        workers.shutdown()
    for label, out in outs.items():
        assert torch.equal(out.completion_ids, outs["threads"].completion_ids), label
        assert torch.allclose(out.sampling_logprobs, outs["threads"].sampling_logprobs, atol=1e-5), label


def test_sharded_decoding_samples_what_one_batch_samples(model_and_tokenizer, monkeypatch, one_thread):
    """Each prompt draws from its own stream, so shards over two workers, one whole batch, and batches that
    split a prompt's samples all sample the same completions (log-probs to float rounding: each batch pads
    its prompts to its own width)."""
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(rollout_module, "SMALL_WORK_FLOPS_PER_LAYER", 0)
    prompts, params = ["12+3=", "7*8=", "100-1=", "5="], SamplingParams(n=3, max_new_tokens=12, temperature=1.0)
    workers = CPUWorkers(2)
    sharded = []
    original_run = CPUWorkers.run
    monkeypatch.setattr(CPUWorkers, "run", lambda self, tasks: sharded.append(len(tasks)) or original_run(self, tasks))
    engine = HFRolloutEngine(model, tokenizer, workers=workers)
    out = engine.generate(prompts, params, seed=11)
    again = engine.generate(prompts, params, seed=11)
    workers.shutdown()
    assert sharded == [2, 2]  # two shards of two prompts each, both times
    assert torch.equal(out.completion_ids, again.completion_ids)

    for serial in (HFRolloutEngine(model, tokenizer), HFRolloutEngine(model, tokenizer, max_batch_size=5)):
        alone = serial.generate(prompts, params, seed=11)
        assert torch.equal(alone.completion_ids, out.completion_ids)
        assert torch.equal(alone.completion_mask, out.completion_mask)
        assert torch.allclose(alone.sampling_logprobs, out.sampling_logprobs, atol=1e-6)
    assert len(set(out.completion_texts)) > 3  # really sampled, not one greedy string
    other_seed = HFRolloutEngine(model, tokenizer).generate(prompts, params, seed=12)
    assert not torch.equal(other_seed.completion_ids, out.completion_ids)

    # And the sampled log-probs are the model's: a training-style re-scoring agrees.
    rescored, _ = completion_logprobs(model, out.prompt_ids, out.prompt_mask, out.completion_ids,
                                      out.completion_mask, temperature=1.0)
    mask = out.completion_mask.bool()
    assert torch.allclose(rescored[mask], out.sampling_logprobs[mask], atol=1e-5)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_a_run_on_two_workers_repeats_exactly_and_tracks_the_serial_run(algo, random_tiny_model, digits_reward,
                                                                        tmp_path, monkeypatch):
    concurrent = []  # task counts of the runs that really went to the workers
    original_run = CPUWorkers.run

    def spy(self, tasks):
        if self.parallel:
            concurrent.append(len(tasks))
        return original_run(self, tasks)
    monkeypatch.setattr(CPUWorkers, "run", spy)

    def run(name: str, workers: int):
        config = TrainConfig(model=str(random_tiny_model), output_dir=str(tmp_path / name), max_steps=3,
                             prompts_per_step=4, num_generations=4, max_completion_length=10, micro_batch_size=4,
                             template="compact", reward_funcs=[digits_reward], learning_rate=1e-2, num_eval=4,
                             eval_at_start=False, eval_at_end=False, plots=False, progress=False, save_steps=0,
                             num_threads=2, cpu_workers=workers, algo=algo)
        (grpo.train if algo == "grpo" else ppo.train)(config)
        return load_file(tmp_path / name / "final" / "model.safetensors")

    before = torch.get_num_threads()
    try:
        first, second, serial = run("a", 2), run("b", 2), run("serial", 1)
    finally:
        torch.set_num_threads(before)
    assert concurrent and max(concurrent) >= 2  # reference passes and micro-batches did run concurrently
    initial = load_file(random_tiny_model / "model.safetensors")
    for name, weight in first.items():
        assert torch.equal(weight, second[name]), name
        # Same sampling stream (the tiny model decodes serially) and the same gradients to float rounding:
        # three steps later the weights still agree closely, and they moved.
        assert torch.allclose(weight, serial[name], atol=1e-4), name
    assert any(not torch.equal(first[name], initial[name]) for name in initial)


def test_cold_start_sft_on_two_workers_equals_one_worker_to_float_rounding(tmp_path, monkeypatch):
    """The batch split into shards, each shard's mean loss weighted by its share of the target tokens: the
    gradient of the batch mean, so a few steps land on the same weights up to float rounding."""
    import zerorl.lm.sft as sft_module
    from zerorl.lm.sft import SFTConfig, run_sft

    shard_counts = []

    def counting(workers, replicas, micro_batches, *args, **kwargs):
        shard_counts.append((workers.num_workers, len(micro_batches)))
        return accumulate_gradients(workers, replicas, micro_batches, *args, **kwargs)

    monkeypatch.setattr(sft_module, "accumulate_gradients", counting)
    before = torch.get_num_threads()
    weights = {}
    try:
        torch.set_num_threads(2)
        for workers in (1, 2):
            config = SFTConfig(task="arithmetic", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=64, steps=5, batch_size=16, cpu_workers=workers, progress=False)
            weights[workers] = load_file(run_sft(config, tmp_path / f"w{workers}") / "model.safetensors")
    finally:
        torch.set_num_threads(before)
    assert set(shard_counts) == {(1, 1), (2, 2)}  # one shard per worker: balanced, none queued behind another
    assert SFTConfig(cpu_workers=1).recipe_hash() == SFTConfig(cpu_workers=2).recipe_hash()  # one cached base
    moved = 0.0
    for name, weight in weights[1].items():
        assert torch.allclose(weights[2][name], weight, atol=1e-5), name
        moved = max(moved, float((weight - weights[2][name]).abs().max()))
    assert moved > 0  # really another summation order (the shards ran), not the same loop twice


def test_resuming_with_another_worker_count_warns(tmp_path, capsys):
    from types import SimpleNamespace

    from zerorl.checkpoint import rng_state, save_checkpoint
    from zerorl.lm.runtime import restore_training_state

    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "checkpoints", 2, {"model": model.state_dict(), "rng": rng_state()},
                    {"step": 2, "data_cursor": 8, "cpu_workers": 2}, keep=2)
    for workers, warned in ((CPUWorkers(2), False), (CPUWorkers(1), True)):
        run = SimpleNamespace(checkpoint_root=tmp_path / "checkpoints", run_dir=tmp_path, wall_seconds_before=0.0,
                              summary={}, workers=workers)
        assert restore_training_state(run, {"model": model}, None, None)["step"] == 2
        workers.shutdown()
        err = capsys.readouterr().err
        assert ("checkpointed with 2 CPU workers and resumes with 1" in err) == warned
        assert not warned or "cpu_workers=2" in err  # and says how to resume exactly


@pytest.mark.parametrize("budget", [1 << 20, 0])
@pytest.mark.parametrize("num_workers", [2, 3])
def test_ordered_sum_is_the_serial_sum_whatever_order_the_workers_finish_in(num_workers, budget, monkeypatch):
    """Terms chosen so that the order of addition shows in the bits; the first micro-batches finish last; some
    micro-batches never reach the second layer. budget=0 makes early terms wait instead of queueing."""
    import time

    import zerorl.lm.parallel as parallel_module

    monkeypatch.setattr(parallel_module, "PENDING_GRADIENT_BUDGET", budget)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    scales = [1e7, 1.0, -1e7, 3.3e-3, 7.1, -2.9e5, 1e-6]
    inputs = [torch.randn(2, 3) * scale for scale in scales]

    def make_loss(replicas, delay):
        def loss_fn(replica, index):
            net = replicas.models[replica]
            if delay:
                time.sleep(0.02 * (len(inputs) - index))  # earlier micro-batches finish later
            hidden = net[0](inputs[index])
            # Odd micro-batches stop at the first layer: the second layer's parameters get no term from them.
            out = hidden.sum() if index % 2 else net[1](torch.tanh(hidden)).square().sum()
            return out * scales[index], index
        return loss_fn

    def run(workers, replicas, delay):
        model.zero_grad(set_to_none=True)
        order = accumulate_gradients(workers, replicas, list(range(len(inputs))), make_loss(replicas, delay),
                                     costs=[1.0] * len(inputs))
        assert order == list(range(len(inputs)))
        return [p.grad.clone() for p in model.parameters()]

    serial = run(None, Replicas(model, 1), delay=False)
    workers = CPUWorkers(num_workers)
    replicas = Replicas(model, num_workers)
    parallel = run(workers, replicas, delay=True)
    workers.shutdown()
    for got, expected in zip(parallel, serial):
        assert torch.equal(got, expected)
    # The order matters for these terms: summed the other way round, the bits differ.
    reverse = [torch.zeros_like(p) for p in model.parameters()]
    for index in reversed(range(len(inputs))):
        model.zero_grad(set_to_none=True)
        make_loss(Replicas(model, 1), False)(0, index)[0].backward()
        for total, p in zip(reverse, model.parameters()):
            if p.grad is not None:
                total.add_(p.grad)
    assert any(not torch.equal(a, b) for a, b in zip(reverse, serial))
