"""The answer mode a question calls for: read, answer or describe.

- read: the question asks what some text says ("What does this label say?", "Read this to me"); the reply
  is the recognised lines, verbatim and in reading order. The decoder is not asked.
- answer: the question is about something text tells (a name, a number, a sign, a screen, a time); the
  decoder answers with the recognised text in its prompt beside the image rows.
- describe: anything else ("What is in front of me?"); the decoder answers from the image alone. When the
  frame holds text, such a question is answered in answer mode instead ("How big is this bottle?" beside a
  label saying "500 ml"): the text is the best evidence the device has, and answer mode's checks apply.

`answers.mode` in the config can fix one mode for every question instead.
"""

from __future__ import annotations

import re

MODES = ("read", "answer", "describe")

_READ = re.compile(
    r"\b(read|reads|reading)\b"
    r"|\bwhat\b.{0,30}\b(say|says|saying)\b"
    r"|\bwhat(?:'s| is| are)\b.{0,12}\b(written|printed)\b"
    r"|\bwhat(?:'s| is)\b.{0,8}\b(on|in)\b.{0,8}\b(the|this|that)\b.{0,20}\b(label|sign|note|page|letter|screen|card|"
    r"box|packet|package|bottle|can|jar|paper|display|poster)\b"
    r"|\b(text|words|writing|wording)\b",
    re.IGNORECASE,
)

_ANSWER = re.compile(
    r"\b(label|labels|sign|signs|screen|display|name|named|called|title|brand|number|numbers|page|bus|train|"
    r"platform|gate|price|cost|costs|expire|expires|expiry|date|dated|time|clock|ingredients?|dose|dosage|"
    r"tablets?|pills?|medicine|how much|how many|flavou?r|size|weight|volume|contains?|allergens?)\b",
    re.IGNORECASE,
)


def choose_mode(question: str, *, override: str = "auto", has_text: bool = False) -> str:
    """The mode for `question`: `override` unless it is "auto", else read, answer or describe by its words
    (describe only when the frame has no text)."""
    if override != "auto":
        if override not in MODES:
            raise ValueError(f"unknown answer mode {override!r}; one of auto, {', '.join(MODES)}")
        return override
    if _READ.search(question):
        return "read"
    if _ANSWER.search(question) or has_text:
        return "answer"
    return "describe"
