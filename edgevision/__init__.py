"""edgevision: an offline visual assistant for a push-to-talk device on a Jetson board."""

__version__ = "0.1.0"
