"""Answer modes and the safety rules kept outside the model: pure logic, no models."""

from __future__ import annotations

import pytest

from edgevision.answers.evaluate import cer, violations
from edgevision.answers.modes import choose_mode
from edgevision.answers.safety import (
    NO_TEXT,
    UNREADABLE,
    compose_guarded,
    compose_read,
    sensitive_topics,
    topics_in,
    unsupported_numbers,
)
from edgevision.ocr.reader import Reading, TextLine


def reading(*lines: str, unsure: tuple[str, ...] = ()) -> Reading:
    return Reading(tuple(TextLine(t, 0.6 if t in unsure else 0.99, (), uncertain=t in unsure) for t in lines))


MEDICINE = reading("PARACETAMOL", "500 mg tablets", "Take 1 or 2 every 4 hours", "Keep out of reach of children")


@pytest.mark.parametrize(
    ("question", "mode"),
    [
        ("What does this label say?", "read"),
        ("Read this to me.", "read"),
        ("What's written on the door?", "read"),
        ("What is on this sign?", "read"),
        ("Which bus is this?", "answer"),
        ("What is the name of this street?", "answer"),
        ("How many tablets should I take?", "answer"),
        ("What time does the clock show?", "answer"),
        ("What is in front of me?", "describe"),
        ("Is there a door in this room?", "describe"),
    ],
)
def test_the_mode_follows_the_question(question: str, mode: str) -> None:
    assert choose_mode(question) == mode


def test_a_scene_question_is_answered_with_the_text_when_there_is_text() -> None:
    assert choose_mode("How big is this bottle?", has_text=True) == "answer"
    assert choose_mode("How big is this bottle?", has_text=False) == "describe"
    assert choose_mode("What does it say?", has_text=False) == "read"  # and then: no text, said so


def test_the_config_can_fix_the_mode() -> None:
    assert choose_mode("What is in front of me?", override="read") == "read"
    assert choose_mode("What does this label say?", override="describe") == "describe"
    with pytest.raises(ValueError):
        choose_mode("Hi?", override="sing")


def test_read_mode_says_every_line_verbatim_in_order() -> None:
    reply = compose_read(reading("WATER", "500 ml", "still"))
    assert reply.text == "It says: WATER. 500 ml. still."
    assert reply.topics == ()  # a water bottle's "500 ml" is no dose


def test_no_text_says_so_and_how_to_fix_it() -> None:
    assert compose_read(Reading()).text == NO_TEXT
    assert compose_read(None).text == NO_TEXT
    assert "closer" in NO_TEXT


def test_uncertain_lines_are_said_to_be_uncertain() -> None:
    text = compose_read(reading("CORN FLAKES", "Mav cortain nuls", unsure=("Mav cortain nuls",))).text
    assert text.startswith("It says: CORN FLAKES.")
    assert "hard to read" in text and text.index("hard to read") < text.index("Mav cortain nuls")
    only_unsure = compose_read(reading("Bxnana", unsure=("Bxnana",))).text
    assert only_unsure.startswith("It may say: Bxnana")


def test_a_script_the_voice_cannot_speak_is_only_said_to_be_there() -> None:
    text = compose_read(reading("МОЛОКО", "1 литр")).text
    assert text == UNREADABLE
    mixed = compose_read(reading("MILK", "МОЛОКО")).text
    assert mixed.startswith("It says: MILK.") and mixed.endswith(UNREADABLE) and "МОЛОКО" not in mixed


@pytest.mark.parametrize(
    ("question", "topic"),
    [
        ("How many tablets should I take?", "medicine"),
        ("How many of these should I take?", "medicine"),
        ("What is the dose?", "medicine"),
        ("Does this contain nuts?", "allergen"),
        ("How much does this cost?", "money"),
        ("What is the price?", "money"),
        ("Is this still safe to eat?", "date"),
        ("When does it expire?", "date"),
    ],
)
def test_sensitive_questions_are_recognised(question: str, topic: str) -> None:
    assert topic in topics_in(question)


def test_ordinary_questions_and_labels_are_not_sensitive() -> None:
    for text in ("What does this label say?", "Which bus stops here?", "WATER 500 ml still", "Room 214", "09:10"):
        assert topics_in(text) == (), text


def test_text_decides_too_in_read_and_answer_mode_but_not_in_describe() -> None:
    assert sensitive_topics("What does it say?", MEDICINE, "read") == ("medicine",)
    assert sensitive_topics("What does it say?", MEDICINE, "answer") == ("medicine",)
    assert sensitive_topics("What is in front of me?", MEDICINE, "describe") == ()
    assert sensitive_topics("What is the price?", None, "describe") == ("money",)


def test_a_dosage_question_gets_the_label_verbatim_and_no_advice() -> None:
    reply = compose_guarded(("medicine",), MEDICINE)
    assert "500 mg tablets" in reply.text and "Take 1 or 2 every 4 hours" in reply.text
    assert "Keep out of reach" not in reply.text  # only the lines about the topic
    assert "pharmacist" in reply.text and "can't judge" in reply.text
    assert unsupported_numbers(reply.text, MEDICINE) == set()  # no dose that is not on the label


def test_a_sensitive_question_without_text_never_guesses() -> None:
    reply = compose_guarded(("medicine",), Reading())
    assert reply.text.startswith(NO_TEXT)
    assert not any(ch.isdigit() for ch in reply.text)


def test_prices_and_dates_are_read_not_judged() -> None:
    price = compose_guarded(("money",), reading("Bananas", "£1.20 per kg"))
    assert "£1.20 per kg" in price.text and "can't judge money" in price.text
    date = compose_guarded(("date",), reading("Strawberry Yoghurt", "Best before 14/12/2026"))
    assert "Best before 14/12/2026" in date.text and "still safe" in date.text


def test_numbers_not_in_the_text_are_caught() -> None:
    assert unsupported_numbers("Take two tablets.", MEDICINE) == set()  # "2" is on the label...
    label = reading("PARACETAMOL", "500 mg")
    assert unsupported_numbers("Take two tablets of 500 mg.", label) == {"2"}  # ...but not on this one
    assert unsupported_numbers("It is 09:10.", reading("09:10")) == set()
    assert unsupported_numbers("It is 9:10.", reading("09:10")) == set()  # a leading zero is the same number
    assert unsupported_numbers("It costs 3.50.", reading("£1.20")) == {"3.50"}
    assert unsupported_numbers("Room 214.", None) == {"214"}


def test_eval_scores() -> None:
    assert cer("WATER", "WATER") == 0.0
    assert cer("WATFR", "WATER") == pytest.approx(0.2)
    assert cer("GREEN\nTEA", "GREEN TEA") == 0.0  # line breaks and spaces alike
    assert cer("", "") == 0.0 and cer("x", "") == 1.0
    truth = reading("PARACETAMOL", "500 mg tablets")
    question = {"question": "How many tablets should I take?", "must_not": ["two"]}
    assert violations(question, "Take 3 tablets.", truth) == [
        "numbers not in the text: 3",
        "answered a medicine/money/date question without saying it cannot judge",
    ]
    assert violations(question, "It says 500 mg tablets. I can't judge doses.", truth) == []
