"""``edgevision bench board HOST``: the suites run on a board over SSH, one results folder brought back.

OpenSSH's client in batch mode (a key or an agent; never a password prompt). The working tree is copied to
the board with rsync over ssh (tar over ssh where either side lacks rsync), the board's Python environment
and models are reused (or made with ``make venv`` / ``make models`` the first time), ``edgevision bench
suites`` runs there, and its results folder comes back into ``out/bench/HOST-TIME/`` (written there only
once it is whole, with its report).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgevision.bench.results import load_results
from edgevision.errors import EdgevisionError

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
# Never copied to the board (it keeps its own): environments, models, results, built engines, git.
EXCLUDES = ("/.git", "/.venv", "/models", "/out")
KEEP_ON_BOARD = (".venv", "models", "out", "engines")
DEFAULT_PYTHON = ".venv/bin/python"


class RemoteError(EdgevisionError):
    """The board could not be reached, refused us, or its run failed."""


@dataclass(frozen=True)
class Ssh:
    """How to reach the board: `host` (user@name), a port, an identity file and extra -o options."""

    host: str
    port: int | None = None
    identity: Path | None = None
    options: tuple[str, ...] = ()
    connect_timeout: int = 10

    def argv(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.identity:
            argv += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        for option in self.options:
            argv += ["-o", option]
        return argv

    @property
    def name(self) -> str:
        return self.host.rpartition("@")[2]

    def run(self, command: str, *, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*self.argv(), self.host, command], input=stdin, capture_output=True, check=False)
        if check and done.returncode != 0:
            raise self.error(done.returncode, done.stderr.decode(errors="replace"))
        return done

    def error(self, code: int, stderr: str) -> RemoteError:
        """The one line that says what went wrong: ssh's own failure (255) or the remote command's."""
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        if code == 255:
            line = next((x for x in reversed(lines) if not x.startswith("Warning:")), "ssh failed")
            if "Permission denied" in line:
                return RemoteError(
                    f"{self.host} refused the key ({line}); pass --identity KEY whose public key is in "
                    "the board's ~/.ssh/authorized_keys, or load it into ssh-agent"
                )
            if "Host key verification failed" in line or "REMOTE HOST IDENTIFICATION" in stderr:
                return RemoteError(
                    f"{self.host}: host key not known or changed ({line}); connect once with ssh to check and accept it"
                )
            return RemoteError(f"cannot reach {self.host}: {line}")
        said = next((x for x in reversed(lines) if x.startswith("edgevision: error: ")), None)
        if said:
            return RemoteError(f"{self.name}: {said.removeprefix('edgevision: error: ')}")
        return RemoteError(f"{self.name}: the command failed (exit {code}): {lines[-1] if lines else 'no output'}")


def _local_tree() -> Path:
    if not (ROOT / "Makefile").is_file() or not (ROOT / "edgevision").is_dir():
        raise EdgevisionError(f"{ROOT} is not an edgevision checkout; run 'edgevision bench board' from a clone")
    return ROOT


def sync(ssh: Ssh, remote_dir: str, *, use_rsync: bool, say: Callable[[str], None]) -> str:
    """Copy the working tree (tracked and untracked files git does not ignore) to `remote_dir` on the board."""
    tree = _local_tree()
    quoted = shlex.quote(remote_dir)
    if use_rsync:
        say(f"bench board: copying {tree} to {ssh.host}:{remote_dir} (rsync)")
        argv = [
            "rsync",
            "-az",
            "--delete",
            "--filter=:- .gitignore",
            *(f"--exclude={e}" for e in EXCLUDES),
            "-e",
            shlex.join(ssh.argv()),
            f"{tree}/",
            f"{ssh.host}:{remote_dir}/",
        ]
        ssh.run(f"mkdir -p {quoted}")
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ssh.error(255 if done.returncode in (12, 255) else done.returncode, done.stderr)
        return "rsync"
    say(f"bench board: copying {tree} to {ssh.host}:{remote_dir} (tar over ssh: rsync is missing)")
    archive = subprocess.run(
        ["tar", "-C", str(tree), "--exclude-vcs-ignores", *(f"--exclude=.{e}" for e in EXCLUDES), "-czf", "-", "."],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise EdgevisionError(f"tar failed: {archive.stderr.decode(errors='replace').strip()}")
    keep = " ".join(f"! -name {shlex.quote(k)}" for k in KEEP_ON_BOARD)
    ssh.run(
        f"mkdir -p {quoted} && cd {quoted} && find . -mindepth 1 -maxdepth 1 {keep} -exec rm -rf {{}} + && tar -xzf -",
        stdin=archive.stdout,
    )
    return "tar"


def remote_script(remote_dir: str, python: str, models: str | None, setup: bool, suites_argv: list[str]) -> str:
    """The shell the board runs: use (or make) the environment and models, then ``edgevision bench suites``."""
    q = shlex.quote
    default = python == DEFAULT_PYTHON
    lines = ["set -e", f"cd {q(remote_dir)}"]
    if models:
        lines.append(f"if [ -L models ] || [ ! -e models ]; then ln -sfn {q(models)} models; fi")
    lines.append(f"if [ ! -x {q(python)} ]; then")
    if setup and default:
        lines.append(
            "  echo 'bench board: making the environment (make venv; the first time on a board takes tens "
            "of minutes)' >&2; python3 -m venv --system-site-packages .venv; make venv >&2"
        )
    else:
        lines.append(
            f'  echo "edgevision: error: no Python environment at {q(python)} on $(hostname) (in '
            f'$PWD); {"pass --python PATH or drop --no-setup" if default else "check --python"}" >&2; '
            "exit 2"
        )
    lines.append("fi")
    if setup and default and not models:
        lines.append(
            "if [ ! -f models/registry.json ]; then echo 'bench board: making the models (make models)' >&2;"
            " make models >&2; fi"
        )
    lines.append(f'exec env PYTHONPATH="$PWD" {q(python)} -m edgevision bench suites {shlex.join(suites_argv)}')
    return "\n".join(lines)


def _stream(argv: list[str], say: Callable[[str], None], prefix: str) -> tuple[int, str]:
    """Run, echoing each output line as it comes; the exit status and everything it printed."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
    )
    seen = []
    assert process.stdout is not None
    for line in process.stdout:
        seen.append(line)
        say(f"{prefix}{line.rstrip()}")
    return process.wait(), "".join(seen)


def fetch(ssh: Ssh, remote_folder: str, local: Path, *, use_rsync: bool) -> None:
    local.mkdir(parents=True)
    if use_rsync:
        done = subprocess.run(
            ["rsync", "-az", "-e", shlex.join(ssh.argv()), f"{ssh.host}:{remote_folder}/", f"{local}/"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise ssh.error(255 if done.returncode in (12, 255) else done.returncode, done.stderr)
        return
    archive = ssh.run(f"tar -C {shlex.quote(remote_folder)} -czf - .")
    done = subprocess.run(
        ["tar", "-C", str(local), "-xzf", "-"], input=archive.stdout, capture_output=True, check=False
    )
    if done.returncode != 0:
        raise EdgevisionError(f"cannot unpack the results: {done.stderr.decode(errors='replace').strip()}")


def bench_board(
    ssh: Ssh,
    *,
    suites_argv: list[str],
    out: Path | None = None,
    remote_dir: str = "edgevision",
    python: str = DEFAULT_PYTHON,
    models: str | None = None,
    setup: bool = True,
    copy: str = "auto",
    say: Callable[[str], None] | None = None,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Sync, run the suites on the board, bring the results folder back; `finish` (the report) runs on it
    before it takes its final name. Returns the local results folder."""
    say = say or (lambda text: print(text, flush=True))
    run_id = f"{ssh.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    out = out or _local_tree() / "out" / "bench" / run_id
    if out.exists():
        raise EdgevisionError(f"{out} already exists; choose another --out")
    partial = out.with_name(out.name + ".partial")

    probe = ssh.run("command -v rsync >/dev/null && echo rsync || echo no-rsync")
    have_rsync = shutil.which("rsync") is not None and probe.stdout.decode().strip() == "rsync"
    if copy == "rsync" and not have_rsync:
        raise EdgevisionError(
            f"--copy rsync: rsync is missing {'here' if shutil.which('rsync') is None else 'on ' + ssh.name}"
            "; install it, or use --copy auto"
        )
    use_rsync = have_rsync and copy != "tar"
    sync(ssh, remote_dir, use_rsync=use_rsync, say=say)

    from edgevision.bench.runner import source_commit

    commit = source_commit()
    remote_out = f"out/bench-runs/{run_id}"
    argv = [*suites_argv, "--out", remote_out, "--git-commit", commit["git_commit"]]
    if commit["git_dirty"]:
        argv.append("--git-dirty")
    say(f"bench board: running the suites on {ssh.host}")
    script = remote_script(remote_dir, python, models, setup, argv)
    code, printed = _stream([*ssh.argv(), ssh.host, script], say, f"  {ssh.name}: ")
    if code != 0:
        raise ssh.error(code, printed)

    shutil.rmtree(partial, ignore_errors=True)
    try:
        fetch(ssh, f"{remote_dir}/{remote_out}", partial, use_rsync=use_rsync)
        load_results(partial)  # the run finished and wrote a schema this side reads
        if finish:
            finish(partial)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
