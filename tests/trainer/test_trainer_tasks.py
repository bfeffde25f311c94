"""The synthetic tasks' data: answers match the images, the skewed prior has its stated frequency, and PAPO's
masked image hides a small target with the mask probability; the evaluation on masked images."""

import random

import numpy as np
import pytest
import torch

from papo_kernels.trainer import Trainer
from papo_kernels.trainer.data import (ANSWER_WORDS, COLORS, DIM_BRIGHTNESS, MAJORITY_COLOR, MAJORITY_SHARE,
                                       SMALL_SIDES, SYNTHETIC_TASKS, TARGET_CELL, synthetic_example)
from papo_kernels.masking import mask_image, random_cell_mask
from trainer_helpers import small_config

IMAGE_SIZE = 56


def drawn_colors(pixels: np.ndarray) -> set:
    """The distinct colours of the non-black pixels."""
    lit = pixels.reshape(-1, 3)
    return {tuple(int(v) for v in color) for color in np.unique(lit[lit.any(axis=1)], axis=0)}


def lit_box(pixels: np.ndarray):
    rows, cols = np.nonzero(pixels.any(axis=2))
    return rows.min(), rows.max(), cols.min(), cols.max()


def dim(color):
    return tuple(round(DIM_BRIGHTNESS * channel) for channel in color)


@pytest.mark.parametrize("task", ["color", "color_skewed"])
def test_color_answer_is_the_square_color(task):
    rng = random.Random(0)
    for _ in range(200):
        example = synthetic_example(task, rng, IMAGE_SIZE)
        assert drawn_colors(np.array(example.image)) == {COLORS[example.answer]}
        assert example.question == "what color is the square ?"


@pytest.mark.parametrize("task", ["color_small", "color_small_skewed"])
def test_small_target_is_dim_small_and_inside_one_cell(task):
    rng = random.Random(1)
    for _ in range(300):
        example = synthetic_example(task, rng, IMAGE_SIZE)
        pixels = np.array(example.image)
        assert drawn_colors(pixels) == {dim(COLORS[example.answer])}
        top, bottom, left, right = lit_box(pixels)
        side = bottom - top + 1
        assert side == right - left + 1 and SMALL_SIDES[0] <= side <= SMALL_SIDES[1]
        assert pixels.any(axis=2).sum() == side * side  # one filled square
        assert top // TARGET_CELL == bottom // TARGET_CELL and left // TARGET_CELL == right // TARGET_CELL


def test_count_answer_is_the_number_of_lit_quadrants():
    rng, half = random.Random(2), IMAGE_SIZE // 2
    for _ in range(200):
        example = synthetic_example("count", rng, IMAGE_SIZE)
        lit = np.array(example.image).any(axis=2)
        quadrants = sum(bool(lit[r:r + half, c:c + half].any()) for r in (0, half) for c in (0, half))
        assert example.answer == str(quadrants)


def test_compare_answer_says_whether_the_two_squares_share_a_color():
    rng, half = random.Random(3), IMAGE_SIZE // 2
    answers = []
    for _ in range(300):
        example = synthetic_example("compare", rng, IMAGE_SIZE)
        pixels = np.array(example.image)
        lit = pixels.any(axis=2)
        assert sum(bool(lit[r:r + half, c:c + half].any()) for r in (0, half) for c in (0, half)) == 2
        colors = drawn_colors(pixels)
        assert colors <= set(COLORS.values())
        assert example.answer == ("yes" if len(colors) == 1 else "no")
        answers.append(example.answer)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def binomial_bound(probability: float, draws: int) -> float:
    """Four standard deviations of a frequency: a correct generator fails this about once in 16,000 runs."""
    return 4 * (probability * (1 - probability) / draws) ** 0.5


@pytest.mark.parametrize("task", ["color_skewed", "color_small_skewed"])
def test_skewed_prior_has_the_stated_frequency(task):
    draws = 4000
    rng = random.Random(4)
    answers = [synthetic_example(task, rng, IMAGE_SIZE).answer for _ in range(draws)]
    assert abs(answers.count(MAJORITY_COLOR) / draws - MAJORITY_SHARE) < binomial_bound(MAJORITY_SHARE, draws)
    minority = (1 - MAJORITY_SHARE) / (len(COLORS) - 1)
    for color in COLORS:
        if color != MAJORITY_COLOR:
            assert abs(answers.count(color) / draws - minority) < binomial_bound(minority, draws)


@pytest.mark.parametrize("probability", [0.6, 0.3])
def test_masked_image_hides_the_small_target_with_the_mask_probability(probability):
    """The trainer's mask (cells of TARGET_CELL pixels) hides the whole target or none of it."""
    draws = 2000
    rng, generator = random.Random(5), torch.Generator().manual_seed(5)
    hidden = 0
    for _ in range(draws):
        example = synthetic_example("color_small", rng, IMAGE_SIZE)
        target = np.array(example.image).any(axis=2)
        cells = random_cell_mask(IMAGE_SIZE, IMAGE_SIZE, TARGET_CELL, probability, generator)
        masked = np.array(mask_image(example.image, cells, TARGET_CELL)).any(axis=2)
        visible = (masked & target).sum()
        assert visible in (0, target.sum())
        hidden += visible == 0
    assert abs(hidden / draws - probability) < binomial_bound(probability, draws)


def test_every_task_has_its_question_and_answers():
    rng = random.Random(6)
    for task in SYNTHETIC_TASKS:
        example = synthetic_example(task, rng, IMAGE_SIZE)
        assert example.answer in ANSWER_WORDS[task]
    with pytest.raises(ValueError, match="task: got 'colour', expected one of"):
        synthetic_example("colour", rng, IMAGE_SIZE)


def test_evaluate_scores_clean_and_masked_images(tmp_path):
    trainer = Trainer(small_config(tmp_path, tasks=["color_small_skewed"], eval_prompts=12, mask_probability=0.0))
    metrics = trainer.evaluate()
    assert set(metrics) == {"eval_accuracy", "eval_accuracy_masked", "eval_junk", "eval_junk_masked"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert metrics["eval_accuracy"] + metrics["eval_junk"] <= 1.0  # a right answer is never junk
    # Nothing is masked at probability 0: the masked evaluation is the clean one.
    assert metrics["eval_accuracy_masked"] == metrics["eval_accuracy"]
    assert metrics["eval_junk_masked"] == metrics["eval_junk"]
