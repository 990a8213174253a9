"""The control socket as a button: a local Unix socket taking lines "press" and "release".

Each line gets one reply line: "ok", the reply of an extra command the owner registered (the daemon adds
"status"), or "error: ...". The socket file is made with mode 0660 (the group is the service's, through
systemd), so only local members of that group can press. `send_button()` is the client: the CLI's
`edgevision press` / `release` and the tests use it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgevision.devices.button import CLOSED, ButtonEvent, debounced
from edgevision.errors import DeviceError

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/edgevision/control.sock")

Command = Callable[[str], "str | Awaitable[str]"]  # the rest of the line → the reply line


class SocketButton:
    """A button pressed through a local Unix socket; also serves extra commands given in `commands`."""

    @dataclass(frozen=True)
    class Settings:
        """only the control socket (edgevision press / release), which every kind also serves"""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] = DEFAULT_SOCKET,
        *,
        debounce: float = 0.0,
        mode: int = 0o660,
        commands: Mapping[str, Command] | None = None,
    ) -> None:
        self.path = Path(socket_path)
        self.debounce = debounce
        self.mode = mode
        self.commands = dict(commands or {})
        self._raw: asyncio.Queue[object] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on the socket (done by `events()` too); DeviceError if it cannot, or another process does."""
        if self._server is not None:
            return
        self._raw = asyncio.Queue()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise DeviceError(f"control socket {self.path} exists and is not a socket — remove it or choose "
                                  "another devices.control_socket")
            if _listening(self.path):
                raise DeviceError(f"control socket {self.path} is in use: is another edgevision running? "
                                  "(`edgevision status`)")
            self.path.unlink()  # left by a process that died
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            os.chmod(self.path, self.mode)
        except OSError as error:
            raise DeviceError(f"cannot listen on control socket {self.path}: {error.strerror} — check that its "
                              "directory is writable by this user (systemd: RuntimeDirectory=edgevision)") from error
        logger.info("button: listening on %s", self.path)

    async def events(self) -> AsyncIterator[ButtonEvent]:
        await self.start()
        assert self._raw is not None
        async for event in debounced(self._raw, self.debounce):
            yield event

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await server.wait_closed()
        if self._raw is not None:
            self._raw.put_nowait(CLOSED)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while line := await reader.readline():
                writer.write((await self._answer(line.decode("utf-8", "replace").strip()) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _answer(self, line: str) -> str:
        name, _, rest = line.partition(" ")
        assert self._raw is not None
        match name:
            case "press" | "release":
                self._raw.put_nowait((name == "press", time.monotonic()))
                return "ok"
            case "" :
                return "error: empty command"
            case _ if name in self.commands:
                try:
                    reply = self.commands[name](rest)
                    if inspect.isawaitable(reply):
                        reply = await reply
                except Exception as error:  # a failing command must not take the socket down
                    logger.exception("control socket: command %r failed", name)
                    return f"error: {name} failed: {error}"
                return str(reply).replace("\n", " ")
            case _:
                known = ", ".join(["press", "release", *self.commands])
                return f"error: unknown command {name!r}; known: {known}"


def send_button(socket_path: str | os.PathLike[str], command: str, *, timeout: float = 5.0) -> str:
    """Send one line ("press", "release", "status", ...) to the control socket and return the reply line.

    Waits up to `timeout` for the socket to appear (the daemon may be starting); raises DeviceError if no one
    listens or the reply is an error.
    """
    path = Path(socket_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(path))
                sock.sendall((command.strip() + "\n").encode())
                reply = _read_line(sock)
            break
        except (FileNotFoundError, ConnectionRefusedError) as error:
            if time.monotonic() >= deadline:
                raise DeviceError(f"no edgevision is listening on {path} ({error.strerror}) — start it "
                                  "(`systemctl start edgevision`) or pass the right --socket") from None
            time.sleep(0.05)
        except PermissionError:
            raise DeviceError(f"not allowed to use {path} — add this user to the edgevision group") from None
        except TimeoutError:
            raise DeviceError(f"edgevision on {path} did not answer within {timeout:g} s") from None
    if reply.startswith("error:"):
        raise DeviceError(f"edgevision: {reply.removeprefix('error:').strip()}")
    return reply


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True
