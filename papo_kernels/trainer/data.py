"""Prompts with a verifiable answer: the built-in synthetic shapes tasks and JSONL data sets.

An ``Example`` is one prompt: an RGB image, a question and the answer a reward can
check. The synthetic tasks draw coloured squares on a black background:

- ``color``: one square of 14-21 px, one of 4 colours drawn uniformly; "what color is the
  square ?". A text-only policy is at chance (1/4).
- ``count``: 1-4 squares, one per quadrant; "how many squares are there ?".
- ``position``: one square in the left or right half; "is the square left or right ?"
  (it does not learn at the tiny model's scale).
- ``color_skewed``: ``color`` with a skewed answer prior: the square is ``MAJORITY_COLOR``
  with probability ``MAJORITY_SHARE`` (0.7), each other colour with 0.1. A policy that
  ignores the image and always answers the majority colour earns 0.7 accuracy; only
  looking earns more (the text-only shortcut PAPO is meant to break).
- ``color_small``: ``color`` with a small, dim target: a square of 4-7 px at
  ``DIM_BRIGHTNESS`` (0.5) of the full colour, inside one cell of the 14 px grid
  (``TARGET_CELL``, the vision patch and the default mask cell). PAPO's masked image
  blackens each such cell with probability ``mask_probability``, so it hides the whole
  target with exactly that probability and otherwise leaves it intact.
- ``color_small_skewed``: the small, dim target with the skewed prior.
- ``compare``: two squares in two different quadrants, the same colour with probability
  1/2; "are the squares the same color ?", answer ``yes`` or ``no``.
"""

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from .errors import TrainerInputError

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40)}
MAJORITY_COLOR = "red"
MAJORITY_SHARE = 0.7  # the frequency of MAJORITY_COLOR in the skewed tasks
DIM_BRIGHTNESS = 0.5  # the small targets' colour, as a fraction of the full one
TARGET_CELL = 14  # a small target lies inside one cell of this grid (the vision patch, the default mask cell)
SMALL_SIDES = (4, 7)  # side range of a small target, pixels
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor (smart_resize) refuses a longer side over 200 times the shorter

COLOR_QUESTION = "what color is the square ?"
QUESTIONS = {
    "color": COLOR_QUESTION,
    "count": "how many squares are there ?",
    "position": "is the square left or right ?",
    "color_skewed": COLOR_QUESTION,
    "color_small": COLOR_QUESTION,
    "color_small_skewed": COLOR_QUESTION,
    "compare": "are the squares the same color ?",
}
ANSWER_WORDS = {
    "color": tuple(COLORS),
    "count": ("1", "2", "3", "4"),
    "position": ("left", "right"),
    "color_skewed": tuple(COLORS),
    "color_small": tuple(COLORS),
    "color_small_skewed": tuple(COLORS),
    "compare": ("yes", "no"),
}
SYNTHETIC_TASKS = tuple(QUESTIONS)


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str


def synthetic_words(tasks: Sequence[str]) -> List[str]:
    """Every word the questions and answers of ``tasks`` use (the tiny tokenizer's vocabulary)."""
    words = []
    for task in tasks:
        words += QUESTIONS[task].split() + list(ANSWER_WORDS[task])
    return list(dict.fromkeys(words))


def _draw_square(draw: ImageDraw.ImageDraw, rng: random.Random, image_size: int, color, x_range) -> None:
    side = rng.randint(image_size // 4, (3 * image_size) // 8)
    left = rng.randint(x_range[0], max(x_range[0], x_range[1] - side))
    top = rng.randint(0, image_size - side)
    draw.rectangle([left, top, left + side - 1, top + side - 1], fill=color)


def _quadrant_box(rng: random.Random, image_size: int, quadrant: int) -> Tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a square small enough to stay inside ``quadrant`` (0-3, row-major),
    so squares in different quadrants never touch."""
    half = image_size // 2
    side = rng.randint(image_size // 8, half // 2)
    left = (quadrant % 2) * half + rng.randint(0, half - side)
    top = (quadrant // 2) * half + rng.randint(0, half - side)
    return left, top, left + side - 1, top + side - 1


def skewed_color(rng: random.Random) -> str:
    """``MAJORITY_COLOR`` with probability ``MAJORITY_SHARE``, otherwise one of the other colours uniformly."""
    if rng.random() < MAJORITY_SHARE:
        return MAJORITY_COLOR
    return rng.choice([color for color in COLORS if color != MAJORITY_COLOR])


def small_target_box(rng: random.Random, image_size: int) -> Tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` (inclusive) of a small square inside one random ``TARGET_CELL`` cell."""
    cells = image_size // TARGET_CELL
    side = rng.randint(*SMALL_SIDES)
    cell_x, cell_y = rng.randrange(cells), rng.randrange(cells)
    left = cell_x * TARGET_CELL + rng.randint(0, TARGET_CELL - side)
    top = cell_y * TARGET_CELL + rng.randint(0, TARGET_CELL - side)
    return left, top, left + side - 1, top + side - 1


def _dim(color: Tuple[int, int, int]) -> Tuple[int, ...]:
    return tuple(round(DIM_BRIGHTNESS * channel) for channel in color)


def _color(draw, rng, image_size) -> str:
    answer = rng.choice(ANSWER_WORDS["color"])
    _draw_square(draw, rng, image_size, COLORS[answer], (0, image_size))
    return answer


def _color_skewed(draw, rng, image_size) -> str:
    answer = skewed_color(rng)
    _draw_square(draw, rng, image_size, COLORS[answer], (0, image_size))
    return answer


def _small_target(draw, rng, image_size, answer: str) -> str:
    draw.rectangle(small_target_box(rng, image_size), fill=_dim(COLORS[answer]))
    return answer


def _color_small(draw, rng, image_size) -> str:
    return _small_target(draw, rng, image_size, rng.choice(ANSWER_WORDS["color"]))


def _color_small_skewed(draw, rng, image_size) -> str:
    return _small_target(draw, rng, image_size, skewed_color(rng))


def _count(draw, rng, image_size) -> str:
    count = rng.randint(1, 4)
    for quadrant in rng.sample(range(4), count):
        draw.rectangle(_quadrant_box(rng, image_size, quadrant), fill=COLORS[rng.choice(list(COLORS))])
    return str(count)


def _position(draw, rng, image_size) -> str:
    answer = rng.choice(ANSWER_WORDS["position"])
    half = image_size // 2
    x_range = (0, half) if answer == "left" else (half, image_size)
    _draw_square(draw, rng, image_size, COLORS[rng.choice(list(COLORS))], x_range)
    return answer


def _compare(draw, rng, image_size) -> str:
    first = rng.choice(list(COLORS))
    same = rng.random() < 0.5
    second = first if same else rng.choice([color for color in COLORS if color != first])
    for quadrant, color in zip(rng.sample(range(4), 2), (first, second)):
        draw.rectangle(_quadrant_box(rng, image_size, quadrant), fill=COLORS[color])
    return "yes" if same else "no"


# Each draws the task's image content with ``rng`` and returns the answer.
_DRAW: Dict[str, Callable[[ImageDraw.ImageDraw, random.Random, int], str]] = {
    "color": _color, "count": _count, "position": _position, "color_skewed": _color_skewed,
    "color_small": _color_small, "color_small_skewed": _color_small_skewed, "compare": _compare,
}


def synthetic_example(task: str, rng: random.Random, image_size: int) -> Example:
    """One random prompt of ``task`` (one of ``SYNTHETIC_TASKS``)."""
    if task not in _DRAW:
        raise ValueError(f"task: got {task!r}, expected one of {list(SYNTHETIC_TASKS)}")
    if image_size < TARGET_CELL * 2:
        raise ValueError(f"image_size: got {image_size}, expected at least {2 * TARGET_CELL} pixels")
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    answer = _DRAW[task](ImageDraw.Draw(image), rng, image_size)
    return Example(image=image, question=QUESTIONS[task], answer=answer)


class SyntheticShapes:
    """An endless stream of synthetic prompts; the examples of a step depend only on (seed, step)."""

    def __init__(self, tasks: Sequence[str], image_size: int, seed: int):
        self.tasks = tuple(tasks)
        self.image_size = image_size
        self.seed = seed

    def batch(self, step: int, size: int) -> List[Example]:
        rng = random.Random(f"{self.seed}-{step}")
        return [synthetic_example(rng.choice(self.tasks), rng, self.image_size) for _ in range(size)]


# Qwen-VL's control tokens (<|image_pad|>, <|vision_start|>, <|im_end|>, ...) as text: the processor reads them as the
# tokens themselves, so a question holding <|image_pad|> asks for image features that no image provides.
CONTROL_TOKEN_TEXT = re.compile(r"<\|[^|<>\s]+\|>")


def _special_token_error(where: str, field: str, token: str) -> TrainerInputError:
    return TrainerInputError(f"--data: {where}: field {field!r} holds the special-token text {token!r}, which the "
                             "processor would read as that control token (an image placeholder, a turn marker), not "
                             "as words; remove it from the data (the processor adds the image's own tokens)")


class JsonlDataset:
    """Prompts from a JSONL file, one object per line: ``{"image": path, "question": str, "answer": str}``.

    A question or answer that holds control-token text (Qwen-VL's ``<|...|>`` form, such as
    ``<|image_pad|>``, which Qwen-formatted data sets carry) is refused when the file is read,
    naming the line; ``check_special_tokens`` refuses the tokenizer's own special tokens the
    same way once the tokenizer exists, before any training.

    Relative image paths are resolved against the JSONL file's folder. Every image is
    opened when the file loads (its header, which names a known image format and the size),
    so a path that is no image, or an image whose longer side is more than
    ``MAX_ASPECT_RATIO`` times its shorter, fails before any training; the pixels are decoded lazily, when a
    step samples the prompt, and a file that fails to decode then is an error naming its
    line before that step does any work. A step's prompts are a seeded sample that
    depends only on (seed, step).
    """

    REQUIRED_FIELDS = ("image", "question", "answer")

    def __init__(self, path, seed: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise TrainerInputError(f"--data: no such JSONL file: {self.path}")
        self.seed = seed
        self.records = [self._parse(number, line) for number, line in enumerate(self._lines(), start=1)
                        if line.strip()]
        if not self.records:
            raise TrainerInputError(f"--data: {self.path} has no records; expected one JSON object per line with "
                                    f"fields {list(self.REQUIRED_FIELDS)}")

    def _lines(self) -> List[bytes]:
        # Split the bytes: str.splitlines would also split inside a JSON string holding U+2028 or U+0085.
        try:
            with open(self.path, "rb") as handle:
                return handle.read().splitlines()
        except OSError as error:
            raise TrainerInputError(f"--data: cannot read {self.path} ({error.strerror})") from None

    def _parse(self, number: int, line: bytes) -> dict:
        where = f"{self.path}, line {number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise TrainerInputError(f"--data: {where} is not UTF-8 ({error.reason} at byte {error.start + 1})") \
                from None
        except json.JSONDecodeError as error:
            raise TrainerInputError(f"--data: {where} is not valid JSON ({error.msg} at column {error.colno})") \
                from None
        if not isinstance(record, dict):
            raise TrainerInputError(f"--data: {where} must be a JSON object, got {type(record).__name__}")
        missing = [field for field in self.REQUIRED_FIELDS if field not in record]
        if missing:
            raise TrainerInputError(f"--data: {where} lacks field(s) {missing}; required are "
                                    f"{list(self.REQUIRED_FIELDS)}")
        for field in self.REQUIRED_FIELDS:
            if not isinstance(record[field], str) or not record[field].strip():
                raise TrainerInputError(f"--data: {where}: field {field!r} must be a non-empty string, "
                                        f"got {record[field]!r}")
        for field in ("question", "answer"):
            found = CONTROL_TOKEN_TEXT.search(record[field])
            if found:
                raise _special_token_error(where, field, found.group())
        image_path = Path(record["image"])
        if not image_path.is_absolute():
            image_path = self.path.parent / image_path
        if not image_path.is_file():
            raise TrainerInputError(f"--data: {where}: image file not found: {image_path}")
        try:
            with Image.open(image_path) as image:  # reads the header only
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as error:
            raise TrainerInputError(f"--data: {where}: {image_path} is not an image PIL can read ({error})") \
                from None
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise TrainerInputError(f"--data: {where}: the image {image_path} is {width} x {height} pixels; Qwen2-VL's "
                                    f"image processor takes a longer side of at most {MAX_ASPECT_RATIO} times the "
                                    "shorter")
        return {"image": image_path, "question": record["question"], "answer": record["answer"], "line": number}

    def __len__(self) -> int:
        return len(self.records)

    def check_special_tokens(self, special_tokens: Sequence[str]) -> None:
        """Refuse a question or answer that holds the text of one of the tokenizer's ``special_tokens``."""
        special_tokens = [token for token in special_tokens if token]
        for record in self.records:
            for field in ("question", "answer"):
                found = next((token for token in special_tokens if token in record[field]), None)
                if found is not None:
                    raise _special_token_error(f"{self.path}, line {record['line']}", field, found)

    def words(self) -> List[str]:
        """Every whitespace-separated word of the questions and answers (a word-level tokenizer's vocabulary)."""
        return list(dict.fromkeys(word for record in self.records
                                  for word in (record["question"] + " " + record["answer"]).split()))

    def batch(self, step: int, size: int) -> List[Example]:
        rng = random.Random(f"{self.seed}-{step}")
        chosen = rng.sample(self.records, size) if size <= len(self.records) else rng.choices(self.records, k=size)
        return [Example(image=self._load_image(record), question=record["question"], answer=record["answer"])
                for record in chosen]

    def _load_image(self, record: dict) -> Image.Image:
        try:
            with Image.open(record["image"]) as image:
                return image.convert("RGB")
        # PIL reports a damaged file as OSError ("image file is truncated") or ValueError.
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise TrainerInputError(f"--data: {self.path}, line {record['line']}: the image {record['image']} "
                                    f"cannot be decoded ({error})") from None
