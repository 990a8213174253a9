"""edgevision: an offline visual assistant for a push-to-talk device on a Jetson board."""

__version__ = "0.1.0"

import os as _os

# ONNX Runtime records telemetry (OS, CPU, process path) under ~/.cache/Microsoft as soon as it is imported,
# unless this is set before the import; set here so it also holds for Piper's process, which inherits it.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
