"""The peer of `edgevision bench e2e --peer`: the sequential pipeline a user would script, in its own process.

After the button is let go: faster-whisper transcribes the recording (the same model and settings as
ours), llama-cpp-python's high-level `Llama` answers through a `Llava15ChatHandler` subclass laid out as
Gemma 3 expects, streamed with `create_chat_completion(stream=True)`, and Piper, imported into this process
as its own Python API invites, speaks each sentence as soon as it is complete. Same decoder file, the same
vision tower as an mmproj (ours runs its ONNX export), same threads, flash attention on, greedy decoding.

This module imports Piper (GPL-3.0), so it is only ever run as a separate process (``python -m
edgevision.daemon.peer``, started by the benchmark) and never imported by edgevision itself; everything that
needs piper, llama_cpp or faster_whisper is imported inside `main`.

Protocol: one JSON object per line. The peer writes ``{"event": "ready", ...}`` once loaded; then for each
request line ``{"audio": "q.npy", "image": "scene.png", "release": T}`` (16 kHz float32 samples; T the
`time.monotonic()` of the release, a clock every process shares) it answers and writes one result line
with the answer and its moments as `time.monotonic()` readings. An empty line or end of input ends it.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from pathlib import Path

# What a user's script would treat as the end of a sentence: . ! ? followed by a space, or a line break.
_SENTENCE_END = re.compile(r"[.!?]+\s|\n")

# Gemma 3's layout, as edgevision's prompt.GEMMA3 has it (BOS comes from tokenizing with add_special). The
# handler's Jinja environment trims the line break after a tag, so line breaks are written as expressions.
GEMMA3_CHAT = (
    "<start_of_turn>user{{ '\\n' }}"
    "{% for message in messages %}{% if message.role == 'system' %}"
    "{{ message.content }}{{ '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% for message in messages %}{% if message.role == 'user' %}"
    "{% for content in message.content %}{% if content.type == 'image_url' %}"
    "{{ '\\n\\n<start_of_image>' }}{{ content.image_url.url }}{{ '<end_of_image>\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% for content in message.content %}{% if content.type == 'text' %}{{ content.text }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "<end_of_turn>{{ '\\n' }}<start_of_turn>model{{ '\\n' }}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m edgevision.daemon.peer", description=__doc__.split("\n")[0])
    parser.add_argument("--whisper", required=True, help="faster-whisper (CTranslate2) model directory")
    parser.add_argument("--language", default="en")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--whisper-threads", type=int, default=0)
    parser.add_argument("--decoder", required=True, help="GGUF decoder")
    parser.add_argument("--mmproj", required=True, help="the vision tower as a llama.cpp mmproj GGUF")
    parser.add_argument("--threads", type=int, required=True, help="decoder and vision threads")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--system", default="")
    parser.add_argument("--voice", required=True, help="Piper voice (.onnx, its .onnx.json beside it)")
    parser.add_argument("--length-scale", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import llama_cpp
    import numpy as np
    from faster_whisper import WhisperModel
    from llama_cpp.llama_chat_format import Llava15ChatHandler
    from piper import PiperVoice, SynthesisConfig

    class Gemma3ChatHandler(Llava15ChatHandler):
        DEFAULT_SYSTEM_MESSAGE = None
        CHAT_FORMAT = GEMMA3_CHAT

    whisper = WhisperModel(
        args.whisper, device="cpu", compute_type="int8", cpu_threads=args.whisper_threads, local_files_only=True
    )
    # llama.cpp's extra buffer types (repacked weights; AMX) off, as edgevision's decoder has them: Llama()
    # takes no argument for it in 0.3.36, so the model parameters it starts from are changed before it loads.
    default_params = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        llm = llama_cpp.Llama(
            model_path=args.decoder,
            chat_handler=Gemma3ChatHandler(clip_model_path=args.mmproj, verbose=False),
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            flash_attn=True,
            verbose=False,
        )
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default_params
    voice = PiperVoice.load(args.voice)
    synthesis = SynthesisConfig(length_scale=args.length_scale)
    _send({"event": "ready", "load_s": time.monotonic() - started, "started": started})

    for line in sys.stdin:
        if not line.strip():
            break
        request = json.loads(line)
        release = request["release"]
        moments: dict[str, float] = {}
        samples = np.load(request["audio"])
        segments, _ = whisper.transcribe(
            samples,
            language=args.language,
            beam_size=args.beam_size,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        question = " ".join(segment.text.strip() for segment in segments).strip()
        moments["heard"] = time.monotonic()
        image = base64.b64encode(Path(request["image"]).read_bytes()).decode("ascii")
        kind = "png" if request["image"].endswith(".png") else "jpeg"
        stream = llm.create_chat_completion(
            messages=[
                {"role": "system", "content": args.system},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{image}"}},
                        {"type": "text", "text": question},
                    ],
                },
            ],
            stream=True,
            temperature=0.0,
            repeat_penalty=1.0,
            max_tokens=args.max_tokens,
            seed=0,
        )
        text, pending, spoken = "", "", 0.0

        def say(sentence: str, moments: dict[str, float] = moments) -> float:
            seconds = 0.0
            for chunk in voice.synthesize(sentence, syn_config=synthesis):
                seconds += len(chunk.audio_float_array) / chunk.sample_rate
                moments.setdefault("first_audio", time.monotonic())  # ready to play
            return seconds

        for event in stream:
            piece = event["choices"][0]["delta"].get("content") or ""
            if not piece:
                continue
            moments.setdefault("first_token", time.monotonic())
            text += piece
            pending += piece
            while (end := _SENTENCE_END.search(pending)) is not None:
                sentence, pending = pending[: end.end()].strip(), pending[end.end() :]
                if sentence:
                    spoken += say(sentence)
        if pending.strip():
            spoken += say(pending.strip())
        moments["answered"] = time.monotonic()
        _send(
            {
                "event": "answer",
                "question": question,
                "answer": text.strip(),
                "release": release,
                "moments": moments,
                "speech_s": spoken,
            }
        )
    return 0


def _send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
