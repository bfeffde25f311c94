"""The masked image: cell fraction, exact cells, one mask per prompt, and Qwen2-VL's patch order."""

import numpy as np
import pytest
import torch
from PIL import Image

from papo_kernels.masking import (mask_image, mask_pixel_values, normalised_black, qwen2vl_patch_rows,
                                  random_cell_mask)
from papo_kernels.trainer.rollout import encode_prompts, masked_pixel_values, roll_out
from papo_kernels.trainer.tiny_model import build_processor

PATCH = 14


def coordinate_image(grid_h: int, grid_w: int) -> Image.Image:
    """Every 14 x 14 cell is uniform, red = 20 * row + 5, green = 20 * column + 5."""
    pixels = np.zeros((grid_h * PATCH, grid_w * PATCH, 3), dtype=np.uint8)
    for row in range(grid_h):
        for col in range(grid_w):
            pixels[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH] = (20 * row + 5, 20 * col + 5, 0)
    return Image.fromarray(pixels)


def processor_for(height: int, width: int):
    processor = build_processor(["what"], 56)
    processor.image_processor.size = {"shortest_edge": height * width, "longest_edge": height * width}
    return processor.image_processor


@pytest.mark.parametrize("probability", [0.0, 0.3, 0.6, 1.0])
def test_masked_fraction_matches_probability(probability):
    generator = torch.Generator().manual_seed(0)
    cells = random_cell_mask(1400, 1400, PATCH, probability, generator)
    assert cells.shape == (100, 100)
    # 10,000 independent cells: the standard error of the fraction is at most 0.005.
    assert abs(cells.float().mean().item() - probability) < 0.02


def test_partial_cells_at_the_border_count():
    cells = random_cell_mask(30, 15, PATCH, 1.0, torch.Generator().manual_seed(0))
    assert cells.shape == (3, 2)


def test_mask_image_blackens_exactly_the_marked_cells():
    image = Image.fromarray(np.full((28, 42, 3), 200, dtype=np.uint8))
    cells = torch.tensor([[True, False, False], [False, False, True]])
    masked = np.array(mask_image(image, cells, PATCH))
    expected = np.full((28, 42, 3), 200, dtype=np.uint8)
    expected[:14, :14] = 0
    expected[14:, 28:] = 0
    np.testing.assert_array_equal(masked, expected)
    assert np.array(image).min() == 200, "the clean image must stay untouched"


def test_patch_rows_follow_the_processor_order():
    """Decode each pixel_values row of a coordinate-coded image back to its (row, column)."""
    grid_h, grid_w = 4, 6
    image_processor = processor_for(grid_h * PATCH, grid_w * PATCH)
    out = image_processor(images=[coordinate_image(grid_h, grid_w)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, grid_h, grid_w]]
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    # Row layout (channel, time, 14, 14): the first value of each channel block.
    first = out["pixel_values"].view(grid_h * grid_w, 3, -1)[:, :, 0]
    rgb = torch.round((first * std + mean) * 255)
    decoded_row, decoded_col = (rgb[:, 0] - 5) / 20, (rgb[:, 1] - 5) / 20
    rows = qwen2vl_patch_rows(grid_h, grid_w, merge_size=2)
    for r in range(grid_h):
        for c in range(grid_w):
            assert (decoded_row[rows[r, c]].item(), decoded_col[rows[r, c]].item()) == (r, c)
    # Raster order would be wrong: patch (0, 2) is row 4 (second merge block), not row 2.
    assert rows[0, 2].item() == 4 and rows[1, 0].item() == 2


def test_pixel_masking_equals_masking_the_image():
    grid_h, grid_w = 4, 6
    image_processor = processor_for(grid_h * PATCH, grid_w * PATCH)
    image = coordinate_image(grid_h, grid_w)
    cells = random_cell_mask(grid_h * PATCH, grid_w * PATCH, PATCH, 0.5, torch.Generator().manual_seed(3))
    assert 0 < cells.sum() < cells.numel()
    clean = image_processor(images=[image], return_tensors="pt")
    via_image = image_processor(images=[mask_image(image, cells, PATCH)], return_tensors="pt")["pixel_values"]
    via_pixels = mask_pixel_values(clean["pixel_values"], clean["image_grid_thw"], [cells], 2,
                                   normalised_black(image_processor.image_mean, image_processor.image_std))
    torch.testing.assert_close(via_pixels, via_image, rtol=0, atol=1e-6)
    assert not torch.equal(via_pixels, clean["pixel_values"])


def test_normalised_black_is_what_the_processor_makes_of_black():
    image_processor = processor_for(28, 28)
    black = image_processor(images=[Image.new("RGB", (28, 28))], return_tensors="pt")["pixel_values"]
    expected = normalised_black(image_processor.image_mean, image_processor.image_std)
    torch.testing.assert_close(black.view(4, 3, -1), expected[None, :, None].expand(4, 3, black.shape[1] // 3),
                               rtol=0, atol=1e-6)
    assert expected.abs().min() > 1.0, "black is far from 0 after normalisation"


@pytest.mark.parametrize("mask_target", ["image", "pixel_values"])
def test_one_mask_shared_by_the_responses_of_a_prompt(small_trainer, mask_target):
    trainer, group = small_trainer, 4
    examples = trainer.dataset.batch(0, 3)
    prompt = encode_prompts(trainer.processor, examples)
    masked = masked_pixel_values(trainer.processor, examples, prompt, mask_target, PATCH, 0.6,
                                 torch.Generator().manual_seed(0))
    rollout = roll_out(trainer.model, trainer.processor, examples, group, masked, prompt, max_new_tokens=2,
                       temperature=1.0, top_p=1.0, suppress_ids=trainer.suppress_ids, eos_ids=trainer.eos_ids,
                       pad_id=trainer.pad_id)
    patches = prompt["image_grid_thw"][0].prod().item()
    blocks = rollout.masked_pixel_values.view(len(examples) * group, patches, -1)
    clean_blocks = rollout.prompt["pixel_values"].view(len(examples) * group, patches, -1)
    for p in range(len(examples)):
        original = masked.view(len(examples), patches, -1)[p]
        for g in range(group):
            assert torch.equal(blocks[p * group + g], original)
            assert torch.equal(clean_blocks[p * group + g], prompt["pixel_values"].view(len(examples), patches, -1)[p])
    assert not torch.equal(blocks[0], blocks[group]), "different prompts get different masks"
