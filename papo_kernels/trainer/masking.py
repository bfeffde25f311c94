"""The masked image of PAPO's perception loss: random patch blackening.

The image is split into ``cell`` x ``cell`` pixel cells and each cell is set to
black independently with probability ``probability`` (0.6 in the paper), so the
masked fraction varies from prompt to prompt. One mask per prompt: all G
responses of a prompt share it. The image keeps its size, so the masked pass has
the clean pass's tokens and positions.

Two ways to apply a mask: on the raw image before the processor
(``mask_image``), or on the processor's ``pixel_values`` (``mask_pixel_values``),
which must follow Qwen2-VL's patch order and fill with the normalised value of
black (0 after normalisation is mean grey, not black).
"""

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def random_cell_mask(height: int, width: int, cell: int, probability: float, generator: torch.Generator) -> Tensor:
    """``(ceil(height / cell), ceil(width / cell))`` bool tensor, True where the cell is blackened."""
    rows, cols = -(-height // cell), -(-width // cell)
    return torch.rand(rows, cols, generator=generator) < probability


def mask_image(image: Image.Image, cell_mask: Tensor, cell: int) -> Image.Image:
    """A copy of ``image`` with the cells marked in ``cell_mask`` set to black."""
    pixels = np.array(image.convert("RGB"))
    pixel_mask = cell_mask.numpy().repeat(cell, axis=0).repeat(cell, axis=1)[: pixels.shape[0], : pixels.shape[1]]
    pixels[pixel_mask] = 0
    return Image.fromarray(pixels)


def qwen2vl_patch_rows(grid_h: int, grid_w: int, merge_size: int) -> Tensor:
    """``(grid_h, grid_w)`` long tensor: the row of ``pixel_values`` that holds patch (r, c) of one image.

    Qwen2-VL's processor orders patches by 2 x 2 merge block, then within a block:
    row = ((r // m) * (grid_w // m) + c // m) * m * m + (r % m) * m + c % m.
    """
    r = torch.arange(grid_h)[:, None]
    c = torch.arange(grid_w)[None, :]
    m = merge_size
    return ((r // m) * (grid_w // m) + c // m) * m * m + (r % m) * m + c % m


def normalised_black(image_mean: Sequence[float], image_std: Sequence[float]) -> Tensor:
    """Per-channel value of a black pixel after the processor's rescale and normalisation."""
    return -torch.tensor(image_mean, dtype=torch.float32) / torch.tensor(image_std, dtype=torch.float32)


def mask_pixel_values(pixel_values: Tensor, image_grid_thw: Tensor, cell_masks: Sequence[Tensor], merge_size: int,
                      black: Tensor) -> Tensor:
    """A copy of Qwen2-VL ``pixel_values`` with the patches marked in ``cell_masks`` set to black.

    Here a cell is one vision patch: ``cell_masks[i]`` has shape ``(grid_h, grid_w)`` of image i.
    Each row of ``pixel_values`` is one patch, flattened as (channel, time, patch_h, patch_w).
    """
    if len(cell_masks) != image_grid_thw.shape[0]:
        raise ValueError(f"cell_masks: need one mask per image ({image_grid_thw.shape[0]}), got {len(cell_masks)}")
    masked = pixel_values.clone()
    channels = black.numel()
    fill = black.to(pixel_values.dtype).repeat_interleave(pixel_values.shape[1] // channels)
    start = 0
    for (frames, grid_h, grid_w), cell_mask in zip(image_grid_thw.tolist(), cell_masks):
        if tuple(cell_mask.shape) != (grid_h, grid_w):
            raise ValueError(f"cell_masks: a mask for a {grid_h} x {grid_w} patch grid must have that shape, "
                             f"got {tuple(cell_mask.shape)}")
        rows = qwen2vl_patch_rows(grid_h, grid_w, merge_size)[cell_mask]
        for frame in range(frames):
            masked[start + frame * grid_h * grid_w + rows] = fill
        start += frames * grid_h * grid_w
    return masked
