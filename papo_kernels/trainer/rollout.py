"""Rollouts: the prompts' clean and masked inputs, G sampled responses per prompt, and their masks.

Every prompt holds exactly one image. Sequences are the rows of ``input_ids``;
the image of sequence i is the i-th block of ``pixel_values`` (its patches, as
many rows as ``image_grid_thw[i].prod()``), so selecting or repeating sequences
selects or repeats whole blocks (never rows of ``pixel_values`` one by one).
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from .data import Example
from ..masking import mask_image, mask_pixel_values, normalised_black, random_cell_mask

Inputs = Dict[str, Tensor]


@dataclass
class Rollout:
    """G responses for each of B prompts, N = B * G rows: response g of prompt p is row p * G + g."""
    prompt: Inputs  # processor outputs of the clean prompts, one row per response
    masked_pixel_values: Tensor  # pixel_values of the masked images, blocks in the order of prompt's
    completion_ids: Tensor  # (N, T), padding where completion_mask is 0
    completion_mask: Tensor  # (N, T) bool: the response's tokens up to and including its end-of-turn token
    position_ids: Tensor  # (3, N, P + T) M-RoPE positions of prompt + response, shared by clean and masked passes
    texts: List[str]  # decoded responses
    answers: List[str]  # the known answer of each response's prompt

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


def take_blocks(pixel_values: Tensor, image_grid_thw: Tensor, index: Tensor) -> Tensor:
    """The patch blocks of images ``index`` of ``pixel_values``, in that order."""
    blocks = torch.split(pixel_values, image_grid_thw.prod(-1).tolist())
    return torch.cat([blocks[i] for i in index.tolist()])


def take_sequences(inputs: Inputs, index: Tensor) -> Inputs:
    """The sequences ``index`` of ``inputs`` (a processor output with one image per sequence), in that order."""
    grid = inputs["image_grid_thw"]
    if grid.shape[0] != inputs["input_ids"].shape[0]:
        raise ValueError(f"expected one image per prompt, got {grid.shape[0]} images for "
                         f"{inputs['input_ids'].shape[0]} prompts")
    taken = {key: value[index] for key, value in inputs.items() if key != "pixel_values"}
    taken["pixel_values"] = take_blocks(inputs["pixel_values"], grid, index)
    return taken


def encode_prompts(processor, examples: Sequence[Example]) -> Inputs:
    """Processor inputs of the clean prompts (left-padded), one image each."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.question}]}],
        add_generation_prompt=True, tokenize=False) for example in examples]
    encoded = processor(images=[example.image for example in examples], text=texts, padding=True,
                        padding_side="left", return_tensors="pt")
    return dict(encoded)


def masked_pixel_values(processor, examples: Sequence[Example], prompt: Inputs, mask_target: str, mask_cell: int,
                        mask_probability: float, generator: torch.Generator) -> Tensor:
    """``pixel_values`` of the prompts' masked images, one random mask per prompt.

    ``mask_target="image"`` blackens cells of the raw image and runs the image processor;
    ``"pixel_values"`` blackens patches of ``prompt["pixel_values"]`` in Qwen2-VL's order.
    """
    image_processor = processor.image_processor
    if mask_target == "image":
        masked_images = [mask_image(example.image, random_cell_mask(example.image.height, example.image.width,
                                                                    mask_cell, mask_probability, generator),
                                    mask_cell) for example in examples]
        return image_processor(images=masked_images, return_tensors="pt")["pixel_values"]
    cell_masks = [random_cell_mask(h, w, 1, mask_probability, generator)
                  for _, h, w in prompt["image_grid_thw"].tolist()]
    return mask_pixel_values(prompt["pixel_values"], prompt["image_grid_thw"], cell_masks, image_processor.merge_size,
                             normalised_black(image_processor.image_mean, image_processor.image_std))


def completion_mask_until_eos(completion_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """True for the tokens up to and including the first end-of-sequence token of each row."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    return (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0


def mrope_positions(model, prompt: Inputs, completion_length: int) -> Tensor:
    """``(3, B, P + completion_length)`` M-RoPE positions of the prompts followed by a text response.

    The model computes the prompts' positions (image tokens get 3-D ones); the response is
    text, so its positions continue from the prompt's largest by 1 per token on all three
    axes. One pass over the B prompts instead of one per response and per forward.
    """
    positions, _ = model.model.get_rope_index(
        input_ids=prompt["input_ids"], mm_token_type_ids=prompt["mm_token_type_ids"],
        image_grid_thw=prompt["image_grid_thw"], attention_mask=prompt["attention_mask"])
    start = positions.amax(dim=(0, 2)) + 1
    response = start[:, None] + torch.arange(completion_length, device=positions.device)
    return torch.cat([positions, response[None].expand(3, -1, -1)], dim=2)


@torch.no_grad()
def generate(model, prompt: Inputs, *, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
             suppress_ids: Sequence[int], eos_ids: Sequence[int], pad_id: int) -> Tensor:
    """``(N, T)`` generated ids after the prompts (T <= max_new_tokens).

    Sampling draws from softmax(logits / temperature) over the unsuppressed tokens (top_p
    aside); top_k and the repetition penalty that a model's generation config may set are
    turned off, since the loss scores responses under exactly that distribution.
    """
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample \
        else dict(do_sample=False, temperature=None, top_p=None)
    output = model.generate(**prompt, max_new_tokens=max_new_tokens, suppress_tokens=list(suppress_ids),
                            eos_token_id=list(eos_ids), pad_token_id=pad_id, top_k=None, repetition_penalty=1.0,
                            **sampling)
    return output[:, prompt["input_ids"].shape[1]:]


def roll_out(model, processor, examples: Sequence[Example], group_size: int, masked: Tensor, prompt: Inputs, *,
             max_new_tokens: int, temperature: float, top_p: float, suppress_ids: Sequence[int],
             eos_ids: Sequence[int], pad_id: int) -> Rollout:
    """Sample ``group_size`` responses per prompt; ``masked`` (the prompts' masked ``pixel_values``) is
    repeated alike, so the G responses of a prompt share its masked image."""
    repeat = torch.arange(len(examples)).repeat_interleave(group_size)
    masked = take_blocks(masked, prompt["image_grid_thw"], repeat)
    unique_prompts, prompt = prompt, take_sequences(prompt, repeat)
    completion_ids = generate(model, prompt, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                              top_p=top_p, suppress_ids=suppress_ids, eos_ids=eos_ids, pad_id=pad_id)
    position_ids = mrope_positions(model, unique_prompts, completion_ids.shape[1])[:, repeat]
    completion_mask = completion_mask_until_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_id)
    texts = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt=prompt, masked_pixel_values=masked, completion_ids=completion_ids,
                   completion_mask=completion_mask, position_ids=position_ids, texts=texts,
                   answers=[examples[i].answer for i in repeat.tolist()])
