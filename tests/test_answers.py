"""Final-answer extraction: only explicit answers count, checked with math-verify."""

import pytest

from opdkit.answers import extract_answer, last_boxed, score_response


@pytest.mark.parametrize("text,answer", [
    ("so the result is \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\sqrt{x^{2}}} ok", "\\sqrt{x^{2}}"),
    ("Work...\nAnswer: 17", "17"),
    ("Answer: $3\\pi$.", "3\\pi"),
    ("**Answer:** 5", "5"),
    ("17 + 25 = 42", None),            # free text is never scored
    ("unbalanced \\boxed{12", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text,gold,score", [
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("Answer: 204", "\\boxed{204}", 1.0),          # AIME24 stores gold answers boxed
    ("\\boxed{x(x+2)}", "x^2+2x", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("7 + 7 = 12 ... 7 + 7 is", "14", 0.0),        # a restated expression must not count as an answer
    ("Answer: \\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
])
def test_score_response(text, gold, score):
    assert score_response(text, gold) == score


def test_no_gold_means_no_score():
    assert score_response("\\boxed{1}", None) is None
    assert last_boxed("no box") is None
