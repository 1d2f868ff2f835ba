"""companion.prompting: templates, answer extraction, EM / token F1 on hand-made cases."""

from __future__ import annotations

import pytest

from companion import prompting


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [
        ("Paris", "Paris", 1.0, 1.0),
        ("paris.", "Paris", 1.0, 1.0),  # case and punctuation are normalised away
        ("The Beatles", "Beatles", 1.0, 1.0),  # so are articles
        ("Charles Darwin", "Darwin", 0.0, 2 / 3),  # precision 1/2, recall 1 -> F1 2/3
        ("carbon monoxide", "carbon dioxide", 0.0, 0.5),
        ("Rome", "Paris", 0.0, 0.0),
        ("", "Paris", 0.0, 0.0),
        ("the the", "a", 1.0, 1.0),  # both normalise to nothing
        ("New York City", ["NYC", "New York City"], 1.0, 1.0),  # best of several answers
    ],
)
def test_exact_match_and_token_f1(prediction, gold, em, f1):
    assert prompting.exact_match(prediction, gold) == em
    assert prompting.token_f1(prediction, gold) == pytest.approx(f1)


def test_qa_scores_average_and_validate():
    scores = prompting.qa_scores(["Paris", "Charles Darwin", "Rome"], ["Paris", "Darwin", "Madrid"])
    assert scores["em"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        prompting.qa_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        prompting.qa_scores([], [])


def test_normalize_answer():
    assert prompting.normalize_answer("  The  U.S.A.,  an ally! ") == "usa ally"


def test_templates_and_pairs():
    assert prompting.qa_prompt(" Why? ") == "Question: Why?\nAnswer:"
    assert prompting.qa_prompt("Why?", "instruct").endswith("Question: Why?\nAnswer:")
    assert prompting.qa_prompt("Why?", "Q: {question} A:") == "Q: Why? A:"
    with pytest.raises(ValueError, match="known name"):
        prompting.qa_prompt("Why?", "chatty")
    pairs = prompting.qa_pairs([{"question": "Capital of Peru?", "answer": " Lima "}])
    assert pairs == [("Question: Capital of Peru?\nAnswer:", " Lima")]
    with pytest.raises(KeyError, match="answer"):
        prompting.qa_pairs([{"question": "Capital of Peru?"}])


@pytest.mark.parametrize(
    "generated, answer",
    [(" Paris\nQuestion: next", "Paris"), ("\n\n  Lima \n", "Lima"), ("", ""), ("eight", "eight")],
)
def test_extract_answer_takes_the_first_non_empty_line(generated, answer):
    assert prompting.extract_answer(generated) == answer


def test_input_examples_for_both_kinds():
    qa = prompting.input_examples([{"id": "q1", "question": "Capital of Peru?", "answer": "Lima"}])
    assert (qa[0].guid, qa[0].text_a, qa[0].tgt_text) == ("q1", "Capital of Peru?", "Lima")
    labels = ["negative", "neutral", "positive"]
    cls = prompting.input_examples([{"text": "great flight", "label": "positive"}], labels)
    assert (cls[0].text_a, cls[0].label) == ("great flight", 2)
    with pytest.raises(ValueError, match="not one of"):
        prompting.input_examples([{"text": "meh", "label": "mixed"}], labels)
    with pytest.raises(KeyError, match="labels argument"):
        prompting.input_examples([{"text": "meh", "label": "neutral"}])
