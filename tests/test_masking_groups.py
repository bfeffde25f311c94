"""Batch masking with group-shared masks: papo_kernels.masking.mask_images_by_group and mask_pixel_values_by_group."""

import numpy as np
import pytest
import torch
from PIL import Image

from papo_kernels.masking import (group_generator, mask_image, mask_images_by_group, mask_pixel_values_by_group,
                                  normalised_black, qwen2vl_patch_rows, random_cell_mask)
from papo_kernels.trainer.tiny_model import build_processor

PATCH = 14


def noise_image(seed: int, height: int = 56, width: int = 84) -> Image.Image:
    """Random colours in [30, 255], so no pixel is black before masking."""
    pixels = np.random.default_rng(seed).integers(30, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_processor():
    return build_processor(["what"], 56).image_processor


def black_cells(image: Image.Image) -> np.ndarray:
    """(rows, cols) bool: which 14 x 14 cells of ``image`` are entirely black."""
    pixels = np.array(image)
    h, w = pixels.shape[0] // PATCH, pixels.shape[1] // PATCH
    return (pixels[: h * PATCH, : w * PATCH].reshape(h, PATCH, w, PATCH, 3) == 0).all(axis=(1, 3, 4))


def test_group_generator_depends_on_every_key_only():
    draw = lambda *key: torch.rand(4, generator=group_generator(*key))  # noqa: E731
    torch.testing.assert_close(draw(7, 3, 5), draw(7, 3, 5), rtol=0, atol=0)
    for other in [(8, 3, 5), (7, 4, 5), (7, 3, 6), (7, 3)]:
        assert not torch.equal(draw(7, 3, 5), draw(*other)), other


@pytest.mark.parametrize("bad, error, message", [(-1, ValueError, r"keys\[0\] must be an int in \[0, inf\], got -1"),
                                                 (1.5, TypeError, r"keys\[0\] must be an int, got 1.5"),
                                                 (True, TypeError, r"keys\[0\] must be an int, got True"),
                                                 ("3", TypeError, r"keys\[0\] must be an int, got '3'")])
def test_group_generator_rejects_bad_keys(bad, error, message):
    with pytest.raises(error, match=message):
        group_generator(0, bad)


def test_numpy_and_tensor_integers_are_ints_like_python_ones():
    images = [noise_image(0)] * 2 + [noise_image(1)] * 2
    want = mask_images_by_group(images, [0, 0, 1, 1], seed=3, cell=14)
    got = mask_images_by_group(images, torch.tensor([0, 0, 1, 1]), seed=np.int64(3), cell=np.int64(14))
    assert [[np.array(image).tobytes() for image in sample] for sample in got] == \
        [[np.array(image).tobytes() for image in sample] for sample in want]
    with pytest.raises(TypeError, match="cell must be an int, got 14.0"):
        mask_images_by_group(images, [0, 0, 1, 1], seed=3, cell=14.0)


def test_images_share_a_mask_within_a_group_and_differ_between_groups():
    images = [noise_image(0)] * 3 + [noise_image(1)] * 3  # two prompts, three responses each
    groups = [0, 0, 0, 1, 1, 1]
    masked = mask_images_by_group(images, groups, seed=11, probability=0.6)
    assert [len(sample) for sample in masked] == [1] * 6
    cells = [black_cells(sample[0]) for sample in masked]
    for index in (1, 2):
        np.testing.assert_array_equal(np.array(masked[index][0]), np.array(masked[0][0]))
        np.testing.assert_array_equal(np.array(masked[3 + index][0]), np.array(masked[3][0]))
    assert not np.array_equal(cells[0], cells[3]), "different prompts draw different masks"
    # Each masked image is the clean one with exactly the drawn cells blackened, so masks never compound.
    expected = random_cell_mask(56, 84, PATCH, 0.6, group_generator(11, 0))
    np.testing.assert_array_equal(cells[0], expected.numpy())
    np.testing.assert_array_equal(np.array(masked[0][0]), np.array(mask_image(images[0], expected, PATCH)))
    assert np.array(images[0]).min() >= 30, "the clean image must stay untouched"


def test_images_masks_change_with_the_seed_and_cover_the_probability():
    images = [noise_image(0, 560, 560)]
    fractions = [black_cells(mask_images_by_group(images, [0], seed=seed)[0][0]).mean() for seed in range(4)]
    assert len(set(fractions)) == 4
    # 1600 cells per image: the standard error of one fraction is 0.012.
    assert all(abs(fraction - 0.6) < 0.05 for fraction in fractions), fractions


def test_images_several_per_sample_get_their_own_masks():
    samples = [[noise_image(0), noise_image(1)], [noise_image(0), noise_image(1)]]
    masked = mask_images_by_group(samples, [4, 4], seed=0)
    assert [len(sample) for sample in masked] == [2, 2]
    assert not np.array_equal(black_cells(masked[0][0]), black_cells(masked[0][1]))
    for k in range(2):
        np.testing.assert_array_equal(np.array(masked[0][k]), np.array(masked[1][k]))


def test_pixel_values_share_a_mask_within_a_group(image_processor):
    images = [noise_image(0, 56, 56)] * 2 + [noise_image(1, 56, 56)] * 2
    clean = image_processor(images=images, return_tensors="pt")
    groups = [5, 5, 9, 9]
    masked = mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], groups, 3, image_processor)
    blocks, clean_blocks = masked.view(4, 16, -1), clean["pixel_values"].view(4, 16, -1)
    black = normalised_black(image_processor.image_mean, image_processor.image_std)
    is_black = (blocks.view(4, 16, 3, -1) == black[None, None, :, None]).all(-1).all(-1)
    torch.testing.assert_close(blocks[1], blocks[0], rtol=0, atol=0)
    torch.testing.assert_close(blocks[3], blocks[2], rtol=0, atol=0)
    assert not torch.equal(is_black[0], is_black[2])
    # Every row is either the clean one or black: the exact cells of the group's generator, in patch order.
    expected = random_cell_mask(4, 4, 1, 0.6, group_generator(3, 5))
    rows = qwen2vl_patch_rows(4, 4, image_processor.merge_size)
    torch.testing.assert_close(is_black[0][rows], expected, rtol=0, atol=0)
    torch.testing.assert_close(blocks[0][~is_black[0]], clean_blocks[0][~is_black[0]], rtol=0, atol=0)


def test_pixel_values_match_masking_the_raw_image(image_processor):
    """A patch is a 14 x 14 cell: both targets give the same pixel_values for the same group and seed."""
    images = [noise_image(2, 56, 56), noise_image(2, 56, 56)]
    clean = image_processor(images=images, return_tensors="pt")
    via_pixels = mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], [1, 1], 8,
                                            image_processor)
    via_images = image_processor(images=[sample[0] for sample in mask_images_by_group(images, [1, 1], 8)],
                                 return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(via_pixels, via_images, rtol=0, atol=1e-6)


def test_pixel_values_several_images_per_sample(image_processor):
    images = [noise_image(0, 56, 56), noise_image(1, 28, 56), noise_image(0, 56, 56), noise_image(1, 28, 56)]
    clean = image_processor(images=images, return_tensors="pt")
    masked = mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], [0, 0], 1, image_processor,
                                        images_per_sample=[2, 2], probability=1.0)
    black = normalised_black(image_processor.image_mean, image_processor.image_std)
    assert (masked.view(-1, 3, masked.shape[1] // 3) == black[None, :, None]).all()


def test_bad_arguments_are_named(image_processor):
    clean = image_processor(images=[noise_image(0, 56, 56), noise_image(1, 28, 56)], return_tensors="pt")
    with pytest.raises(ValueError, match="group_ids: 1 samples of one image each"):
        mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], [0], 0, image_processor)
    with pytest.raises(ValueError, match="group_ids: need one group id per sample"):
        mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], [0], 0, image_processor,
                                   images_per_sample=[1, 1])
    with pytest.raises(ValueError, match="group_ids: samples 0 and 1 share group 0"):
        mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], [0, 0], 0, image_processor)
    with pytest.raises(ValueError, match="images_per_sample"):
        mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"], [0, 1], 0, image_processor,
                                   images_per_sample=[1, 2])
    with pytest.raises(ValueError, match="probability"):
        mask_images_by_group([noise_image(0)], [0], 0, probability=1.5)
    with pytest.raises(ValueError, match="group_ids\\[0\\]"):
        mask_images_by_group([noise_image(0)], [-2], 0)
    with pytest.raises(ValueError, match="cell"):
        mask_images_by_group([noise_image(0)], [0], 0, cell=0)
    with pytest.raises(TypeError, match="image_grid_thw must be an integer tensor, got dtype torch.float32"):
        mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"].float(), [0, 1], 0, image_processor)
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \(2, 3\)"):
        mask_pixel_values_by_group(clean["pixel_values"], clean["image_grid_thw"][:, :2], [0, 1], 0, image_processor)
