"""The appliance daemon: one asyncio loop coordinating the button, camera, microphone and speaker with the
models, which run one step at a time in a single worker thread.

Overlapped mode, the default: on press the frame is taken, the microphone starts and — while the user is
still speaking — the worker encodes the frame and prefills its prompt prefix, then transcribes what has
been said so far at each pause (`endpoint.py`). On release, if nothing but quiet was recorded after the
last such early transcript, it is the question; otherwise the whole recording is transcribed. Then only the
question is left to prefill, and the answer is spoken sentence by sentence as it is generated. Sequential
mode does everything after release, for comparison.

The loop is the only place that touches the devices and the state machine; the worker only computes and
posts messages back (`state.py`). Components are built by the caller (`build.build_daemon`) and passed
in, so tests hand in software devices; the daemon closes them when it stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgevision.assistant import Answer, Assistant, Scene
from edgevision.config import DaemonSettings
from edgevision.daemon.earcons import earcon
from edgevision.daemon.early import early_question, transcribe_early
from edgevision.daemon.endpoint import ends_in_pause
from edgevision.daemon.notify import Notifier
from edgevision.daemon.record import Interaction, interaction_record, keep_captures
from edgevision.daemon.state import (
    Answered,
    Failed,
    Heard,
    Looked,
    Mode,
    PressKind,
    RecordingCapped,
    Shutdown,
    SpeechDone,
    Spoken,
    State,
    StateMachine,
    Timing,
    classify_press,
    is_tap,
)
from edgevision.devices.button import Button, Pressed, Released
from edgevision.devices.camera import Camera
from edgevision.devices.socket_button import SocketButton
from edgevision.devices.sound import Microphone, Speaker
from edgevision.errors import DeviceError, EdgevisionError, InputError
from edgevision.speech.audio import Audio
from edgevision.telemetry.log import InteractionLog
from edgevision.telemetry.meters import start_meters, stop_meters

logger = logging.getLogger(__name__)

CAMERA_PHRASE = "The camera is not working."
MICROPHONE_PHRASE = "The microphone is not working."
ERROR_PHRASE = "Sorry, something went wrong."
NO_ANSWER_PHRASE = "Sorry, I have no answer to that."
_EVENT_QUEUE = 64
_BUTTON_BACKOFF_S = (0.5, 10.0)
# While the button is held (overlapped mode), how often the loop looks at the recording for a pause: a
# fraction of endpoint.PAUSE_S, so a pause is noticed soon after it is long enough.
_LISTEN_TICK_S = 0.05


class Daemon:
    """Owns the assistant and the devices; `await run()` serves presses until `stop()` (or SIGTERM)."""

    def __init__(
        self,
        *,
        assistant: Assistant,
        camera: Camera,
        microphone: Microphone,
        speaker: Speaker,
        buttons: Sequence[Button],
        settings: DaemonSettings,
        control: SocketButton | None = None,
        log: InteractionLog | None = None,
        meters: dict[str, Callable[[], Any]] | None = None,
        notifier: Notifier | None = None,
        captures: Path | None = None,
        store_audio: bool = False,
        store_images: bool = False,
        models: dict[str, str] | None = None,
    ) -> None:
        self.assistant = assistant
        self.camera = camera
        self.microphone = microphone
        self.speaker = speaker
        self.buttons = list(buttons)
        self.settings = settings
        self.mode = Mode(settings.mode)
        self.control = control  # the SocketButton (one of `buttons`) that also serves `edgevision status`
        self.log = log
        self.meters = dict(meters or {})  # name → a new meter (start(), stop() -> reading) for each interaction
        self.notifier = notifier or Notifier({})
        self.captures = captures  # where recordings and frames are kept, if they are
        self.store_audio, self.store_images = store_audio, store_images
        self.closing: list[Callable[[], None]] = []  # more to close after the devices (log, power reader)
        self.models = dict(models or {})
        self.machine = StateMachine()
        self.timing = Timing(settings.follow_up_s, settings.tap_s, settings.double_press_s)
        self.records: list[dict[str, Any]] = []  # the last few, newest last; each is also in the log
        self.on_record: Callable[[dict[str, Any]], None] | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgevision-models")
        self._events: asyncio.Queue[Any] = asyncio.Queue(_EVENT_QUEUE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 0
        self._current: Interaction | None = None
        self._pending: dict[int, Interaction] = {}  # interactions whose record is not written yet
        self._last_answer: Answer | None = None
        self._last_scene: Scene | None = None
        self._last_answer_end: float | None = None
        self._last_tap_end: float | None = None
        self._cap_timer: asyncio.TimerHandle | None = None
        self._phrases: dict[str, Audio] = {}
        self._earcons: dict[str, Audio] = {}
        self._busy_since: float | None = None
        self._stopping = False
        self._ready = asyncio.Event()
        self._started_at = time.monotonic()
        self._tasks: list[asyncio.Task] = []
        if control is not None:
            control.commands["status"] = lambda _rest: json.dumps(self.status())

    # --- public -------------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self.machine.state

    async def run(self) -> None:
        """Warm up, tell systemd READY, then serve until `stop()`; closes every component on the way out."""
        self._loop = asyncio.get_running_loop()
        try:
            if self.control is not None:  # no READY without the control socket: a broken one is a lasting fault
                await self.control.start()
            self.notifier.status("warming up the models")
            await self._in_worker(self._warm_up)
            self._start_camera()
            for button in self.buttons:
                self._tasks.append(asyncio.create_task(self._read_button(button), name="button"))
            if self.notifier.watchdog_s:
                self._tasks.append(asyncio.create_task(self._watchdog(), name="watchdog"))
            self._ready.set()
            self.notifier.ready(f"ready ({self.mode}): hold the button and ask")
            logger.info("ready (%s mode); models: %s", self.mode, ", ".join(self.models.values()) or "loaded")
            while True:
                message = await self._events.get()
                if isinstance(message, Shutdown):
                    logger.info("stopping: %s", message.reason)
                    break
                self._dispatch(message)
        finally:
            await self._shutdown()

    def stop(self, reason: str = "asked to stop") -> None:
        """Ask the loop to stop (safe from a signal handler on the loop)."""
        self._stopping = True
        try:
            self._events.put_nowait(Shutdown(reason))
        except asyncio.QueueFull:
            asyncio.get_running_loop().create_task(self._events.put(Shutdown(reason)))

    def status(self) -> dict[str, Any]:
        """What `edgevision status` prints: state, models, the last interaction's timings."""
        last = self.records[-1] if self.records else None
        return {
            "state": self.state.value,
            "mode": self.mode,
            "ready": self._ready.is_set(),
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "models": self.models,
            "interactions": self._next_id,
            # a MoE decoder's placement: its plan now, pinned bytes, hit rate, storage reads and faults since start
            "placement": self.assistant.placement.status() if self.assistant.placement is not None else None,
            "last": None
            if last is None
            else {k: last.get(k) for k in ("time", "kind", "question", "answer", "error", "durations_s")},
        }

    # --- the loop -----------------------------------------------------------------------------------------

    def _dispatch(self, message: Any) -> None:
        match message:
            case Pressed(t=t):
                self._on_press(t)
            case Released(t=t):
                self._on_release(t)
            case RecordingCapped(interaction=i) if self._is_current(i) and self.state is State.LISTENING:
                logger.info("recording capped at %.0f s", self.settings.max_recording_s)
                self._current.capped = True
                self._on_release(time.monotonic())
            case Looked(interaction=i):
                if (ix := self._pending.get(i)) is not None:
                    ix.looked_at = time.monotonic()
                    self._listen(ix)  # the image is in: recognition may use the worker now
            case Heard(interaction=i, question=question):
                if (ix := self._pending.get(i)) is not None:
                    ix.heard_at, ix.question = time.monotonic(), question
                    logger.info("heard: %s", question)
                    self.notifier.status(f"answering: {question[:60]}")
            case Spoken(interaction=i, audio=audio) if self._is_current(i):
                self._on_spoken(self._current, audio)
            case Answered(interaction=i, answer=answer):
                if (ix := self._pending.get(i)) is not None:
                    self._on_answered(ix, answer)
            case Failed(interaction=i, phrase=phrase, error=error):
                if (ix := self._pending.get(i)) is not None:
                    self._on_failed(ix, phrase, error)
            case SpeechDone(interaction=i) if self._is_current(i) and self.state is State.SPEAKING:
                self._on_speech_done(self._current)
            case _:
                logger.debug("ignored %s in state %s", message, self.state.value)

    def _is_current(self, interaction: int) -> bool:
        return self._current is not None and self._current.id == interaction

    def _on_press(self, t: float) -> None:
        kind = classify_press(
            self.state,
            t,
            last_answer_end=self._last_answer_end,
            last_tap_end=self._last_tap_end,
            has_answer=self._last_answer is not None and self._last_answer.speech is not None,
            has_scene=self._last_scene is not None,
            timing=self.timing,
        )
        if kind is None:
            return
        self._last_tap_end = None
        barge_in = kind is PressKind.BARGE_IN
        if barge_in:
            self._interrupt(self._current, "barge_in")
            kind = PressKind.NEW
        ix = self._new_interaction(kind, t, barge_in=barge_in)
        if kind is PressKind.REPEAT:
            logger.info("double press: repeating the last answer")
            self.machine.move(State.SPEAKING, "double press: repeat the last answer")
            assert self._last_answer is not None and self._last_answer.speech is not None
            self.speaker.play(self._last_answer.speech)
            self._wait_for_speech(ix)
            return
        if kind is PressKind.NEW:
            started = time.perf_counter()
            try:
                ix.frame = self.camera.latest()
            except DeviceError as error:
                logger.warning("no frame at the press: %s", error)
                self._pending[ix.id] = ix
                self._on_failed(ix, CAMERA_PHRASE, str(error))
                self._start_camera()  # if it never started; a started camera retries by itself
                return
            ix.capture_s = time.perf_counter() - started
        else:
            ix.scene = self._last_scene
        self._pending[ix.id] = ix
        try:
            self.microphone.start()
        except DeviceError as error:
            self._on_failed(ix, MICROPHONE_PHRASE, str(error))
            return
        self.machine.move(State.LISTENING, f"press ({'barge-in, ' if barge_in else ''}{kind.value})")
        self._earcon("listening")
        self._start_meters(ix)
        self._cap_timer = self._loop.call_later(
            self.settings.max_recording_s, self._events.put_nowait, RecordingCapped(ix.id)
        )
        if ix.kind is PressKind.NEW and ix.mode == Mode.OVERLAPPED:
            ix.look = self._submit(self._look, ix)
        elif ix.mode == Mode.OVERLAPPED:
            self._listen(ix)  # a follow-up: no image to look at first

    def _on_release(self, t: float) -> None:
        ix = self._current
        if ix is None or self.state is not State.LISTENING:
            return
        if self._cap_timer is not None:
            self._cap_timer.cancel()
            self._cap_timer = None
        audio = self.microphone.stop()
        ix.released_at = t
        if is_tap(t - ix.pressed_at, self.timing) and not ix.capped:
            logger.debug("tap of %.2f s: not a question", t - ix.pressed_at)
            self._last_tap_end = t
            self._stop_meters(ix)
            del self._pending[ix.id]
            self.machine.move(State.IDLE, "tap")
            return
        if self.store_audio:
            ix.audio = audio
        self.machine.move(State.THINKING, "release" if not ix.capped else "recording capped")
        self._earcon("thinking")
        self.notifier.status("listening done; thinking")
        ix.job = self._submit(self._think, ix, audio)

    def _listen(self, ix: Interaction) -> None:
        """Overlapped mode, while the button is held: at each pause in the recording, and when the worker is
        free, hand what has been said so far to the worker to transcribe (`early.transcribe_early`)."""
        if not self._is_current(ix.id) or self.state is not State.LISTENING or ix.mode != Mode.OVERLAPPED:
            return
        if ix.early_job is None or ix.early_job.done():
            try:
                audio = self.microphone.captured()
            except DeviceError as error:
                logger.warning("microphone: cannot read the recording so far (%s); recognising after release", error)
                return
            if ends_in_pause(audio.samples, ix.early_samples, audio.sample_rate):
                ix.early_samples = len(audio.samples)
                ix.early_job = self._submit(transcribe_early, self.assistant, ix, audio)
        self._loop.call_later(_LISTEN_TICK_S, self._listen, ix)

    def _on_spoken(self, ix: Interaction, audio: Audio) -> None:
        if ix.cancelled:
            return
        if ix.first_audio_at is None:
            ix.first_audio_at = time.monotonic()
            self.machine.move(State.SPEAKING, "first sentence ready")
        self.speaker.play(audio)

    def _on_answered(self, ix: Interaction, answer: Answer) -> None:
        ix.answer, ix.answered_at = answer, time.monotonic()
        if ix.cancelled:
            self._finish(ix)
            return
        logger.info("answered: %s", answer.text)
        if answer.speech is None:  # nothing to say: say so, rather than leave the user waiting
            self._on_failed(ix, NO_ANSWER_PHRASE, "the decoder produced no answer text")
            return
        self._last_answer, self._last_scene = answer, ix.scene
        self._wait_for_speech(ix)

    def _on_failed(self, ix: Interaction, phrase: str, error: str) -> None:
        ix.error, ix.answered_at = error, ix.answered_at or time.monotonic()
        if ix.cancelled:
            self._finish(ix)
            return
        logger.warning("interaction %d: %s", ix.id, error)
        ix.said = phrase
        if self.state is not State.SPEAKING:  # (it is when a barge-in found the camera gone)
            self.machine.move(State.SPEAKING, f"failure spoken: {error[:80]}")
        self._earcon("error")
        self.speaker.play(self._phrase(phrase))
        ix.first_audio_at = ix.first_audio_at or time.monotonic()
        self._wait_for_speech(ix)

    def _on_speech_done(self, ix: Interaction) -> None:
        ix.speech_done_at = time.monotonic()
        self.machine.move(State.IDLE, "speech finished")
        self.notifier.status("ready: hold the button and ask")
        if ix.kind is not PressKind.REPEAT:
            if ix.error is None:  # the follow-up window opens after an answer, not after an apology
                self._last_answer_end = ix.speech_done_at
            self._finish(ix)

    def _interrupt(self, ix: Interaction | None, reason: str) -> None:
        """Cut an interaction short: silence the speaker at once and stop generating."""
        self.speaker.stop()
        if ix is None or ix.cancelled:
            return
        ix.interrupted = reason
        logger.info("interaction %d interrupted (%s)", ix.id, reason)
        if ix.id in self._pending and (ix.job is None or ix.job.done()) and (ix.answer or ix.error):
            self._finish(ix)  # its answer was complete and being spoken: nothing more will arrive for it

    def _new_interaction(self, kind: PressKind, t: float, *, barge_in: bool) -> Interaction:
        self._next_id += 1
        wall = time.time() - (time.monotonic() - t)
        ix = Interaction(self._next_id, kind, self.mode, t, wall, barge_in=barge_in)
        self._current = ix
        return ix

    def _wait_for_speech(self, ix: Interaction) -> None:
        async def wait() -> None:
            while not await asyncio.to_thread(self.speaker.wait, 0.5):
                if ix.cancelled or self._current is not ix:
                    return
            await self._events.put(SpeechDone(ix.id))

        self._tasks.append(asyncio.create_task(wait(), name=f"speech-{ix.id}"))
        self._tasks = [t for t in self._tasks if not t.done()]

    def _finish(self, ix: Interaction) -> None:
        """Write the interaction's record (once)."""
        if self._pending.pop(ix.id, None) is None:
            return
        if self._cap_timer is not None and self._current is ix:
            self._cap_timer.cancel()
        record = interaction_record(ix, self._stop_meters(ix))
        if self.captures is not None:
            record.update(keep_captures(ix, self.captures, audio=self.store_audio, image=self.store_images))
        self.records = [*self.records[-9:], record]
        if self.log is not None:
            try:
                self.log.write(record)
            except OSError as error:
                logger.error("cannot write the interaction log: %s", error)
        if self.on_record is not None:
            self.on_record(record)

    # --- devices ------------------------------------------------------------------------------------------

    async def _read_button(self, button: Button) -> None:
        delay = _BUTTON_BACKOFF_S[0]
        while not self._stopping:
            try:
                async for event in button.events():
                    await self._events.put(event)
                    delay = _BUTTON_BACKOFF_S[0]
                return
            except DeviceError as error:
                logger.warning("button: %s; retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BUTTON_BACKOFF_S[1])

    def _start_camera(self) -> None:
        try:
            self.camera.start()
        except DeviceError as error:
            logger.warning("camera not available yet: %s", error)

    def _earcon(self, name: str) -> None:
        if self.settings.earcons:
            self.speaker.play(self._earcons[name])

    def _phrase(self, text: str) -> Audio:
        if text not in self._phrases:  # known phrases are synthesised at warm-up; others cost a moment now
            self._phrases[text] = self.assistant.synthesizer.synthesize(text)
        return self._phrases[text]

    def _start_meters(self, ix: Interaction) -> None:
        ix.meters.update(start_meters(self.meters))

    def _stop_meters(self, ix: Interaction) -> dict[str, Any]:
        return stop_meters(ix.meters)

    # --- the worker (models, one step at a time) ----------------------------------------------------------

    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        def timed() -> Any:
            self._busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._busy_since = None

        return self._worker.submit(timed)

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._submit(fn, *args))

    def _post(self, message: Any) -> None:
        """From the worker: hand a message to the loop (waits while its queue is full)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            asyncio.run_coroutine_threadsafe(self._events.put(message), self._loop)

    def _warm_up(self) -> None:
        """Run every model once, so the first real question is as fast as the rest, and synthesise the phrases."""
        started = time.perf_counter()
        synthesizer = self.assistant.synthesizer
        if synthesizer is None:
            raise EdgevisionError("the daemon needs speech synthesis: build the assistant with speak=True")
        for phrase in (self.settings.didnt_catch, CAMERA_PHRASE, MICROPHONE_PHRASE, ERROR_PHRASE, NO_ANSWER_PHRASE):
            self._phrases[phrase] = synthesizer.synthesize(phrase)
        self._earcons = {name: earcon(name, synthesizer.sample_rate) for name in ("listening", "thinking", "error")}
        with contextlib.suppress(InputError):
            self.assistant.transcribe(Audio(np.zeros(8000, dtype=np.float32), 16_000))
        self.assistant.look(Image.new("RGB", (64, 64), (128, 128, 128)))
        logger.info("models warmed up in %.1f s", time.perf_counter() - started)

    def _look(self, ix: Interaction) -> Scene:
        assert ix.frame is not None
        scene = self.assistant.look(ix.frame.image)
        ix.scene = scene
        self._post(Looked(ix.id, scene))
        return scene

    def _think(self, ix: Interaction, audio: Audio) -> Any:
        """Recognise (or take the early transcript), (in sequential mode) look, then answer, speaking each
        sentence as it is ready. Returns the outcome message, which is also posted to the loop."""
        try:
            try:
                question = early_question(ix, audio)
                if question is None:
                    started = time.perf_counter()
                    question = self.assistant.transcribe(audio)
                    ix.recognition_s = time.perf_counter() - started
            finally:
                ix.transcribed_at = time.monotonic()
            self._post(Heard(ix.id, question))
            if ix.cancelled:
                raise _Cancelled
            if ix.look is not None:
                scene = ix.look.result()  # done already: the worker ran it before this job
            elif ix.scene is not None:
                scene = ix.scene  # a follow-up: the previous answer's scene
            else:
                assert ix.frame is not None
                scene = self._look(ix)
            ix.answer_started_at = time.monotonic()
            answer = self.assistant.answer(
                question,
                scene,
                on_speech=lambda chunk: self._post(Spoken(ix.id, chunk)),
                should_stop=lambda: ix.cancelled or self._stopping,
            )
            outcome: Any = Answered(ix.id, answer)
        except _Cancelled:
            outcome = Failed(ix.id, "", "interrupted before answering")
        except InputError as error:
            outcome = Failed(ix.id, self.settings.didnt_catch, str(error))
        except EdgevisionError as error:
            outcome = Failed(ix.id, ERROR_PHRASE, str(error))
        except Exception as error:  # an unexpected bug: say so, keep serving, log the traceback
            logger.exception("interaction %d failed", ix.id)
            outcome = Failed(ix.id, ERROR_PHRASE, f"{error.__class__.__name__}: {error}")
        self._post(outcome)
        return outcome

    async def _watchdog(self) -> None:
        """Ping systemd every half watchdog period from this loop; a hung loop stops the pings, and so does a
        model step stuck for longer than daemon.worker_timeout_s."""
        assert self.notifier.watchdog_s is not None
        period = self.notifier.watchdog_s / 2
        warned: float | None = None  # the start of the step last said to be stuck (each stuck step is said once)
        while True:
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > self.settings.worker_timeout_s:
                if warned != busy:
                    logger.error(
                        "a model step has run for over %.0f s; letting the watchdog restart the service",
                        self.settings.worker_timeout_s,
                    )
                    warned = busy
            else:
                self.notifier.watchdog()
            await asyncio.sleep(period)

    # --- stopping -----------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._stopping = True
        self.notifier.stopping()
        with contextlib.suppress(DeviceError):
            self.speaker.stop()
        if self.state is State.LISTENING:
            with contextlib.suppress(DeviceError):
                self.microphone.stop()
        for ix in list(self._pending.values()):
            ix.interrupted = ix.interrupted or "shutdown"
        for ix in list(self._pending.values()):  # let each answer stop at its next token, then record it
            if ix.job is not None:
                try:
                    outcome = await asyncio.wait_for(asyncio.wrap_future(ix.job), self.settings.worker_timeout_s)
                except asyncio.TimeoutError:
                    ix.error = "the model step did not stop in time"
                else:
                    match outcome:
                        case Answered(answer=answer):
                            ix.answer = answer
                        case Failed(error=error):
                            ix.error = error
            self._finish(ix)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for button in self.buttons:
            await button.close()
        self._worker.shutdown(wait=True)
        for name, close in (
            ("camera", self.camera.close),
            ("microphone", self.microphone.close),
            ("speaker", self.speaker.close),
            ("models", self.assistant.close),
        ):
            try:
                close()
            except (OSError, EdgevisionError) as error:
                logger.warning("closing the %s: %s", name, error)
        for close in self.closing:
            close()
        self.notifier.close()
        logger.info("stopped")


class _Cancelled(Exception):
    """The interaction was cut short between stages."""
