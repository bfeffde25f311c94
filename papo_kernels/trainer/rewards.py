"""Verifiable rewards: accuracy against the known answer plus a format bonus.

``reward = accuracy_weight * accuracy + format_weight * format`` (the authors use 0.9
and 0.1). The answer is read from the response as set by ``answer_format``:

- ``"boxed"``: the content of the last ``\\boxed{...}``;
- ``"tag"``: the content of the last ``<answer>...</answer>``;
- ``"first_word"``: the first word (the tiny default model answers with one word).

The format score is 1 when the answer could be read that way (for ``"first_word"``,
when the response is exactly one word). Accuracy compares the read answer with the
known one by the matcher its form calls for: a letter A-J is a multiple-choice
answer, a number is compared numerically, anything else exactly (case and
surrounding spaces ignored).
"""

import re
from typing import Optional, Tuple

ANSWER_FORMATS = ("first_word", "boxed", "tag")

_CHOICE = re.compile(r"^\(?([A-J])\)?[.:]?$")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def extract_answer(response: str, answer_format: str) -> Optional[str]:
    """The answer part of ``response`` in ``answer_format``, or None when it has none."""
    if answer_format == "first_word":
        words = response.split()
        return words[0] if words else None
    if answer_format == "boxed":
        start = response.rfind("\\boxed{")
        if start < 0:
            return None
        # Match braces so that \boxed{\frac{1}{2}} keeps its inner groups.
        depth, begin = 1, start + len("\\boxed{")
        for index in range(begin, len(response)):
            depth += {"{": 1, "}": -1}.get(response[index], 0)
            if depth == 0:
                return response[begin:index].strip()
        return None
    found = re.findall(r"<answer>(.*?)</answer>", response, flags=re.DOTALL)
    return found[-1].strip() if found else None


def parse_number(text: str) -> Optional[float]:
    """The number ``text`` states (``"1,234"``, ``"-2.5"``, ``"3/4"``, ``"50%"``), or None."""
    text = text.strip().rstrip(".").replace("$", "")
    if text.endswith("%"):
        value = parse_number(text[:-1])
        return None if value is None else value / 100.0
    if re.fullmatch(r"[-+]?\d+\s*/\s*\d+", text):
        numerator, denominator = (float(part) for part in text.split("/"))
        return None if denominator == 0 else numerator / denominator
    if _NUMBER.fullmatch(text):
        return float(text.replace(",", ""))
    return None


def match_choice(predicted: str, answer: str) -> bool:
    """Multiple choice: the predicted letter (``"B"``, ``"(B)"``, ``"B."``) equals the answer's."""
    found = _CHOICE.match(predicted.strip().upper())
    return found is not None and found.group(1) == answer.strip().strip("()").upper()


def match_numeric(predicted: str, answer: str, relative_tolerance: float = 1e-6) -> bool:
    """Numbers equal up to a relative tolerance; False when either is not a number."""
    predicted_value, answer_value = parse_number(predicted), parse_number(answer)
    if predicted_value is None or answer_value is None:
        return False
    return abs(predicted_value - answer_value) <= relative_tolerance * max(1.0, abs(answer_value))


def match_exact(predicted: str, answer: str) -> bool:
    """Equal after lower-casing and collapsing whitespace."""
    return " ".join(predicted.lower().split()) == " ".join(answer.lower().split())


def is_correct(predicted: Optional[str], answer: str) -> bool:
    """Compare with the matcher the answer's form calls for (choice letter, number, or text)."""
    if predicted is None:
        return False
    if _CHOICE.match(answer.strip()):
        return match_choice(predicted, answer)
    if parse_number(answer) is not None:
        return match_numeric(predicted, answer)
    return match_exact(predicted, answer)


def score_response(response: str, answer: str, answer_format: str, accuracy_weight: float,
                   format_weight: float) -> Tuple[float, float, float]:
    """``(reward, accuracy, format)`` of one response."""
    predicted = extract_answer(response, answer_format)
    if answer_format == "first_word":
        well_formed = float(len(response.split()) == 1)
    else:
        well_formed = float(predicted is not None)
    accuracy = float(is_correct(predicted, answer))
    return accuracy_weight * accuracy + format_weight * well_formed, accuracy, well_formed
