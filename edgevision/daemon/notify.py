"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET telling systemd how the service is doing.

READY=1 once the models are loaded and warmed up, STATUS=... lines, WATCHDOG=1 pings from the main loop
(every half of $WATCHDOG_USEC) and STOPPING=1 on the way out. Outside systemd (no NOTIFY_SOCKET) every call
does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """A connection to systemd's notification socket, if the service manager gave one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog_s = _watchdog_seconds(env)
        self._socket: socket.socket | None = None
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)  # never stall the loop on a supervisor that reads slowly

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str | int) -> None:
        """Send fields as KEY=VALUE lines: `send(READY=1, STATUS="answering")`. Failures (including a full
        socket queue) are logged, not raised: a missing or slow supervisor must not stop the device answering."""
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode("utf-8"), self.address)
        except OSError as error:
            logger.warning("sd_notify to %s failed: %s", self.address, error)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """$WATCHDOG_USEC in seconds when it is meant for this process ($WATCHDOG_PID absent or ours)."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    return seconds if seconds > 0 else None
