"""Masking transparent images: the masked image keeps the clean image's colours, as the image processor makes them.

transformers' image processors composite transparency over white (``convert_to_rgb``); a masked image made by
dropping the alpha channel instead would turn transparent pixels black and differ from the clean image everywhere
they are, not only in the masked cells.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from papo_kernels.masking import mask_image, mask_images_by_group
from papo_kernels.trainer.data import Example
from papo_kernels.trainer.rollout import encode_prompts, masked_pixel_values
from papo_kernels.trainer.tiny_model import build_processor

SIZE = 56
PATCH = 14


def half_transparent_rgba() -> Image.Image:
    """Random colours, the left half fully transparent and stored as (0, 0, 0, 0) (as most PNG encoders do), one
    column half transparent."""
    pixels = np.random.default_rng(0).integers(30, 256, size=(SIZE, SIZE, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[:, : SIZE // 2] = 0
    pixels[:, SIZE // 2, 3] = 128
    return Image.fromarray(pixels, "RGBA")


def transparent_images():
    """The modes that carry transparency: RGBA, LA, and a palette with a transparent index."""
    rgba = half_transparent_rgba()
    palette = rgba.convert("RGB").quantize(colors=16)
    palette.info["transparency"] = 0
    return {"RGBA": rgba, "LA": rgba.convert("LA"), "P": palette}


@pytest.fixture(scope="module")
def processor():
    return build_processor(["what"], SIZE)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_an_empty_mask_gives_the_image_as_transformers_converts_it(mode):
    image = transparent_images()[mode]
    unmasked = np.array(mask_image(image, torch.zeros(SIZE // PATCH, SIZE // PATCH, dtype=torch.bool), PATCH))
    np.testing.assert_array_equal(unmasked, convert_to_rgb(image, return_numpy=True))


def test_masked_cells_are_black_where_the_image_is_transparent():
    cells = torch.zeros(SIZE // PATCH, SIZE // PATCH, dtype=torch.bool)
    cells[0, 0] = cells[3, 3] = True
    masked = np.array(mask_image(half_transparent_rgba(), cells, PATCH))
    assert (masked[:PATCH, :PATCH] == 0).all() and (masked[-PATCH:, -PATCH:] == 0).all()
    np.testing.assert_array_equal(masked[PATCH:, :PATCH], 255)  # transparent and unmasked: white


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_batch_masking_with_probability_0_gives_the_clean_pixel_values(processor, mode):
    image = transparent_images()[mode]
    clean = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    masked_images = mask_images_by_group([image], [0], seed=0, probability=0.0)[0]
    masked = processor.image_processor(images=masked_images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(masked, clean, rtol=0, atol=0)


def test_slim_trainer_masking_with_probability_0_gives_the_clean_pixel_values(processor):
    examples = [Example(image, "what", "what") for image in transparent_images().values()]
    prompt = encode_prompts(processor, examples)
    masked = masked_pixel_values(processor, examples, prompt, "image", PATCH, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(masked, prompt["pixel_values"], rtol=0, atol=0)

