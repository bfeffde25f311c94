"""With the PAPO terms off, PAPOTrainer's loss and gradients are TRL's own GRPOTrainer's, on the same batch.

Both trainers load the same tiny Qwen2-VL from a folder. One generation batch is made by PAPOTrainer
through TRL's own ``_prepare_inputs`` (generation, scoring, shuffling, splitting into micro-batches), and
both trainers compute the loss of every micro-batch and accumulate gradients. Old log-probs are TRL's own
plus noise, so ratios leave the clip range.

In float32 the gradients must agree to 1e-6 of the largest entry. Under TRL's default bf16 autocast TRL's
head runs in float32 (``cast_lm_head_to_fp32``), as papo_loss's always does, and the losses agree as
tightly; the backbone's backward runs in bfloat16 in both trainers, where upstream gradients that differ
in the 8th digit can round apart, so each gradient tensor must agree to bf16's resolution (2^-8) of its
own largest entry.
"""

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from papo_kernels.integrations.trl import PAPOConfig, PAPOTrainer
from trl_setup import (build_processor_and_model_folder, colour_dataset, common_fields, current_logprobs,
                       generation_rows, length_reward, parameter_gradients)

NUM_PROMPTS = 2
SHARED_GRPO = dict(epsilon=0.2, epsilon_high=0.28, delta=3.0)
PAPO_OFF = dict(gamma=0.0, eta_clean=0.0, eta_masked=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-qwen2vl")
    return folder, build_processor_and_model_folder(folder), colour_dataset(NUM_PROMPTS)


def make_trainers(tiny, tmp_path, grpo_only=None, papo_only=None, **fields):
    folder, processor, dataset = tiny
    shared = {**SHARED_GRPO, **fields}
    grpo_args = GRPOConfig(**common_fields(processor, tmp_path / "grpo", **shared),
                           cast_lm_head_to_fp32=shared.get("bf16", True), **(grpo_only or {}))
    papo_args = PAPOConfig(**common_fields(processor, tmp_path / "papo", **shared), **{**PAPO_OFF, **(papo_only or {})})
    trainers = [cls(model=str(folder), reward_funcs=length_reward, args=args, train_dataset=dataset,
                    processing_class=processor)
                for cls, args in ((GRPOTrainer, grpo_args), (PAPOTrainer, papo_args))]
    for trainer in trainers:
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    return trainers


def micro_batches(trainer, rows):
    """The micro-batches of one generation batch, made by TRL's own _prepare_inputs."""
    batches = []
    for step in range(trainer.args.steps_per_generation):
        trainer._step = step
        batches.append(trainer._prepare_inputs(rows))
    return batches


def with_noisy_old_logprobs(trainer, batch, seed):
    """The batch with old log-probs = the model's (by TRL's own head) + N(0, 0.3) noise on response tokens."""
    logps = current_logprobs(trainer, batch)
    noise = 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(seed))
    return {**batch, "old_per_token_logps": logps + noise * batch["completion_mask"]}


def with_noisy_reference(trainer, batch):
    """The batch with noisy old log-probs, and reference log-probs = the old ones + N(0, 0.2) noise."""
    batch = with_noisy_old_logprobs(trainer, batch, 1)
    noise = 0.2 * torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(2))
    return {**batch, "ref_per_token_logps": batch["old_per_token_logps"] + noise * batch["completion_mask"]}


def losses_and_gradients(trainer, batches):
    trainer.model.zero_grad()
    losses = []
    for batch in batches:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), parameter_gradients(trainer.model)


def assert_same_loss_and_gradients(grpo, papo, batches):
    grpo_losses, grpo_grads = losses_and_gradients(grpo, batches)
    papo_losses, papo_grads = losses_and_gradients(papo, batches)
    torch.testing.assert_close(papo_losses, grpo_losses, rtol=1e-5, atol=1e-7)
    assert set(papo_grads) == set(grpo_grads)
    scale = max(grad.abs().max().item() for grad in grpo_grads.values())
    assert scale > 1e-4, "the batch must carry a gradient"
    for name, grad in grpo_grads.items():
        atol = 1e-6 * scale
        if papo.args.bf16:
            atol = max(atol, 2.0 ** -8 * grad.abs().max().item())
        torch.testing.assert_close(papo_grads[name], grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-autocast", "float32"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("old_logprobs, accumulation", [(False, 1), (True, 2)], ids=["on-policy", "old-accum2"])
def test_loss_and_gradients_equal_grpo_trainer(tiny, tmp_path, loss_type, old_logprobs, accumulation, bf16):
    grpo, papo = make_trainers(tiny, tmp_path, loss_type=loss_type, gradient_accumulation_steps=accumulation,
                               per_device_train_batch_size=NUM_PROMPTS * 4 // accumulation, bf16=bf16)
    batches = micro_batches(papo, generation_rows(tiny[2], NUM_PROMPTS))
    assert len(batches) == accumulation
    if old_logprobs:
        batches = [with_noisy_old_logprobs(grpo, batch, seed) for seed, batch in enumerate(batches)]
    assert_same_loss_and_gradients(grpo, papo, batches)
    if old_logprobs:
        clipped = [papo._metrics["train"][name][-1] for name in ("clip_ratio/low_mean", "clip_ratio/high_mean")]
        assert sum(clipped) > 0, "the noisy old log-probs must clip some ratios"
        torch.testing.assert_close(torch.tensor(papo._metrics["train"]["clip_ratio/region_mean"]),
                                   torch.tensor(grpo._metrics["train"]["clip_ratio/region_mean"]))
    torch.testing.assert_close(torch.tensor(papo._metrics["train"]["entropy"]),
                               torch.tensor(grpo._metrics["train"]["entropy"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kl_flag, level", [({}, "token"), (dict(use_bias_correction_kl=True), "token"),
                                            (dict(use_bias_correction_kl=False), "token"),
                                            ({}, "sequence")],
                         ids=["default", "bias-corrected", "plain-k3", "default-gspo"])
def test_reference_kl_equals_grpo_trainer(tiny, tmp_path, kl_flag, level):
    """beta > 0 with both configs' default use_bias_correction_kl (TRL's True: the ratio times k3) or either value
    set: TRL's loss, gradients and logged kl. Token level runs papo_loss's fast path, GSPO's sequence level (a
    sequence's ratio on each of its tokens) the per-token path."""
    grpo, papo = make_trainers(tiny, tmp_path, beta=0.04, importance_sampling_level=level, **kl_flag)
    assert papo.args.use_bias_correction_kl is grpo.args.use_bias_correction_kl is kl_flag.get(
        "use_bias_correction_kl", True)
    batch = with_noisy_reference(grpo, micro_batches(papo, generation_rows(tiny[2], NUM_PROMPTS))[0])
    assert_same_loss_and_gradients(grpo, papo, [batch])
    torch.testing.assert_close(torch.tensor(papo._metrics["train"]["kl"]), torch.tensor(grpo._metrics["train"]["kl"]),
                               rtol=1e-5, atol=1e-7)


def test_the_two_reference_kls_differ(tiny, tmp_path):
    """The flag matters on this batch, so the test above tells the two KLs apart."""
    _, papo = make_trainers(tiny, tmp_path, beta=0.04)
    batch = with_noisy_reference(papo, micro_batches(papo, generation_rows(tiny[2], NUM_PROMPTS))[0])
    gradients = []
    for flag in (True, False):
        papo.args.use_bias_correction_kl = flag
        gradients.append(losses_and_gradients(papo, [batch])[1])
    difference = max((gradients[0][name] - gradients[1][name]).abs().max().item() for name in gradients[0])
    assert difference > 1e-4, difference


@pytest.mark.parametrize("option", ["sequence", "top_entropy", "off_policy", "vllm_ratio", "dual_clip"])
def test_trl_options_equal_grpo_trainer(tiny, tmp_path, option):
    """GSPO's sequence-level ratio, the per-token weights of the policy-gradient term, and the dual clip (TRL's
    delta) on tokens whose ratio is above it."""
    fields = {"sequence": dict(importance_sampling_level="sequence", loss_type="grpo"),
              "top_entropy": dict(top_entropy_quantile=0.5), "off_policy": dict(off_policy_mask_threshold=0.05),
              "vllm_ratio": {}, "dual_clip": {}}[option]
    grpo, papo = make_trainers(tiny, tmp_path, **fields)
    batch = with_noisy_old_logprobs(grpo, micro_batches(papo, generation_rows(tiny[2], NUM_PROMPTS))[0], 1)
    mask = batch["completion_mask"]
    if option == "dual_clip":
        # Old log-probs 1.5 nats below the current ones on the first token of every response with a negative
        # advantage: ratio e^1.5 = 4.5 > delta = 3, where the dual clip caps the loss at -delta * A.
        negative = (batch["advantages"] < 0).to(mask.dtype).unsqueeze(1) * mask
        first_token = torch.zeros_like(mask)
        first_token[:, 0] = 1
        dual_clipped = (negative * first_token).bool()
        assert dual_clipped.any(), "the batch must hold a response with a negative advantage"
        batch["old_per_token_logps"] = torch.where(dual_clipped, current_logprobs(grpo, batch) - 1.5,
                                                   batch["old_per_token_logps"])
    if option == "vllm_ratio":
        # TRL applies the vLLM importance-sampling ratio in the loss when these flags are set; this CPU has no
        # vLLM to generate with, so the flags are set on both trainers after generation and the ratio is given.
        for trainer in (grpo, papo):
            trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        batch["importance_sampling_ratio"] = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    assert_same_loss_and_gradients(grpo, papo, [batch])


def test_masked_pass_on_an_unmasked_image_changes_nothing(tiny, tmp_path):
    """With mask_probability 0 the masked image is the clean one: the perception KL is 0 with zero gradient,
    so PAPO with gamma > 0 runs the joint clean + masked forward and still gives TRL's loss and gradients.
    In float32: under bf16 autocast the two halves of the joint batch differ by bf16 rounding, and so does the
    KL's gradient."""
    grpo, papo = make_trainers(tiny, tmp_path, bf16=False, papo_only=dict(gamma=0.5, mask_probability=0.0))
    batch = micro_batches(papo, generation_rows(tiny[2], NUM_PROMPTS))[0]
    assert "masked_pixel_values" in batch
    torch.testing.assert_close(torch.cat(batch["masked_pixel_values"]), batch["pixel_values"], rtol=0, atol=0)
    assert_same_loss_and_gradients(grpo, papo, [with_noisy_old_logprobs(grpo, batch, 4)])
    assert abs(papo._metrics["train"]["papo/perception_kl"][-1]) < 1e-6
