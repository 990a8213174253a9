"""The emulated NVMe of ``edgevision bench moe``: its device model (tier 1) and the FUSE server on a real mount."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgevision.moe.nvme import EmulatedNvme, _Channel, measure_bandwidth, measure_latency

KIB, MIB = 1024, 2**20


def test_channel_overlaps_latency_and_serialises_transfers():
    channel = _Channel(latency=100e-6, bandwidth=1e9)  # 100 us, 1 GB/s: 128 KiB take 131 us
    size = 128 * KIB
    # queue depth 1: each request waits the latency, then its transfer
    assert channel.due(0.0, size) == pytest.approx(231.072e-6)
    assert channel.due(1.0, size) == pytest.approx(1.0 + 231.072e-6)
    # eight at once: one latency, then the transfers one after another at the bandwidth
    dues = [channel.due(2.0, size) for _ in range(8)]
    assert dues[-1] - 2.0 == pytest.approx(100e-6 + 8 * 131.072e-6)


def _mountable() -> str | None:
    if os.geteuid() != 0:
        return "mounting a FUSE file system needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(8 * MIB + 1234))  # not a whole number of pages: the tail must come back too
    return path


@pytest.mark.skipif(_mountable() is not None, reason=_mountable() or "")
@pytest.mark.parametrize("server", ["C", "Python"])
def test_reads_through_the_mount_return_the_file(model, server):
    expected = model.read_bytes()
    with EmulatedNvme(model, latency_us=80, read_mbps=2000, read_ahead_kb=128, native=server == "C") as nvme:
        assert nvme.settings.server == server, "the C server was not built (is there a C compiler?)"
        assert nvme.settings.read_ahead_kb == 128
        assert Path(f"/sys/class/bdi/{nvme.bdi}/read_ahead_kb").read_text().strip() == "128"
        served = nvme.served
        fd = os.open(nvme.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, len(expected) + 10, 0) == expected
            assert os.pread(fd, 100, 5 * MIB + 7) == expected[5 * MIB + 7 : 5 * MIB + 107]
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        # through a mapping, in another process: a page fault in this one would hold the GIL that the Python
        # server's threads need to answer it (the benchmark's children are other processes too)
        script = (
            "import hashlib, mmap, sys\n"
            "with open(sys.argv[1], 'rb') as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:\n"
            "    print(hashlib.sha256(view).hexdigest())"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, str(nvme.path)], check=False, capture_output=True, text=True, timeout=60
        )
        assert proc.stdout.strip() == hashlib.sha256(expected).hexdigest(), proc.stderr
        # each byte was served from the emulated drive at least once, and counted
        assert nvme.served - served >= 2 * len(expected)
        assert sorted(os.listdir(nvme.path.parent)) == ["model.gguf"]
        with pytest.raises(OSError):
            os.open(nvme.path, os.O_RDWR)


@pytest.mark.skipif(_mountable() is not None, reason=_mountable() or "")
def test_latency_at_queue_depth_one_and_bandwidth_with_eight_readers(model):
    # a latency far above this machine's noise: 128 KiB then take 500 + 66 us at queue depth 1
    with EmulatedNvme(model, latency_us=500, read_mbps=2000, read_ahead_kb=128) as nvme:
        assert measure_latency(nvme.path, count=16) >= 0.9 * 500e-6
        one = measure_bandwidth(nvme.path, depth=1, total=8 * MIB)
        eight = measure_bandwidth(nvme.path, depth=8, total=8 * MIB)
        # the latency overlaps across requests in flight (8x in theory): loosely, as the machine's two cores are
        # shared with the readers and whatever else runs
        assert eight > 1.5 * one, (one, eight)


@pytest.mark.skipif(_mountable() is not None, reason=_mountable() or "")
def test_close_unmounts_and_removes_everything(model):
    nvme = EmulatedNvme(model, latency_us=80, read_mbps=None, read_ahead_kb=128)
    mount, work = nvme.path.parent, nvme.path.parent.parent
    assert str(mount) in Path("/proc/mounts").read_text()
    nvme.close()
    assert str(mount) not in Path("/proc/mounts").read_text()
    assert not work.exists()
    assert not any(t.is_alive() for t in nvme._threads)


def test_without_a_c_compiler_the_server_is_not_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from edgevision.moe import nvme_server

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        nvme_server.build(tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".nvme_server-*"))  # nothing half-built
