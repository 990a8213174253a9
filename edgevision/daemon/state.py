"""The interaction state machine and the messages the daemon's loop dispatches.

    IDLE ──press──► LISTENING ──release──► THINKING ──first sentence──► SPEAKING ──speech ends──► IDLE
      ▲                 │  (a tap: back to IDLE)  │  (error: spoken) ──────────►│
      └─────────────────┴─────────────────────────┴──── press (barge-in) ──► LISTENING

Everything here is pure: the loop in `daemon.py` owns the clock, the devices and the models, and asks this
module what a press means (`classify_press`) and whether a move is allowed (`StateMachine.move`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


class State(enum.Enum):
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.IDLE: frozenset({State.LISTENING, State.SPEAKING}),  # speaking: a repeated answer
    State.LISTENING: frozenset({State.THINKING, State.IDLE}),  # idle: a tap, or a recording that failed
    State.THINKING: frozenset({State.SPEAKING, State.LISTENING, State.IDLE}),  # listening: barge-in
    State.SPEAKING: frozenset({State.IDLE, State.LISTENING}),  # listening: barge-in
}


class StateMachine:
    """The current state; every move is checked against TRANSITIONS and logged at debug level."""

    def __init__(self) -> None:
        self.state = State.IDLE
        self.history: list[tuple[State, State, str]] = []  # the last few moves, for status and tests

    def move(self, to: State, why: str) -> None:
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"illegal transition {self.state.value} → {to.value} ({why})")
        logger.debug("%s → %s: %s", self.state.value, to.value, why)
        self.history = [*self.history[-19:], (self.state, to, why)]
        self.state = to


class Mode(str, enum.Enum):
    """How the daemon schedules the models around a press (`daemon.mode`)."""

    OVERLAPPED = "overlapped"  # look and listen while the button is held; only the question is left at release
    SEQUENTIAL = "sequential"  # everything after release (for comparison)

    def __str__(self) -> str:
        return self.value


class PressKind(enum.Enum):
    NEW = "new"  # a new question about a new frame
    FOLLOW_UP = "follow_up"  # soon after an answer: a question about the same scene
    BARGE_IN = "barge_in"  # while thinking or speaking: stop, then a new question
    REPEAT = "repeat"  # the second press of a double press: say the last answer again


@dataclass(frozen=True)
class Timing:
    """The interaction settings `classify_press` needs (seconds)."""

    follow_up_s: float
    tap_s: float
    double_press_s: float


def classify_press(
    state: State,
    now: float,
    *,
    last_answer_end: float | None,
    last_tap_end: float | None,
    has_answer: bool,
    has_scene: bool,
    timing: Timing,
) -> PressKind | None:
    """What a button press at `now` means; None when it means nothing (the button is already held)."""
    match state:
        case State.LISTENING:
            return None
        case State.THINKING | State.SPEAKING:
            return PressKind.BARGE_IN
    if has_answer and last_tap_end is not None and now - last_tap_end <= timing.double_press_s:
        return PressKind.REPEAT
    if has_scene and last_answer_end is not None and now - last_answer_end <= timing.follow_up_s:
        return PressKind.FOLLOW_UP
    return PressKind.NEW


def is_tap(hold_s: float, timing: Timing) -> bool:
    """A press released this quickly is a tap (half of a double press), not a spoken question."""
    return hold_s < timing.tap_s


# --- messages the loop dispatches ---------------------------------------------------------------------------
# Button presses and releases arrive as edgevision.devices.button.Pressed / Released; the rest are these.


@dataclass(frozen=True)
class RecordingCapped:
    """The button has been held for the longest recording: treat it as released."""

    interaction: int


@dataclass(frozen=True)
class Looked:
    """The frame was encoded and its prefix prefilled (overlapped mode, while the button is held)."""

    interaction: int
    scene: Any


@dataclass(frozen=True)
class Heard:
    """The recording was transcribed."""

    interaction: int
    question: str


@dataclass(frozen=True)
class Spoken:
    """One synthesised sentence of the answer (or of a phrase), ready to play."""

    interaction: int
    audio: Any


@dataclass(frozen=True)
class Answered:
    """The answer is complete (or was cut short by a barge-in or shutdown)."""

    interaction: int
    answer: Any


@dataclass(frozen=True)
class Failed:
    """A stage of the interaction failed; `phrase` is what to say to the user."""

    interaction: int
    phrase: str
    error: str


@dataclass(frozen=True)
class SpeechDone:
    """The speaker has played everything queued for the interaction."""

    interaction: int


@dataclass(frozen=True)
class Shutdown:
    """Stop: SIGTERM, SIGINT or `Daemon.stop()`."""

    reason: str
