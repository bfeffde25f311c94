"""Verifiable rewards: answer extraction, the three matchers, and the weighted score."""

import pytest

from papo_kernels.trainer.rewards import (extract_answer, is_correct, match_choice, match_exact, match_numeric,
                                          parse_number, score_response)


@pytest.mark.parametrize("response, answer_format, expected", [
    ("red", "first_word", "red"),
    ("  blue green", "first_word", "blue"),
    ("", "first_word", None),
    ("so \\boxed{3} or \\boxed{\\frac{1}{2}}", "boxed", "\\frac{1}{2}"),
    ("no box here", "boxed", None),
    ("\\boxed{unclosed", "boxed", None),
    ("<answer>1</answer> then <answer> B </answer>", "tag", "B"),
    ("<answer>open", "tag", None),
])
def test_extract_answer(response, answer_format, expected):
    assert extract_answer(response, answer_format) == expected


@pytest.mark.parametrize("text, value", [("1,234", 1234.0), ("-2.5", -2.5), ("3/4", 0.75), ("50%", 0.5),
                                         ("$12.", 12.0), ("1e3", 1000.0), ("two", None), ("1/0", None)])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_matchers():
    assert match_choice("(B)", "B") and match_choice("b.", "(B)") and not match_choice("C", "B")
    assert not match_choice("Because", "B")
    assert match_numeric("1,000", "1000") and match_numeric("0.5", "1/2") and not match_numeric("0.51", "0.5")
    assert not match_numeric("red", "2")
    assert match_exact(" Red ", "red") and not match_exact("reddish", "red")


def test_is_correct_picks_the_matcher_from_the_answer():
    assert is_correct("(C)", "C")  # multiple choice
    assert is_correct("2.0", "2")  # numeric
    assert not is_correct("2", "two")  # exact: the text differs
    assert is_correct("YELLOW", "yellow")
    assert not is_correct(None, "red")


def test_score_weights_accuracy_and_format():
    assert score_response("red", "red", "first_word", 0.9, 0.1) == pytest.approx((1.0, 1.0, 1.0))
    assert score_response("red blue", "red", "first_word", 0.9, 0.1) == pytest.approx((0.9, 1.0, 0.0))
    assert score_response("blue", "red", "first_word", 0.9, 0.1) == pytest.approx((0.1, 0.0, 1.0))
    assert score_response("it is \\boxed{4}", "4", "boxed", 0.5, 0.5) == pytest.approx((1.0, 1.0, 1.0))
    assert score_response("it is 4", "4", "boxed", 0.9, 0.1) == pytest.approx((0.0, 0.0, 0.0))
