"""The masked image of PAPO's perception loss: random patch blackening, one mask per prompt group.

The image is split into ``cell`` x ``cell`` pixel cells and each cell is set to
black independently with probability ``probability`` (0.6 in the paper), so the
masked fraction varies from prompt to prompt. The image keeps its size, so the
masked pass has the clean pass's tokens and positions.

Two ways to apply a mask: on the raw image before the processor
(``mask_image``), or on the processor's ``pixel_values`` (``mask_pixel_values``),
which must follow Qwen2-VL's patch order and fill with the normalised value of
black (0 after normalisation is mean grey, not black).

The batch functions ``mask_images_by_group`` and ``mask_pixel_values_by_group``
give every sample of one group (the G responses of a prompt) the same mask and
different groups independent masks. Each group's mask is drawn from a generator
seeded by ``(seed, group_id)`` alone, so processes that hold different responses
of one prompt draw the same mask without communicating.

Pillow is imported only by the functions that handle raw images.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._checks import check_int, check_int_tensor, check_number, check_shape


def group_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``(seed, *keys)`` (non-negative ints), well mixed by NumPy's SeedSequence.

    The same arguments give the same generator in every process.
    """
    seed = check_int("seed", seed, low=0)
    keys = [check_int(f"keys[{index}]", key, low=0) for index, key in enumerate(keys)]
    state = np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def random_cell_mask(height: int, width: int, cell: int, probability: float, generator: torch.Generator) -> Tensor:
    """``(ceil(height / cell), ceil(width / cell))`` bool tensor, True where the cell is blackened."""
    rows, cols = -(-height // cell), -(-width // cell)
    return torch.rand(rows, cols, generator=generator) < probability


def as_rgb(image):
    """The PIL ``image`` in RGB as transformers' image processors make it (``image_transforms.convert_to_rgb``).

    An image with transparency (an alpha band, or a palette's transparent index) is composited over
    white; ``image.convert("RGB")`` alone would drop the alpha and keep the stored colour, often black.
    """
    from PIL import Image

    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def mask_image(image, cell_mask: Tensor, cell: int):
    """A copy of the PIL ``image`` in RGB (``as_rgb``, as the image processor sees it) with the cells marked in
    ``cell_mask`` set to black."""
    from PIL import Image

    pixels = np.array(as_rgb(image))
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
    fill = black.to(device=pixel_values.device, dtype=pixel_values.dtype).repeat_interleave(
        pixel_values.shape[1] // channels)
    start = 0
    for (frames, grid_h, grid_w), cell_mask in zip(image_grid_thw.tolist(), cell_masks):
        if tuple(cell_mask.shape) != (grid_h, grid_w):
            raise ValueError(f"cell_masks: a mask for a {grid_h} x {grid_w} patch grid must have that shape, "
                             f"got {tuple(cell_mask.shape)}")
        rows = qwen2vl_patch_rows(grid_h, grid_w, merge_size)[cell_mask].to(pixel_values.device)
        for frame in range(frames):
            masked[start + frame * grid_h * grid_w + rows] = fill
        start += frames * grid_h * grid_w
    return masked


def _check_groups(group_ids: Sequence[int], num_samples: int, seed: int, probability: float) -> List[int]:
    """The group ids as ints, after the checks of the batch functions' shared arguments."""
    if len(group_ids) != num_samples:
        raise ValueError(f"group_ids: need one group id per sample ({num_samples}), got {len(group_ids)}")
    check_int("seed", seed, low=0)
    check_number("probability", probability, low=0.0, high=1.0)
    return [check_int(f"group_ids[{index}]", group, low=0) for index, group in enumerate(group_ids)]


def _check_same_within_group(group_ids: Sequence[int], layouts: Sequence, what: str) -> None:
    """Samples of one group must hold the same images (they are copies of one prompt)."""
    first: Dict[int, Tuple[int, object]] = {}
    for index, (group, layout) in enumerate(zip(group_ids, layouts)):
        seen = first.setdefault(group, (index, layout))
        if seen[1] != layout:
            raise ValueError(f"group_ids: samples {seen[0]} and {index} share group {group} but their images have "
                             f"different {what} ({seen[1]} and {layout}); a group is the copies of one prompt")


def mask_images_by_group(images: Sequence, group_ids: Sequence[int], seed: int, *, probability: float = 0.6,
                         cell: int = 14) -> List[List]:
    """Masked copies of raw PIL images, one mask per image of a group, shared by the group's samples.

    Args:
        images: one entry per sample: a PIL image or a list of them.
        group_ids: ``(num_samples,)`` non-negative ints; samples with the same id (the responses of one
            prompt) get the same masks, wherever they are processed.
        seed: non-negative int; change it each rollout for fresh masks.
        probability: chance that a cell is blackened, in [0, 1].
        cell: cell side in pixels (14 in the paper).

    Returns:
        One list of masked images per sample; the inputs are left untouched.
    """
    group_ids = _check_groups(group_ids, len(images), seed, probability)
    cell = check_int("cell", cell, low=1)
    per_sample = [list(sample) if isinstance(sample, (list, tuple)) else [sample] for sample in images]
    _check_same_within_group(group_ids, [[image.size for image in sample] for sample in per_sample], "sizes")
    masked = []
    for sample, group in zip(per_sample, group_ids):
        generator = group_generator(seed, group)
        masked.append([mask_image(image, random_cell_mask(image.height, image.width, cell, probability, generator),
                                  cell) for image in sample])
    return masked


def mask_pixel_values_by_group(pixel_values: Tensor, image_grid_thw: Tensor, group_ids: Sequence[int], seed: int,
                               image_processor, *, images_per_sample: Optional[Sequence[int]] = None,
                               probability: float = 0.6) -> Tensor:
    """A copy of Qwen-VL ``pixel_values`` with random patches set to black, one mask per group.

    A cell is one vision patch (``image_processor.patch_size`` pixels, 14 for Qwen2-VL and
    Qwen2.5-VL); rows follow the processor's merge-block order and take the normalised value of
    black from ``image_processor.image_mean`` and ``image_std``.

    Args:
        pixel_values: ``(rows, features)`` the processor's output for the batch's images.
        image_grid_thw: ``(num_images, 3)`` each image's (frames, grid_h, grid_w).
        group_ids: one non-negative int per sample; samples with the same id get the same masks.
        seed: non-negative int; change it each rollout for fresh masks.
        image_processor: the Qwen-VL image processor that made ``pixel_values`` (reads
            ``merge_size``, ``image_mean``, ``image_std``).
        images_per_sample: images of each sample, in order; None means one each.
        probability: chance that a patch is blackened, in [0, 1].
    """
    counts = [1] * len(group_ids) if images_per_sample is None else \
        [check_int(f"images_per_sample[{index}]", count, low=0) for index, count in enumerate(images_per_sample)]
    group_ids = _check_groups(group_ids, len(counts), seed, probability)
    check_int_tensor("image_grid_thw", image_grid_thw)
    check_shape("image_grid_thw", image_grid_thw, (*image_grid_thw.shape[:1], 3), "(num_images, 3)")
    if sum(counts) != image_grid_thw.shape[0]:
        if images_per_sample is None:
            raise ValueError(f"group_ids: {len(counts)} samples of one image each, but image_grid_thw has "
                             f"{image_grid_thw.shape[0]} images (give images_per_sample for several per sample)")
        raise ValueError(f"images_per_sample: the samples hold {sum(counts)} images, but image_grid_thw has "
                         f"{image_grid_thw.shape[0]} rows")
    if image_grid_thw.prod(-1).sum().item() != pixel_values.shape[0]:
        raise ValueError(f"pixel_values: image_grid_thw describes {image_grid_thw.prod(-1).sum().item()} patch rows, "
                         f"got {pixel_values.shape[0]}")
    grids = torch.split(image_grid_thw, counts)
    _check_same_within_group(group_ids, [grid.tolist() for grid in grids], "patch grids")
    cell_masks = []
    for grid, group in zip(grids, group_ids):
        generator = group_generator(seed, group)
        cell_masks += [random_cell_mask(h, w, 1, probability, generator) for _, h, w in grid.tolist()]
    black = normalised_black(image_processor.image_mean, image_processor.image_std)
    return mask_pixel_values(pixel_values, image_grid_thw, cell_masks, image_processor.merge_size, black)
