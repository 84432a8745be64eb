"""Each eval metric on hand-checked cases."""

import pytest

from cart.metrics import METRICS, extract_choice, normalize, token_f1

CHOICES = ["Emeric Dubois-Tanaka", "Brannock Ashdel", "Halvard Ekwueme-Rossi", "Teodor Marchetti-Quay"]


def score(metric, prediction, answers, **q):
    return METRICS[metric]().score(prediction, {"answers": answers, **q})


def test_normalize_is_squad_style():
    assert normalize("The  Saltmarsh Heron!") == "saltmarsh heron"
    assert normalize("A cat, an owl & the dog.") == "cat owl dog"
    assert normalize("14 March 2187.") == "14 march 2187"


@pytest.mark.parametrize("prediction,answers,expected", [
    ("It was founded on 14 March 2187 at Kessler.", ["14 March 2187"], 1.0),
    ("Founded on 14 march, 2187.", ["14 March 2187"], 1.0),  # case and punctuation dropped
    ("Captain Achterberg-Vey commands it.", ["Rosalind Achterberg-Vey", "Achterberg-Vey"], 1.0),
    ("The motto is Every Kilogram Accounted For", ["every kilogram accounted for"], 1.0),
    ("Bay 17", ["7"], 0.0),  # whole words only: 7 is not in 17
    ("It has 31 crew.", ["31"], 1.0),
    ("", ["31"], 0.0),
])
def test_contains(prediction, answers, expected):
    assert score("contains", prediction, answers) == expected


@pytest.mark.parametrize("prediction,answers,expected", [
    ("Vesta Terminal.", ["Vesta Terminal"], 1.0),
    ("the vesta terminal", ["Vesta Terminal"], 1.0),
    ("It is Vesta Terminal", ["Vesta Terminal"], 0.0),
    ("Achterberg-Vey", ["Rosalind Achterberg-Vey", "Achterberg-Vey"], 1.0),
])
def test_exact(prediction, answers, expected):
    assert score("exact", prediction, answers) == expected


def test_token_f1_by_hand():
    # pred tokens: [ship, saltmarsh, heron] (articles dropped); ref: [saltmarsh, heron]
    # common 2, precision 2/3, recall 1 -> F1 = 2 * (2/3) / (5/3) = 0.8
    assert token_f1("the ship Saltmarsh Heron", "Saltmarsh Heron") == pytest.approx(0.8)
    assert token_f1("Saltmarsh Heron", "Saltmarsh Heron") == 1.0
    assert token_f1("nothing alike", "Saltmarsh Heron") == 0.0
    # repeated tokens count once per occurrence in both (bag of words)
    assert token_f1("heron heron", "heron") == pytest.approx(2 * 0.5 * 1 / 1.5)
    # best over the references
    assert score("token_f1", "Achterberg-Vey", ["Rosalind Achterberg-Vey", "Achterberg-Vey"]) == 1.0
    assert score("token_f1", "", ["x"]) == 0.0


def test_chrf_matches_sacrebleu_and_is_scaled_to_one():
    from sacrebleu.metrics import CHRF

    assert score("chrf", "the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    got = score("chrf", "the cat", ["the cat sat on the mat"])
    assert got == pytest.approx(CHRF().sentence_score("the cat", ["the cat sat on the mat"]).score / 100)
    assert 0.2 < got < 0.35  # sacrebleu: 27.25
    assert score("chrf", "zzzz", ["the cat sat on the mat"]) == 0.0
    # several references: the best one counts
    two = score("chrf", "the cat", ["a dog barked loudly", "the cat"])
    assert two == pytest.approx(1.0)


def test_loglik_scores_nothing_and_does_not_generate():
    assert METRICS["loglik"].generates is False
    assert score("loglik", "anything", ["x"]) is None


@pytest.mark.parametrize("prediction,expected", [
    ("D", "D"),
    ("D.", "D"),
    ("(B)", "B"),
    ("C) Halvard", "C"),
    ("D. Teodor Marchetti-Quay", "D"),
    ("**B**", "B"),
    ("The answer is C.", "C"),
    ("Answer: (B)", "B"),
    ("The correct option is D - Teodor", "D"),
    ("A. Emeric\n\nThe correct answer is D. Teodor", "D"),  # an explicit answer wins
    ("I think it is Teodor Marchetti-Quay.", "D"),  # the option's text
    ("A co-founder was Brannock Ashdel.", "B"),  # the article "A" is not option A
    ("Either Emeric Dubois-Tanaka or Brannock Ashdel.", "A"),  # several: the first mentioned
    ("The answer is a mystery.", None),  # lower-case "a" is not a letter answer
    ("None of them.", None),
    ("", None),
])
def test_multiple_choice_extraction(prediction, expected):
    assert extract_choice(prediction, CHOICES) == expected


def test_multiple_choice_score_and_checks():
    from cart.io import CartError

    mc = METRICS["multiple_choice"]()
    q = {"choices": CHOICES, "answers": ["D"]}
    assert mc.score("D. Teodor", q) == 1.0
    assert mc.score("B", q) == 0.0
    mc.check(q, "q.jsonl:1")
    with pytest.raises(CartError, match=r"q.jsonl:2: field 'answers' must hold the letter of the "
                                        r"correct option \(A-D\), got 'E'"):
        mc.check({"choices": CHOICES, "answers": ["E"]}, "q.jsonl:2")
    with pytest.raises(CartError, match="q.jsonl:3: field 'choices' must list at least two options"):
        mc.check({"answers": ["A"]}, "q.jsonl:3")
