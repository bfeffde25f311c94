"""papo_loss and the LM-head ops over a vocabulary-parallel head: 2 and 4 gloo processes against one process.

Each group of processes is spawned once for the module (``vocab_parallel_cases.run_group``); every rank
holds a block of the head's rows (V = 23, blocks of different sizes, every block's first and last id a
response token) and runs every case. Here, in one process with the whole head, the same cases run again:

- float64: loss, metrics and every gradient (the weight and bias blocks put back together) equal the
  single-process call to 1e-10, on every path and epilogue, every loss type, k3 and the exact KL, sampled
  and exact entropy, with and without bias, at three temperatures; loss and metrics are the same bits on
  every rank;
- float32: within the error budget against the float64 truth (backend_cases.py);
- the LM-head ops on every backend, and on head_chunks with the torch head (the torch backend's CUDA design) in
  chunks of a few tokens whose count differs between the ranks' budgets, equal the single-process call to 1e-10
  in float64; the triton backend under the interpreter keeps the single-process triton call's float32 error;
- the hidden gradients left partial sum over the ranks to the gradient;
- bad inputs are a ValueError on every rank, at once, and the group works after them.
"""

import dataclasses
import functools
import re

import pytest
import torch

from papo_kernels import linear_logprobs, papo_loss
from papo_kernels.backends import head_chunks
from papo_kernels.fast_path.chunk_loop import bytes_per_token, tokens_per_chunk
from papo_kernels.fast_path.epilogues import torch_epilogue

from backend_cases import assert_close, assert_within_budget
from vocab_parallel_cases import FLOAT32_CASES, FLOAT32_OP_CASES, FLOAT32_OP_WORLD, FLOAT64_CASES, OP_CASES
from vocab_parallel_cases import PARTIAL_CASE, SIZES, TINY_WORKSPACE, B, D, T, V, make_batch, run_case, run_group
from vocab_parallel_cases import run_op

WORLDS = sorted(SIZES)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda world: f"{world}-ranks")
def ranks(request, tmp_path_factory):
    """Every rank's results (rank order) of one group run."""
    return run_group(request.param, tmp_path_factory.mktemp(f"vocab_parallel_{request.param}"))


@functools.lru_cache(maxsize=None)
def batch():
    return make_batch()


@functools.lru_cache(maxsize=None)
def one_process(case):
    return run_case(batch(), case)


def results_of(ranks, kind: str, name: str):
    results = [rank[kind][name] for rank in ranks]
    for rank, result in enumerate(results):
        assert not isinstance(result, str), f"{name} failed on rank {rank}: {result}"
    return results


def put_together(ranks, results, index: int, name: str):
    """A gradient as the whole head has it: the blocks' rows of weight and bias concatenated in rank order."""
    grads = [result[index][name] for result in results]
    if name in ("weight", "bias"):
        assert [grad.shape[0] for grad in grads] == [rank["rows"].stop - rank["rows"].start for rank in ranks]
        return torch.cat(grads)
    return grads


def assert_same_on_every_rank(name: str, values):
    for rank, value in enumerate(values[1:], start=1):
        assert torch.equal(value, values[0]), f"{name} differs between rank 0 ({values[0]}) and rank {rank} ({value})"


@pytest.mark.parametrize("case", FLOAT64_CASES, ids=lambda case: case.name)
def test_float64_equals_one_process(ranks, case):
    results = results_of(ranks, "losses", case.name)
    want_loss, want_metrics, want_grads = one_process(case)
    assert_same_on_every_rank("loss", [result[0] for result in results])
    assert_close("loss", results[0][0], want_loss, rtol=1e-10, atol=1e-12)
    for name, value in want_metrics.items():
        assert_same_on_every_rank(name, [result[1][name] for result in results])
        assert_close(name, results[0][1][name], value, rtol=1e-10, atol=1e-12)
    for name, value in want_grads.items():
        got = put_together(ranks, results, 2, name)
        for rank, grad in enumerate([got] if name in ("weight", "bias") else got):
            assert_close(f"grad of {name} (rank {rank})", grad, value, rtol=1e-10, atol=1e-12)


def test_partial_hidden_gradients_sum_over_the_ranks_to_the_gradient(ranks):
    results = results_of(ranks, "losses", PARTIAL_CASE.name)
    want_loss, _, want_grads = one_process(PARTIAL_CASE)
    assert_close("loss", results[0][0], want_loss, rtol=1e-10, atol=1e-12)
    for name in ("hidden", "hidden_masked"):
        parts = [result[2][name] for result in results]
        assert_close(f"sum over the ranks of grad of {name}", sum(parts), want_grads[name], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(parts[0], want_grads[name]), f"rank 0's grad of {name} is already the whole"
    assert_close("grad of weight", put_together(ranks, results, 2, "weight"), want_grads["weight"], rtol=1e-10,
                 atol=1e-12)


@pytest.mark.parametrize("way", ["module", "compiled"])
def test_papo_loss_module_and_torch_compile_take_the_group(ranks, way):
    """PAPOLoss(vocab_parallel_group=group, ...), and papo_loss under torch.compile (where the group's call runs
    eagerly, a graph break), give each rank what papo_loss gives it."""
    for rank, result in enumerate(ranks):
        other, direct = result[way], result["losses"][FLOAT64_CASES[0].name]
        assert not isinstance(other, str), f"rank {rank}: {other}"
        assert torch.equal(other[0], direct[0]), f"rank {rank}: loss {other[0]} != {direct[0]}"
        for name, grad in direct[2].items():
            assert torch.equal(other[2][name], grad), f"rank {rank}: grad of {name} differs"


def rounded_to(dtype: torch.dtype):
    return {name: t.to(dtype).double() if t.is_floating_point() else t for name, t in batch().items()}


@pytest.mark.parametrize("case", FLOAT32_CASES, ids=lambda case: case.name)
def test_float32_keeps_the_error_budget(ranks, case):
    """Against the float64 truth on the same rounded inputs: within 4x the float32 reference's own error."""
    results = results_of(ranks, "losses", case.name)
    reference = dataclasses.replace(case, path="per_token", backend="reference", workspace_bytes=None)
    truth = run_case(rounded_to(case.dtype), dataclasses.replace(reference, dtype=torch.float64))
    same_dtype = run_case(batch(), reference)
    assert_same_on_every_rank("loss", [result[0] for result in results])
    assert_within_budget("loss", results[0][0].double(), same_dtype[0].double(), truth[0], factor=4.0, atol=4e-7)
    for name in truth[1]:
        assert_within_budget(name, results[0][1][name].double(), same_dtype[1][name].double(), truth[1][name],
                             factor=4.0, atol=4e-7)
    for name in truth[2]:
        got = put_together(ranks, results, 2, name)
        for grad in [got] if name in ("weight", "bias") else got:
            assert grad.dtype == case.dtype
            assert_within_budget(f"grad of {name}", grad.double(), same_dtype[2][name].double(), truth[2][name],
                                 factor=4.0, atol=4e-7, scale_to_truth=True)


@pytest.mark.parametrize("name, op, backend, bias, temperature", OP_CASES, ids=[case[0] for case in OP_CASES])
def test_lm_head_ops_equal_one_process(ranks, name, op, backend, bias, temperature):
    results = results_of(ranks, "ops", name)
    want_outputs, want_grads = run_op(batch(), op, backend, bias, temperature)
    for index, want in enumerate(want_outputs):
        assert_same_on_every_rank(f"output {index}", [result[0][index] for result in results])
        assert_close(f"output {index}", results[0][0][index], want, rtol=1e-10, atol=1e-12)
    for grad_name, want in want_grads.items():
        got = put_together(ranks, results, 1, grad_name)
        for grad in [got] if grad_name in ("weight", "bias") else got:
            assert_close(f"grad of {grad_name}", grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ranks", [FLOAT32_OP_WORLD], indirect=True, ids=lambda world: f"{world}-ranks")
@pytest.mark.parametrize("name, op, backend, bias, temperature", FLOAT32_OP_CASES,
                         ids=[case[0] for case in FLOAT32_OP_CASES])
def test_lm_head_ops_float32_keep_the_one_process_error(ranks, name, op, backend, bias, temperature):
    """Against the float64 truth on the same rounded inputs: within 4x the single-process call's own error."""
    results = results_of(ranks, "ops", name)
    one_outputs, one_grads = run_op(batch(), op, backend, bias, temperature, dtype=torch.float32)
    truth_outputs, truth_grads = run_op(rounded_to(torch.float32), op, "reference", bias, temperature)
    for index, truth in enumerate(truth_outputs):
        assert_same_on_every_rank(f"output {index}", [result[0][index] for result in results])
        assert_within_budget(f"output {index}", results[0][0][index].double(), one_outputs[index].double(), truth,
                             factor=4.0, atol=4e-7)
    for grad_name, truth in truth_grads.items():
        got = put_together(ranks, results, 1, grad_name)
        for grad in [got] if grad_name in ("weight", "bias") else got:
            assert grad.dtype == torch.float32
            assert_within_budget(f"grad of {grad_name}", grad.double(), one_grads[grad_name].double(), truth,
                                 factor=4.0, atol=4e-7)


@pytest.mark.parametrize("op", ["logprobs", "perception_kl"])
def test_head_chunks_ranks_alone_would_sweep_different_chunks(op):
    """The premise of the head_chunks cases: at TINY_WORKSPACE the 2 ranks' blocks alone give different chunk sizes
    (in forward and backward), so that the group runs its several chunks only by agreeing on one size."""
    paired = op == "perception_kl"
    sizes = SIZES[2]
    forward = [head_chunks.TORCH_HEAD.forward_bytes_per_token(size, D, paired, torch.float64) for size in sizes]
    backward = [bytes_per_token(size, D, paired, 8, False, torch_epilogue.workspace_bytes_per_token(size, paired, 8))
                for size in sizes]
    for per_token in (forward, backward):
        chunks = {tokens_per_chunk(B * T, each, TINY_WORKSPACE) for each in per_token}
        assert len(chunks) == 2 and max(chunks) < B * T, f"tokens per chunk on the 2 ranks: {chunks}"


def expected_errors(world: int):
    """Per bad call: (rank -> the message its ValueError must match)."""
    last = world - 1
    everywhere = {
        "tokens differ": "hidden must have the same shape on every rank",
        "D differs": "hidden must have the same shape on every rank",
        "weight block of the wrong width": r"weight must be this rank's block of rows of the head, shape \(V_rank, D\)",
        "id outside the global vocabulary": re.escape(f"completion_ids must hold ids in [0, {V}) (the global "
                                                      "vocabulary"),
        "settings differ": "the ranks disagree on the settings",
        "ids differ": "completion_ids must be the same global ids on every rank",
        "op id outside the global vocabulary": re.escape(f"tokens must hold ids in [0, {V})"),
    }
    expected = {name: {rank: message for rank in range(world)} for name, message in everywhere.items()}
    refused = re.escape(f"rank(s) [{last}] of vocab_parallel_group refused their inputs")
    expected["one rank refuses a setting"] = {
        rank: r"temperature must be a finite number in \(0.0, inf\)" if rank == last else refused for rank in range(world)}
    expected["one rank's bias block is not finite"] = {
        rank: "bias must hold finite numbers, got inf" if rank == last else refused for rank in range(world)}
    return expected


def test_bad_inputs_are_an_error_on_every_rank(ranks):
    world = len(ranks)
    for name, messages in expected_errors(world).items():
        for rank, message in messages.items():
            kind, text, seconds = ranks[rank]["bad"][name]
            assert kind == "ValueError" and re.search(message, text), (
                f"{name}, rank {rank}: expected a ValueError matching {message!r}, got {kind}: {text}")
            assert seconds < 20, f"{name}, rank {rank}: the error took {seconds:.1f} s (a rank waited)"
    assert_same_on_every_rank("loss after the bad calls", [rank["after_bad"] for rank in ranks])
    assert_close("loss after the bad calls", ranks[0]["after_bad"], one_process(FLOAT64_CASES[0])[0], rtol=1e-10,
                 atol=1e-12)


# Without a process group (this process has none): the arguments alone are checked.

def test_without_torch_distributed_the_group_is_refused():
    data = batch()
    inputs = (data["hidden"], data["weight"], data["completion_ids"], data["completion_mask"], data["advantages"])
    with pytest.raises(ValueError, match="vocab_parallel_group needs torch.distributed initialised"):
        papo_loss(*inputs, vocab_parallel_group=object())
    with pytest.raises(ValueError, match="vocab_parallel_group needs torch.distributed initialised"):
        linear_logprobs(data["hidden"], data["weight"], data["completion_ids"].clamp(min=0),
                        vocab_parallel_group=object())
    with pytest.raises(ValueError, match="vocab_parallel_hidden_grad='partial' applies to a vocabulary-parallel "
                                         "head, but vocab_parallel_group is None"):
        papo_loss(*inputs, vocab_parallel_hidden_grad="partial")
    with pytest.raises(ValueError, match=r"vocab_parallel_hidden_grad must be one of \['all_reduce', 'partial'\]"):
        papo_loss(*inputs, vocab_parallel_hidden_grad="sum")
