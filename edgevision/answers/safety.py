"""Safety and honesty rules, enforced outside the model.

A small language model will happily invent a dose, a price or a date. So:

- When the question or the recognised text concerns medicine, dosage, allergens, money, prices, dates or
  expiry, the model is not asked: the reply reads the relevant lines verbatim and says plainly that the
  device cannot judge safety or value.
- With no text in the frame, the reply says so and how to fix it, never a guess.
- Lines the recogniser was unsure of are said to be uncertain.
- Text in a script the voice cannot speak is said to be there, not spelt out as noise.
- A generated answer (answer mode) may name no number that the recognised text does not hold: a sentence
  that does is not spoken (`unsupported_numbers`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from edgevision.ocr.reader import Reading, TextLine

NO_TEXT = "I can't find any text; try moving the camera closer."
UNREADABLE = "There is text here, but in a script I can't read aloud."
UNCERTAIN = "Some of it was hard to read, so I may have this part wrong:"

# topic → (words in a question or on a label that raise it, what the reply says it cannot do)
_TOPICS: dict[str, tuple[str, str]] = {
    "medicine": (
        (
            r"medicines?|medication|drugs?|pills?|tablets?|capsules?|doses?|dosage|dosing|mg|mcg|µg|milligrams?|"
            r"prescription|pharmacy|overdose|side effects?|paracetamol|ibuprofen|aspirin|how (?:many|much)\b[^?]*\btake"
        ),
        "I can't judge doses or whether a medicine is safe for you; please check with a pharmacist or doctor.",
    ),
    "allergen": (
        r"allerg\w*|nuts?|peanuts?|gluten|lactose|sesame|shellfish|may contain|contains?|ingredients?",
        "I can't judge whether it is safe for your allergies; please check with someone who can see the pack.",
    ),
    "money": (
        (
            r"money|price|prices|priced|cost|costs|pay|paid|cash|coins?|banknotes?|receipt|worth|value|dollars?|"
            r"euros?|cents?|pence|[$€£¥]"
        ),
        "I can't judge money or value; please check the amount with someone you trust.",
    ),
    "date": (
        r"expir\w*|exp|best before|use by|sell by|dates?|dated|out of date|still good|gone off|safe to eat|safe to drink",
        "I can't judge whether it is still safe to use; that depends on more than the date.",
    ),
}

_TOPIC_RE = {topic: re.compile(rf"(?<!\w)(?:{words})(?!\w)", re.IGNORECASE) for topic, (words, _) in _TOPICS.items()}
# what marks a line as holding a sensitive fact even without a topic word
_FACT_RE = {
    "medicine": re.compile(r"\d\s*(?:mg|mcg|µg)\b", re.IGNORECASE),
    "money": re.compile(r"[$€£¥]\s*\d|\d+[.,]\d{2}\b"),
    "date": re.compile(r"\b\d{1,2}[./-]\d{1,2}[./-]\d{2,4}\b|\b\d{1,2}\s+[A-Za-z]{3,9}\s+\d{2,4}\b|\b\d{2}/\d{4}\b"),
}

# lines that belong to a topic's answer beside those with its words or facts (a label's dosing instructions)
_LINE_RE = {
    "medicine": re.compile(r"\b(?:take|every|hours?|daily|a day|exceed|tablets?|capsules?|adults?)\b", re.IGNORECASE),
}

_SPEAKABLE = re.compile(r"[A-Za-z0-9\s.,:;!?'\"()\-+/%&$€£#*@°]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NUMBER_WORDS = {
    "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "twenty": "20", "fifty": "50", "hundred": "100",
    "half": "0.5", "once": "1", "twice": "2",
}  # fmt: skip


@dataclass(frozen=True)
class Reply:
    """A reply composed without the model."""

    text: str
    topics: tuple[str, ...] = ()


def topics_in(text: str) -> tuple[str, ...]:
    """The sensitive topics `text` touches, in a fixed order."""
    found = [t for t, pattern in _TOPIC_RE.items() if pattern.search(text)]
    found += [t for t, pattern in _FACT_RE.items() if t not in found and pattern.search(text)]
    return tuple(t for t in _TOPICS if t in found)


def sensitive_topics(question: str, reading: Reading | None, mode: str) -> tuple[str, ...]:
    """Topics the reply must not let the model speak about: those of the question, and (when the text is what
    is being asked about: read and answer modes) those of the recognised text."""
    text = reading.text if reading and mode in ("read", "answer") else ""
    found = set(topics_in(question)) | set(topics_in(text))
    return tuple(t for t in _TOPICS if t in found)


def speakable(line: TextLine) -> bool:
    """Whether the voice can say the line: mostly Latin letters, digits and punctuation."""
    text = line.text.replace(" ", "")
    return bool(text) and len(_SPEAKABLE.findall(text)) >= 0.7 * len(text)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?:" else f"{text}."


def read_aloud(lines: Iterable[TextLine]) -> str:
    """The lines verbatim, one sentence each, in order; lines the recogniser was unsure of are said last,
    after a warning, and lines in a script the voice cannot speak are only said to be there."""
    lines = list(lines)
    sure = [ln for ln in lines if speakable(ln) and not ln.uncertain]
    unsure = [ln for ln in lines if speakable(ln) and ln.uncertain]
    parts = []
    if sure:
        parts.append("It says: " + " ".join(_sentence(ln.text) for ln in sure))
    if unsure:
        parts.append(("It may say: " if not sure else f"{UNCERTAIN} ") + " ".join(_sentence(ln.text) for ln in unsure))
    if len(sure) + len(unsure) < len(lines):
        parts.append(UNREADABLE)
    return " ".join(parts) if parts else NO_TEXT


def compose_read(reading: Reading | None, *, no_text: str = NO_TEXT, topics: tuple[str, ...] = ()) -> Reply:
    """Read mode: every line, verbatim; and, where the question or the text is about medicine, money or dates
    (`topics`, from `sensitive_topics`), what the device cannot judge about it."""
    if not reading:
        return Reply(" ".join([no_text, *(_TOPICS[t][1] for t in topics)]), topics)
    return Reply(" ".join([read_aloud(reading.lines), *(_TOPICS[t][1] for t in topics)]), topics)


def compose_guarded(topics: tuple[str, ...], reading: Reading | None, *, no_text: str = NO_TEXT) -> Reply:
    """A question on a sensitive topic: the lines about it verbatim (all lines if none is), and what the device
    cannot judge. Without text: `no_text`, never a guess."""
    cannot = [_TOPICS[t][1] for t in topics]
    if not reading:
        return Reply(" ".join([no_text, *cannot]), topics)
    patterns = [p[t] for t in topics for p in (_TOPIC_RE, _FACT_RE, _LINE_RE) if t in p]
    relevant = [ln for ln in reading.lines if any(p.search(ln.text) for p in patterns)]
    return Reply(" ".join([read_aloud(relevant or reading.lines), *cannot]), topics)


def _numbers(text: str) -> set[str]:
    found = {n.replace(",", ".").lstrip("0") or "0" for n in _NUMBER.findall(text)}
    found |= {_NUMBER_WORDS[w] for w in re.findall(r"[a-z]+", text.lower()) if w in _NUMBER_WORDS}
    return found


def unsupported_numbers(sentence: str, reading: Reading | None) -> set[str]:
    """Numbers (digits or number words) in `sentence` that the recognised text does not hold."""
    have = _numbers(reading.text) if reading else set()
    return {n for n in _numbers(sentence) if n not in have}
