"""``completion_hidden_states``, ``gathered_head`` and ``papo_loss`` under DeepSpeed ZeRO-3, two CPU processes.

Run by test_zero3.py under torchrun (``DS_ACCELERATOR=cpu``, gloo). For each tiny model (Qwen2-VL with its own
head, Qwen2.5-VL whose head is tied to the input embeddings), every process takes its own batch and, twice, runs
the clean and the masked pass in one forward, gathers the head, computes papo_loss and runs the engine's
backward and an SGD step inside the gather. Against one process without DeepSpeed (a copy of the model taken
before ``deepspeed.initialize``, which partitions the model in place): each process's loss, the averaged
gradients of the head and of two backbone weights (read before the step), and every weight after both steps.
Then the misuses: ``output_head`` outside the gather, and a backward after the gather ended. Process 0 writes
``OUTPUT_DIR/result.pt``.
"""

import copy
import random
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from papo_kernels import papo_loss
from papo_kernels.hidden_states import completion_hidden_states, gathered_head, output_head
from papo_kernels.trainer.data import synthetic_example, synthetic_words
from papo_kernels.trainer.rollout import encode_prompts
from papo_kernels.trainer.tiny_model import build_model, build_processor
from zero3_setup import skip_shared_memory_op_build

SAMPLES, COMPLETION, STEPS = 2, 3, 2
BACKBONE = ("model.visual.patch_embed.proj.weight", "model.language_model.layers.0.mlp.up_proj.weight")
DEEPSPEED_CONFIG = {
    "train_micro_batch_size_per_gpu": SAMPLES,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every parameter partitioned
    "zero_allow_untested_optimizer": True,  # torch's SGD
    "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told
}


def batch(processor, rank: int):
    """Process ``rank``'s inputs: prompts and random answer words, their masked copy (half the patch rows zero),
    the completion ids and advantages."""
    rng = random.Random(rank)
    prompt = encode_prompts(processor, [synthetic_example("color", rng, 56) for _ in range(SAMPLES)])
    words = torch.tensor(processor.tokenizer.convert_tokens_to_ids(["red", "blue", "green"]))
    generator = torch.Generator().manual_seed(rank)
    completion = words[torch.randint(0, 3, (SAMPLES, COMPLETION), generator=generator)]
    clean = dict(prompt)
    clean["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    clean["attention_mask"] = torch.cat([prompt["attention_mask"], torch.ones_like(completion)], dim=1)
    clean["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    masked_pixels = prompt["pixel_values"].clone()
    masked_pixels[::2] = 0.0
    joint = {key: torch.cat([value, {**clean, "pixel_values": masked_pixels}[key]]) for key, value in clean.items()}
    advantages = torch.randn(SAMPLES, generator=generator)
    return joint, completion, advantages


def loss_of(weight, bias, hidden, completion, advantages):
    hidden, hidden_masked = hidden.chunk(2)
    return papo_loss(hidden, weight, completion, torch.ones_like(completion, dtype=torch.bool), advantages,
                     hidden_masked=hidden_masked, bias=bias, gamma=0.5, eta_clean=0.1, eta_masked=0.1)[0]


def check_model(model_type: str, processor, rank: int, world: int) -> dict:
    model = build_model(processor.tokenizer, seed=0, model_type=model_type)
    reference = copy.deepcopy(model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=DEEPSPEED_CONFIG)
    head = engine.module.get_output_embeddings().weight
    batches = [batch(processor, index) for index in range(world)]
    inputs, completion, advantages = batches[rank]
    names = ("lm_head.weight",) + BACKBONE
    steps = []
    for _ in range(STEPS):
        hidden = completion_hidden_states(engine, inputs, COMPLETION)  # the model's forward before the gather
        partitioned_after_forward = tuple(head.shape) == (0,)
        with gathered_head(engine) as (weight, bias):
            loss = loss_of(weight, bias, hidden, completion, advantages)
            engine.backward(loss)
            grads = {name: safe_get_full_grad(engine.module.get_parameter(name)).clone() for name in names}
            engine.step()

        # One process, no DeepSpeed: each batch's loss, the mean of the losses (DeepSpeed averages gradients),
        # and SGD's step.
        reference.zero_grad()
        losses = []
        for other_inputs, other_completion, other_advantages in batches:
            other_hidden = completion_hidden_states(reference, other_inputs, COMPLETION)
            other_weight, other_bias = output_head(reference)
            losses.append(loss_of(other_weight, other_bias, other_hidden, other_completion, other_advantages))
        (sum(losses) / world).backward()
        with torch.no_grad():
            for parameter in reference.parameters():
                parameter -= parameter.grad
        steps.append({"partitioned_after_forward": partitioned_after_forward, "loss": loss.detach(),
                      "expected_loss": losses[rank].detach(), "grads": grads,
                      "expected_grads": {name: reference.get_parameter(name).grad.clone() for name in names}})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        after = {name: parameter.detach().clone() for name, parameter in engine.module.named_parameters()}
    return {"tied": head is engine.module.get_input_embeddings().weight, "steps": steps, "after": after,
            "expected_after": {name: parameter.detach().clone() for name, parameter in reference.named_parameters()},
            "misuses": misuses(engine, batches[rank])}


def misuses(engine, rank_batch) -> dict:
    """The errors of the two misuses, as text; each ran on every process alike."""
    inputs, completion, advantages = rank_batch
    errors = {}
    try:
        output_head(engine)
    except ValueError as error:
        errors["outside"] = str(error)
    hidden = completion_hidden_states(engine, inputs, COMPLETION)
    with gathered_head(engine) as (weight, bias):
        loss = loss_of(weight, bias, hidden, completion, advantages)
    try:
        engine.backward(loss)
    except RuntimeError as error:
        errors["released"] = str(error)
    return errors


def main(output_dir: str) -> None:
    skip_shared_memory_op_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    processor = build_processor(synthetic_words(["color"]), 56)
    results = {model_type: check_model(model_type, processor, rank, world) for model_type in ("qwen2_vl",
                                                                                              "qwen2_5_vl")}
    if rank == 0:
        torch.save({"world": world, "results": results}, Path(output_dir) / "result.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
