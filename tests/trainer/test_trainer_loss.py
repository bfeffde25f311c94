"""The trainer's loss is papo_loss on the model's final hidden states, and no forward builds the logits."""

from dataclasses import replace

import pytest
import torch

from papo_kernels import papo_loss
from papo_kernels.trainer import Trainer
from papo_kernels.trainer.advantages import group_advantages, informative_groups, keep_responses
from papo_kernels.trainer.policy import response_logprobs, sequence_inputs

from trainer_helpers import sampling_logits_and_logprobs, small_config, subset


def backbone_hidden(trainer, rollout, masked):
    """Hidden states of the response positions from a separate forward of the clean or masked inputs."""
    inputs = sequence_inputs(rollout, torch.arange(len(rollout)), masked)
    length = rollout.completion_ids.shape[1]
    assert torch.equal(inputs["input_ids"][:, -length:], rollout.completion_ids)
    return trainer.model.model(**inputs).last_hidden_state[:, -length - 1:-1]


def test_trainer_loss_equals_papo_loss_on_the_same_tensors(small_trainer):
    trainer = small_trainer
    rollout, scores = trainer.make_rollout(0)
    advantages = torch.linspace(-1.0, 1.0, len(rollout))
    mask = rollout.completion_mask
    normaliser = float(mask.sum()) + 3.0  # as if other micro-batches held 3 more tokens
    kwargs = trainer.step_loss_kwargs(0)
    assert kwargs["gamma"] > 0 and kwargs["eta_masked"] > 0

    loss, metrics = trainer.micro_batch_loss(rollout, torch.arange(len(rollout)), advantages, normaliser, kwargs,
                                             None, None, None, with_masked_pass=True)
    loss.backward()
    trainer_grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.model.zero_grad()

    hidden, hidden_masked = backbone_hidden(trainer, rollout, False), backbone_hidden(trainer, rollout, True)
    assert (hidden - hidden_masked).abs().max() > 1e-4, "the masked image must change the hidden states"
    tokens = rollout.completion_ids.where(mask, 0)
    expected, expected_metrics = papo_loss(hidden, trainer.model.lm_head.weight, tokens, mask, advantages,
                                           hidden_masked=hidden_masked, bias=trainer.sampling_bias,
                                           num_items_in_batch=normaliser, **kwargs)
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for name in metrics:
        torch.testing.assert_close(metrics[name], expected_metrics[name], rtol=1e-5, atol=1e-7)
    for (name, parameter), grad in zip(trainer.model.named_parameters(), trainer_grads):
        torch.testing.assert_close(grad, parameter.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_response_logprobs_match_the_full_model_logits(tmp_path):
    trainer = Trainer(small_config(tmp_path, temperature=0.7, ppo_epochs=2))
    rollout, _ = trainer.make_rollout(0)
    logprobs = response_logprobs(trainer.hidden_states, rollout, 0.7, micro_batch_size=5)
    # The softmax of sampling: the suppressed ids' logits at -inf (policy.sampling_bias).
    _, expected = sampling_logits_and_logprobs(trainer, rollout, 0.7)
    torch.testing.assert_close(logprobs, expected, rtol=1e-5, atol=1e-5)
    assert rollout.completion_mask.any(dim=1).all()


@pytest.mark.parametrize("overrides", [
    dict(),  # PAPO-D: gradient through the clean and masked passes
    dict(preset="papo_g", ppo_epochs=2, minibatches=2, masked_gradient=False),  # old, ref and masked log-probs
    dict(preset="dapo"),  # PAPO terms off: the clean pass only
])
def test_no_forward_of_the_update_builds_the_logits(tmp_path, overrides):
    trainer = Trainer(small_config(tmp_path, **overrides))
    rollout, scores = trainer.make_rollout(0)
    advantages = group_advantages(scores[:, 0], trainer.config.group_size) + 0.1

    # The model runs its own forward; its head gets an empty slice of positions, so it builds no logits.
    def refuse(module, args, output):
        if output.shape[1] != 0:
            raise AssertionError(f"the LM head built logits of shape {tuple(output.shape)}")

    handles = [trainer.model.lm_head.register_forward_hook(refuse)]
    if trainer.reference is not None:
        handles.append(trainer.reference.model.lm_head.register_forward_hook(refuse))
    metrics = trainer.update(rollout, advantages, step=0)
    assert metrics["grad_norm"] > 0
    with pytest.raises(AssertionError, match="the LM head built logits"):
        trainer.model(**sequence_inputs(rollout, torch.arange(2), False))
    for handle in handles:
        handle.remove()


def test_dapo_filter_equals_dropping_the_groups(small_trainer):
    """Zeroing the mask of a group without signal gives the loss and gradient of the batch without it."""
    trainer, group = small_trainer, 4
    rollout, _ = trainer.make_rollout(0)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    kept = informative_groups(rewards, group)
    assert kept.tolist() == [True, False, True, False]
    advantages = group_advantages(rewards, group)
    keep = keep_responses(kept, group)
    kwargs = trainer.step_loss_kwargs(0)

    def loss_and_grad(batch, batch_advantages):
        tokens = float(batch.completion_mask.sum())
        loss, _ = trainer.micro_batch_loss(batch, torch.arange(len(batch)), batch_advantages, tokens, kwargs,
                                           None, None, None, with_masked_pass=True)
        loss.backward()
        grad = trainer.model.lm_head.weight.grad.clone()
        trainer.model.zero_grad()
        return loss.detach(), grad

    filtered = replace(rollout, completion_mask=rollout.completion_mask & keep[:, None])
    loss_filtered, grad_filtered = loss_and_grad(filtered, advantages)
    loss_dropped, grad_dropped = loss_and_grad(subset(rollout, keep.nonzero()[:, 0]), advantages[keep])
    _, grad_all = loss_and_grad(rollout, advantages)
    torch.testing.assert_close(loss_filtered, loss_dropped, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_filtered, grad_dropped, rtol=1e-4, atol=1e-8)
    # The loss alone can agree by chance (per-token PAPO terms of similar size in every group); the gradient cannot.
    assert not torch.allclose(grad_all, grad_filtered, rtol=1e-3, atol=0), "the filter must change the gradient"


def test_precomputed_positions_equal_the_models_own(small_trainer):
    rollout, _ = small_trainer.make_rollout(0)
    inputs = sequence_inputs(rollout, torch.arange(len(rollout)), masked=False)
    own, _ = small_trainer.model.model.get_rope_index(
        input_ids=inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])
    real = inputs["attention_mask"].bool()[None].expand_as(own)
    assert torch.equal(rollout.position_ids[real], own[real])
    # The image tokens really have 2-D positions: height and width differ somewhere.
    assert not torch.equal(own[1], own[2])


def test_a_minibatch_whose_groups_were_all_dropped_takes_no_step(tmp_path):
    """With dapo_filter a whole minibatch can lose its tokens: the update skips it (its normaliser would be 0) and
    equals one step on the other minibatch alone."""
    two_minibatches = Trainer(small_config(tmp_path / "two", minibatches=2, max_grad_norm=1e9))
    rollout, _ = two_minibatches.make_rollout(0)
    advantages = torch.linspace(-1.0, 1.0, len(rollout))
    second = torch.arange(len(rollout) // 2, len(rollout))
    dropped = replace(rollout, completion_mask=rollout.completion_mask & (torch.arange(len(rollout)) >= 8)[:, None])
    metrics = two_minibatches.update(dropped, advantages, step=0)
    one_minibatch = Trainer(small_config(tmp_path / "one", max_grad_norm=1e9))
    expected = one_minibatch.update(subset(rollout, second), advantages[second], step=0)
    torch.testing.assert_close(metrics["loss"], expected["loss"], rtol=1e-5, atol=1e-7)
    # The gradient of the one step taken (AdamW's first step, about lr * sign(g), would magnify rounding in g).
    scale = max(parameter.grad.abs().max() for parameter in one_minibatch.model.parameters())
    assert scale > 0
    for (name, parameter), expected_parameter in zip(two_minibatches.model.named_parameters(),
                                                     one_minibatch.model.parameters()):
        torch.testing.assert_close(parameter.grad, expected_parameter.grad, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda m: f"{name}: {m}")


def test_minibatches_that_do_not_divide_the_responses_differ_by_at_most_one(tmp_path):
    """16 responses in 7 minibatches: 7 optimizer steps on 3, 3, 2, 2, 2, 2 and 2 responses, each response once."""
    trainer = Trainer(small_config(tmp_path, minibatches=7, max_grad_norm=1e9))
    rollout, _ = trainer.make_rollout(0)
    assert len(rollout) == 16
    trained = []
    micro_batch_loss = trainer.micro_batch_loss

    def recording(rollout, index, *args):
        trained.append(index.tolist())
        return micro_batch_loss(rollout, index, *args)

    trainer.micro_batch_loss = recording
    trainer.update(rollout, torch.linspace(-1.0, 1.0, len(rollout)), step=0)
    assert [len(index) for index in trained] == [3, 3, 2, 2, 2, 2, 2]
    assert sum(trained, []) == list(range(16))
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 7
