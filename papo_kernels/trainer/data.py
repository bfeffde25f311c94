"""Prompts with a verifiable answer: the built-in synthetic shapes task and JSONL data sets.

An ``Example`` is one prompt: an RGB image, a question and the answer a reward can
check. The synthetic task draws coloured squares on a black background and asks
about their colour, their number or the side they are on, so the answer needs the
image (a text-only policy is at chance).
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from PIL import Image, ImageDraw

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240), "yellow": (240, 220, 40)}
SYNTHETIC_TASKS = ("color", "count", "position")
QUESTIONS = {
    "color": "what color is the square ?",
    "count": "how many squares are there ?",
    "position": "is the square left or right ?",
}
ANSWER_WORDS = {
    "color": tuple(COLORS),
    "count": ("1", "2", "3", "4"),
    "position": ("left", "right"),
}


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


def synthetic_example(task: str, rng: random.Random, image_size: int) -> Example:
    """One random prompt of ``task`` (``"color"``, ``"count"`` or ``"position"``)."""
    image = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    if task == "color":
        answer = rng.choice(ANSWER_WORDS["color"])
        _draw_square(draw, rng, image_size, COLORS[answer], (0, image_size))
    elif task == "count":
        count = rng.randint(1, 4)
        answer = str(count)
        # One square per quadrant, small enough to stay inside it, so squares never merge.
        half = image_size // 2
        for quadrant in rng.sample(range(4), count):
            side = rng.randint(image_size // 8, half // 2)
            left = (quadrant % 2) * half + rng.randint(0, half - side)
            top = (quadrant // 2) * half + rng.randint(0, half - side)
            draw.rectangle([left, top, left + side - 1, top + side - 1], fill=COLORS[rng.choice(list(COLORS))])
    else:
        answer = rng.choice(ANSWER_WORDS["position"])
        half = image_size // 2
        x_range = (0, half) if answer == "left" else (half, image_size)
        _draw_square(draw, rng, image_size, COLORS[rng.choice(list(COLORS))], x_range)
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


class JsonlDataset:
    """Prompts from a JSONL file, one object per line: ``{"image": path, "question": str, "answer": str}``.

    Relative image paths are resolved against the JSONL file's folder. Images load
    lazily; a step's prompts are a seeded sample that depends only on (seed, step).
    """

    REQUIRED_FIELDS = ("image", "question", "answer")

    def __init__(self, path, seed: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--data: no such JSONL file: {self.path}")
        self.seed = seed
        self.records = [self._parse(number, line) for number, line in enumerate(self._lines(), start=1)
                        if line.strip()]
        if not self.records:
            raise ValueError(f"--data: {self.path} has no records; expected one JSON object per line with "
                             f"fields {list(self.REQUIRED_FIELDS)}")

    def _lines(self) -> List[str]:
        with open(self.path, encoding="utf-8") as handle:
            return handle.read().splitlines()

    def _parse(self, number: int, line: str) -> dict:
        where = f"{self.path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--data: {where} is not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"--data: {where} must be a JSON object, got {type(record).__name__}")
        missing = [field for field in self.REQUIRED_FIELDS if field not in record]
        if missing:
            raise ValueError(f"--data: {where} lacks field(s) {missing}; required are {list(self.REQUIRED_FIELDS)}")
        for field in self.REQUIRED_FIELDS:
            if not isinstance(record[field], str) or not record[field].strip():
                raise ValueError(f"--data: {where}: field {field!r} must be a non-empty string, "
                                 f"got {record[field]!r}")
        image_path = Path(record["image"])
        if not image_path.is_absolute():
            image_path = self.path.parent / image_path
        if not image_path.is_file():
            raise FileNotFoundError(f"--data: {where}: image file not found: {image_path}")
        return {"image": image_path, "question": record["question"], "answer": record["answer"]}

    def __len__(self) -> int:
        return len(self.records)

    def words(self) -> List[str]:
        """Every whitespace-separated word of the questions and answers (a word-level tokenizer's vocabulary)."""
        return list(dict.fromkeys(word for record in self.records
                                  for word in (record["question"] + " " + record["answer"]).split()))

    def batch(self, step: int, size: int) -> List[Example]:
        rng = random.Random(f"{self.seed}-{step}")
        chosen = rng.sample(self.records, size) if size <= len(self.records) else rng.choices(self.records, k=size)
        examples = []
        for record in chosen:
            with Image.open(record["image"]) as image:
                examples.append(Example(image=image.convert("RGB"), question=record["question"],
                                        answer=record["answer"]))
        return examples
