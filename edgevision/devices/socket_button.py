"""The control socket as a button: a local Unix socket taking lines "press" and "release".

Each line gets one reply line: "ok", the reply of an extra command the owner registered (the daemon adds
"status"), or "error: ...". The socket file is made with mode 0660 (the group is the service's, through
systemd), so only local members of that group can press. `send_button()` is the client: the CLI's
`edgevision press` / `release` and the tests use it.

The socket is bounded so that a misbehaving local client cannot stop the device answering (docs/service.md):
at most `max_clients` connections are served at once — a new one beyond that closes the connection idle the
longest, so `edgevision status` still gets through a flood of idle clients; a client silent for `idle_s` is
closed; a line longer than `max_line` bytes gets one error reply and the connection is closed; and when
accept() runs out of file descriptors the server backs off (up to `_ACCEPT_BACKOFF_S`) with one log line
per minute instead of one per attempt. The client reads at most `MAX_REPLY` bytes within its timeout.
"""

from __future__ import annotations

import asyncio
import errno
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
MAX_PATH = 107  # bytes in sockaddr_un.sun_path, less its terminating NUL
MAX_CLIENTS = 16  # served at once; far below LimitNOFILE, so accept() never runs out of descriptors
MAX_LINE = 4096  # bytes in one command line; the longest real command is a few words
IDLE_S = 10.0  # a connection that sends nothing (or does not read its reply) for this long is closed
MAX_REPLY = 1 << 20  # bytes the client reads before it gives up on a peer that never ends its line
_ACCEPT_BACKOFF_S = (0.05, 5.0)  # after accept() fails for want of resources: first and longest wait
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_LOG_EVERY_S = 60.0  # repeated complaints (refused lines, failed accepts) are summed up this often

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
        max_clients: int = MAX_CLIENTS,
        max_line: int = MAX_LINE,
        idle_s: float = IDLE_S,
    ) -> None:
        self.path = Path(socket_path)
        self.debounce = debounce
        self.mode = mode
        self.commands = dict(commands or {})
        self.max_clients, self.max_line, self.idle_s = max_clients, max_line, idle_s
        self._raw: asyncio.Queue[object] | None = None
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._clients: dict[asyncio.Task[None], _Client] = {}
        self._complaints = _Complaints()

    def listen(self) -> None:
        """Take the socket path and listen on it, before anything slow (loading models) is done: DeviceError
        with what to do if the path is unusable (too long, a file, a directory, a symlink) or another process
        listens on it. A socket file left by a process that died is replaced."""
        if self._listener is not None:
            return
        path = self.path
        if len(os.fsencode(path)) > MAX_PATH:
            raise DeviceError(
                f"control socket path {path} is {len(os.fsencode(path))} bytes long; a Unix socket "
                f"path can be at most {MAX_PATH} — choose a shorter devices.control_socket"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            info = path.lstat()
        except FileNotFoundError:
            info = None
        except OSError as error:
            raise DeviceError(
                f"cannot use control socket {path}: {error.strerror} — check devices.control_socket "
                "(systemd: RuntimeDirectory=edgevision)"
            ) from error
        if info is not None:
            what = (
                "a symlink"
                if stat.S_ISLNK(info.st_mode)
                else "a directory"
                if stat.S_ISDIR(info.st_mode)
                else None
                if stat.S_ISSOCK(info.st_mode)
                else "a file that is not a socket"
            )
            if what is not None:
                raise DeviceError(
                    f"control socket {path} is {what}; edgevision will not replace it — remove it "
                    "or choose another devices.control_socket"
                )
            if _listening(path):
                raise DeviceError(
                    f"control socket {path} is in use: is another edgevision running? (`edgevision status`)"
                )
            path.unlink(missing_ok=True)  # left by a process that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(path))
            os.chmod(path, self.mode)
            listener.listen(64)
            listener.setblocking(False)
        except OSError as error:
            listener.close()
            raise DeviceError(
                f"cannot listen on control socket {path}: {error.strerror} — check that its "
                "directory is writable by this user (systemd: RuntimeDirectory=edgevision)"
            ) from error
        self._listener = listener
        logger.info("button: listening on %s", path)

    def unlisten(self) -> None:
        """Stop listening before serving started (start-up failed after `listen()`): the path is freed."""
        if self._acceptor is None and self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)

    async def start(self) -> None:
        """Listen (if `listen()` was not called yet) and start serving clients on this loop."""
        if self._acceptor is not None:
            return
        self.listen()
        self._raw = asyncio.Queue()
        self._acceptor = asyncio.create_task(self._accept(), name="control-socket")

    async def events(self) -> AsyncIterator[ButtonEvent]:
        await self.start()
        assert self._raw is not None
        async for event in debounced(self._raw, self.debounce):
            yield event

    async def close(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        listener, self._listener = self._listener, None
        if acceptor is not None:
            acceptor.cancel()
            await asyncio.gather(acceptor, return_exceptions=True)
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if listener is None:
            return
        listener.close()
        if self._raw is not None:
            self._raw.put_nowait(CLOSED)
        self.path.unlink(missing_ok=True)

    # --- serving ---------------------------------------------------------------------------------------------

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        delay = _ACCEPT_BACKOFF_S[0]
        while True:
            try:
                connection, _ = await loop.sock_accept(self._listener)
            except OSError as error:
                if error.errno not in _OUT_OF_RESOURCES:
                    raise
                self._complaints.add(
                    "accept",
                    f"control socket: accept() failed ({error.strerror}); backing off "
                    f"up to {_ACCEPT_BACKOFF_S[1]:g} s — too many open files? (LimitNOFILE)",
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _ACCEPT_BACKOFF_S[1])
                continue
            delay = _ACCEPT_BACKOFF_S[0]
            if len(self._clients) >= self.max_clients:
                self._evict_idlest()
            try:
                reader, writer = await asyncio.open_unix_connection(sock=connection, limit=self.max_line)
            except OSError as error:
                connection.close()
                self._complaints.add("connect", f"control socket: a connection failed at once: {error}")
                continue
            task = asyncio.create_task(self._serve(reader, writer))
            self._clients[task] = _Client(writer)
            task.add_done_callback(self._clients.pop)

    def _evict_idlest(self) -> None:
        waiting = [(client.since, task) for task, client in self._clients.items() if client.waiting]
        self._complaints.add(
            "full", f"control socket: more than {self.max_clients} clients at once; closing the one idle the longest"
        )
        if waiting:
            min(waiting, key=lambda pair: pair[0])[1].cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while True:
                client = self._clients.get(task)
                if client is not None:
                    client.waiting, client.since = True, time.monotonic()
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_s)
                except TimeoutError:
                    logger.debug("control socket: a client sent nothing for %.0f s; closed", self.idle_s)
                    return
                except ValueError:  # the line passed max_line bytes: it cannot be a command
                    self._complaints.add("long", f"control socket: refused a line longer than {self.max_line} bytes")
                    writer.write(f"error: a command line is at most {self.max_line} bytes\n".encode())
                    await asyncio.wait_for(writer.drain(), self.idle_s)
                    return
                if not line:
                    return
                if client is not None:
                    client.waiting = False
                reply = await self._answer(line.decode("utf-8", "replace").strip())
                writer.write((reply + "\n").encode())
                await asyncio.wait_for(writer.drain(), self.idle_s)  # a client that never reads is dropped
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, line: str) -> str:
        name, _, rest = line.partition(" ")
        assert self._raw is not None
        match name:
            case "press" | "release":
                self._raw.put_nowait((name == "press", time.monotonic()))
                return "ok"
            case "":
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
                return f"error: unknown command {name[:40]!r}; known: {known}"


class _Client:
    """A served connection: whether it is waiting for its next line, and since when."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.waiting = True
        self.since = time.monotonic()


class _Complaints:
    """Warnings that a flood would repeat: the first of each kind is logged, then one count per minute."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._logged: dict[str, float] = {}

    def add(self, kind: str, message: str) -> None:
        now = time.monotonic()
        self._counts[kind] = self._counts.get(kind, 0) + 1
        last = self._logged.get(kind)
        if last is None or now - last >= _LOG_EVERY_S:
            count = self._counts[kind]
            logger.warning("%s%s", message, f" ({count} times since the last such line)" if count > 1 else "")
            self._logged[kind], self._counts[kind] = now, 0


def send_button(socket_path: str | os.PathLike[str], command: str, *, timeout: float = 5.0) -> str:
    """Send one line ("press", "release", "status", ...) to the control socket and return the reply line.

    Waits up to `timeout` in all for the socket to appear (the daemon may be starting) and for the reply;
    raises DeviceError if no one listens, the reply does not come in time or is not one line of at most
    MAX_REPLY bytes, or the reply is an error.
    """
    path = Path(socket_path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(path))
                sock.sendall((command.strip() + "\n").encode())
                reply = _read_line(sock, deadline, path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as error:
            if time.monotonic() >= deadline:
                raise DeviceError(
                    f"no edgevision is listening on {path} ({error.strerror}) — start it "
                    "(`systemctl start edgevision`) or pass the right --socket"
                ) from None
            time.sleep(0.05)
        except BlockingIOError:  # its queue of connections is full (a flood): it may take ours in a moment
            if time.monotonic() >= deadline:
                raise DeviceError(
                    f"edgevision on {path} is too busy to take a connection (its queue stayed full "
                    f"for {timeout:g} s) — is something flooding the control socket?"
                ) from None
            time.sleep(0.05)
        except PermissionError:
            raise DeviceError(f"not allowed to use {path} — add this user to the edgevision group") from None
        except TimeoutError:
            raise DeviceError(
                f"edgevision on {path} did not answer within {timeout:g} s — it takes the socket "
                "before loading its models, so it may still be starting (`journalctl -u edgevision`)"
            ) from None
        except OSError as error:
            raise DeviceError(
                f"cannot talk to {path}: {error.strerror or error} — is it edgevision's control socket?"
            ) from None
    if reply.startswith("error:"):
        raise DeviceError(f"edgevision: {reply.removeprefix('error:').strip()}")
    return reply


def _read_line(sock: socket.socket, deadline: float, path: Path) -> str:
    """One reply line, read before `deadline` (a peer that trickles bytes does not extend it)."""
    data = bytearray()
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REPLY:
            raise DeviceError(
                f"{path} sent more than {MAX_REPLY} bytes without ending its reply — is it "
                "edgevision's control socket? (check --socket)"
            )
    return data.decode("utf-8", "replace").strip()


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True
