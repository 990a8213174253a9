"""Early transcripts: the question recognised while the button is still held (overlapped mode).

At each pause (`endpoint.ends_in_pause`) the daemon has the worker transcribe the recording so far
(`transcribe_early`); on release, `early_question` takes that transcript as the question if only quiet
followed it, so recognition after release is skipped.
"""

from __future__ import annotations

import logging
import time

from edgevision.assistant import Assistant
from edgevision.daemon.endpoint import only_quiet_after
from edgevision.daemon.record import EarlyTranscript, Interaction
from edgevision.daemon.state import Mode
from edgevision.errors import EdgevisionError, InputError
from edgevision.speech.audio import Audio

logger = logging.getLogger(__name__)


def transcribe_early(assistant: Assistant, ix: Interaction, audio: Audio) -> None:
    """Transcribe the recording so far (the button is still held), for `early_question` to use; runs in the
    model worker."""
    if ix.released_at is not None or ix.cancelled:
        return  # let go before this could start: transcribing the whole recording costs the same
    started = time.perf_counter()
    try:
        question, error = assistant.transcribe(audio), None
    except InputError as heard_nothing:
        question, error = None, str(heard_nothing)
    except EdgevisionError as failed:
        logger.warning("early recognition failed (the whole recording is recognised after release): %s", failed)
        return
    ix.early = EarlyTranscript(len(audio.samples), question, error, time.perf_counter() - started)
    ix.early_count += 1
    logger.debug("early transcript of %.2f s: %s", audio.duration, question)


def early_question(ix: Interaction, audio: Audio) -> str | None:
    """The early transcript as the question, if everything recorded after it is quiet (then the recording
    is what it heard plus silence: the same words); None if there is none or speech went on after it."""
    if ix.mode != Mode.OVERLAPPED:
        return None
    early, ix.early_used = ix.early, False
    if early is None:
        return None
    if not only_quiet_after(audio.samples, early.n_samples, audio.sample_rate):
        logger.debug(
            "speech after the early transcript (%.2f s of %.2f s): recognising it all again",
            early.n_samples / audio.sample_rate,
            audio.duration,
        )
        return None
    ix.early_used, ix.recognition_s = True, early.seconds
    if early.question is None:
        raise InputError(early.error or "no speech was recognised in the recording")
    return early.question
