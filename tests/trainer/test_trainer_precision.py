"""The tiny Qwen2-VL and Qwen2.5-VL train in float32, bfloat16 and under bf16 mixed precision; fp16's loss scaler
skips an overflowing update and is checkpointed; gradient checkpointing and the attention kernel change the memory and
speed, not the loss; the loss reads the LM head without copying it."""

import pytest
import torch
from accelerate import Accelerator
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import papo_kernels.trainer.loop as loop
import papo_kernels.trainer.policy as policy
from papo_kernels.trainer import Trainer
from papo_kernels.trainer.advantages import group_advantages
from papo_kernels.trainer.policy import response_logprobs

from trainer_helpers import sampling_logits_and_logprobs, save_model_folder, small_config

MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def weights_of(trainer):
    return {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}


@pytest.mark.parametrize("torch_dtype, mixed_precision, compute_dtype", [
    ("float32", "no", torch.float32),
    ("bfloat16", "no", torch.bfloat16),
    ("float32", "bf16", torch.bfloat16),  # float32 weights, bfloat16 matrix products under autocast
])
def test_the_tiny_qwen2_5_vl_trains_three_steps(tmp_path, torch_dtype, mixed_precision, compute_dtype):
    trainer = Trainer(small_config(tmp_path, steps=3, model_type="qwen2_5_vl", torch_dtype=torch_dtype,
                                   mixed_precision=mixed_precision, skip_uninformative_steps=False))
    model = trainer.model
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    vision = model.config.vision_config
    assert (vision.window_size, list(vision.fullatt_block_indexes), vision.out_hidden_size) == (28, [1], 64)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight, "tied, as in Qwen2.5-VL-3B"
    assert {parameter.dtype for parameter in model.parameters()} == {getattr(torch, torch_dtype)}
    products = []
    handle = model.model.language_model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda module, args, output: products.append(output.dtype))
    before = weights_of(trainer)
    records = trainer.train()
    handle.remove()
    assert [record["step"] for record in records] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
    assert set(products) == {compute_dtype}, "generation and training ran in the compute dtype"
    after = weights_of(trainer)
    assert all(torch.isfinite(weight).all() for weight in after.values())
    still = sorted(name for name in before if torch.equal(before[name], after[name]))
    norms = sorted(name for name in before if "norm" in name or "ln_q" in name)
    if torch_dtype == "bfloat16":
        # The norm weights start at 1.0, whose bfloat16 neighbours are 2**-8 below and 2**-7 above: AdamW's steps of
        # about lr = 3e-4 round away. Every other weight (initialised near 0.02) moved.
        assert still == norms and torch.equal(after[norms[0]], torch.ones_like(after[norms[0]]))
    else:
        assert still == [], f"weights that never moved: {still}"


def accelerator_with_a_loss_scaler(initial_scale: float) -> Accelerator:
    """A CPU accelerator with a loss scaler, standing in for fp16's (whose autocast runs only on CUDA): the same
    ``GradScaler`` code in accelerate's backward, unscale, clip and step. A scale of 1e38 overflows float32 gradients
    as fp16's initial 65536 overflows float16 ones."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=initial_scale)
    return accelerator


def test_an_overflow_under_the_loss_scaler_skips_the_update_and_lowers_the_scale(tmp_path):
    accelerator = accelerator_with_a_loss_scaler(1e38)
    trainer = Trainer(small_config(tmp_path, steps=2, skip_uninformative_steps=False), accelerator=accelerator)
    before = weights_of(trainer)
    records = trainer.train()
    assert [record["scaler_skipped_updates"] for record in records] == [1, 1]
    assert accelerator.scaler.get_scale() == pytest.approx(1e38 * 0.5 ** 2, rel=1e-6), "each overflow halves it"
    after = weights_of(trainer)
    assert all(torch.equal(before[name], after[name]) for name in before), "a skipped update leaves the weights"
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["scaler"]
    assert saved == accelerator.scaler.state_dict()


def test_a_resume_continues_with_the_saved_loss_scale(tmp_path):
    settings = dict(skip_uninformative_steps=False, lr_schedule="constant")
    Trainer(small_config(tmp_path, steps=1, **settings), accelerator=accelerator_with_a_loss_scaler(1e38)).train()
    accelerator = accelerator_with_a_loss_scaler(1e38)
    Trainer(small_config(tmp_path, steps=2, **settings), resume=True, accelerator=accelerator)
    assert accelerator.scaler.get_scale() == pytest.approx(0.5e38, rel=1e-6)


def test_without_a_loss_scaler_every_update_counts(tmp_path):
    records = Trainer(small_config(tmp_path, steps=1, skip_uninformative_steps=False)).train()
    assert records[0]["scaler_skipped_updates"] == 0


def loss_and_gradients(trainer, rollout):
    """The PAPO-D loss of the whole rollout (clean and masked passes) and the gradient of every parameter."""
    advantages = torch.linspace(-1.0, 1.0, len(rollout))
    trainer.model.train()
    trainer.model.zero_grad()
    loss, _ = trainer.micro_batch_loss(rollout, torch.arange(len(rollout)), advantages,
                                       float(rollout.completion_mask.sum()), trainer.step_loss_kwargs(0), None, None,
                                       None, with_masked_pass=True)
    loss.backward()
    return loss.detach(), {name: parameter.grad.clone() for name, parameter in trainer.model.named_parameters()}


def assert_same_loss_and_gradients(first, second, rtol):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=0)
    scale = max(grad.abs().max() for grad in grads_a.values())
    assert scale > 0
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, model_type):
    plain = Trainer(small_config(tmp_path / "plain", model_type=model_type))
    checkpointed = Trainer(small_config(tmp_path / "checkpointed", model_type=model_type,
                                        gradient_checkpointing=True))
    rollout, _ = plain.make_rollout(0)
    calls = {"plain": 0, "checkpointed": 0}
    for name, trainer in (("plain", plain), ("checkpointed", checkpointed)):
        # transformers checkpoints a block's forward (its own hooks stay outside): hook the attention inside it.
        for attention in (trainer.model.model.language_model.layers[0].self_attn,
                          trainer.model.model.visual.blocks[0].attn):
            attention.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    result_plain = loss_and_gradients(plain, rollout)
    result_checkpointed = loss_and_gradients(checkpointed, rollout)
    # Each hooked module runs once per forward, and once more in the backward when its block is recomputed.
    assert calls == {"plain": 2, "checkpointed": 4}
    assert_same_loss_and_gradients(result_plain, result_checkpointed, rtol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_sdpa_and_eager_attention_give_the_same_loss(tmp_path, model_type):
    sdpa = Trainer(small_config(tmp_path / "sdpa", model_type=model_type))  # auto: SDPA on this CPU
    eager = Trainer(small_config(tmp_path / "eager", model_type=model_type, attn_implementation="eager"))
    for trainer, kernel in ((sdpa, "sdpa"), (eager, "eager")):
        config = trainer.model.config
        assert (config._attn_implementation, config.vision_config._attn_implementation) == (kernel, kernel)
    rollout, _ = sdpa.make_rollout(0)
    assert_same_loss_and_gradients(loss_and_gradients(sdpa, rollout), loss_and_gradients(eager, rollout), rtol=1e-4)


def record_head_weights(monkeypatch):
    """The weights that papo_loss and linear_logprobs receive from the trainer, recorded as the real ones run."""
    seen = []

    def recording(function):
        def call(hidden, weight, *args, **kwargs):
            seen.append(weight)
            return function(hidden, weight, *args, **kwargs)
        return call

    monkeypatch.setattr(loop, "papo_loss", recording(loop.papo_loss))
    monkeypatch.setattr(policy, "linear_logprobs", recording(policy.linear_logprobs))
    return seen


def update_once(trainer):
    rollout, scores = trainer.make_rollout(0)
    trainer.update(rollout, group_advantages(scores[:, 0], trainer.config.group_size) + 0.1, step=0)
    return rollout


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_the_loss_reads_the_head_itself_under_the_sampling_distribution(tmp_path, monkeypatch, model_type):
    # A local model folder, as a real Qwen2-VL or Qwen2.5-VL comes; ppo_epochs 2: old log-probs (linear_logprobs)
    # are computed too.
    folder = save_model_folder(tmp_path / "model", model_type)
    trainer = Trainer(small_config(tmp_path / "run", model=str(folder), temperature=0.7, ppo_epochs=2))
    head = trainer.model.get_output_embeddings().weight
    seen = record_head_weights(monkeypatch)
    rollout = update_once(trainer)
    assert len(seen) >= 3
    for weight in seen:
        assert weight.shape == head.shape
        assert weight.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        assert weight.data_ptr() == head.data_ptr(), "the head itself, not a copy"
    # The log-probs are those of the sampling distribution: the suppressed ids' logits at -inf.
    logprobs = response_logprobs(trainer.hidden_states, rollout, 0.7, micro_batch_size=8)
    scaled, expected = sampling_logits_and_logprobs(trainer, rollout, 0.7)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)
    full = torch.log_softmax(scaled, dim=-1)
    assert (full[..., trainer.suppress_ids].exp().sum(-1)[rollout.completion_mask] > 1e-3).all(), \
        "without the sampling bias the suppressed ids would take mass: the check above would see it"
