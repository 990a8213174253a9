"""Logging set-up, done once by each entry point (the `edgevision` command and its subcommands)."""

from __future__ import annotations

import logging
import os
import sys

# Libraries that narrate their work (llama.cpp's loader warns about quirks of the bundled models it fixes itself;
# faster-whisper logs every utterance): a user sees them with --debug only.
_CHATTY_LOGGERS = {
    "edgevision.decoder.native": logging.ERROR,
    "edgevision.vision.mtmd.native": logging.ERROR,
    "faster_whisper": logging.WARNING,
}


def configure_logging(level: str, debug: bool) -> None:
    """Log to stderr at `level` ("info", ...; DEBUG with `debug`); under systemd without timestamps (journald
    adds them)."""
    under_systemd = "INVOCATION_ID" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    level_no = logging.DEBUG if debug else getattr(logging, level.upper())
    logging.basicConfig(level=level_no, format=fmt, stream=sys.stderr, force=True)
    for name, quiet in _CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.DEBUG if debug else max(level_no, quiet))
