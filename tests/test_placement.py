"""The sparse decoder's placement: `edgevision plan` on the flagship's header, locking under a small
RLIMIT_MEMLOCK, online adaptation that survives a failure, and the plan applied by `ask` and `edgevision run`.

Tier 1: the plan for Gemma 4 26B-A4B from a header-only GGUF made from its published shapes (no weights), and
the adaptation worker with a pinner that fails. A subprocess without CAP_IPC_LOCK: locking that the limit cannot
hold. Tier 3: a tiny synthetic Gemma-4 MoE in the real llama.cpp, asked through the real CLI with and without a
placement section: the same answer, the pins present and llama.cpp's own loader reporting the overrides applied.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgevision.moe.layout import ExpertLayout, ExpertTensor

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
PHOTO = ROOT / "assets" / "photo.jpg"
SPOKEN = ROOT / "assets" / "question.wav"
GIB = 2**30

# Gemma 4 26B-A4B as published (config.json): 30 layers, hidden 2816, 128 experts of width 704, top 8
N_LAYER, N_EMBD, N_EXPERT, N_USED, N_FF_EXP, N_FF, VOCAB = 30, 2816, 128, 8, 704, 2112, 262_144


def _tool(name: str):
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TOOLS))


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgevision", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


# -- tier 1: the plan for the flagship, from its header ------------------------------------------------------


@pytest.fixture(scope="module")
def flagship(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = _tool("make_flagship_header").write_header(tmp_path_factory.mktemp("flagship") / "gemma-4-26b-a4b.gguf")
    assert os.stat(path).st_blocks * 512 < 2**20  # a header: the weights are a hole in a sparse file
    return path


def test_the_header_only_flagship_has_the_published_shapes(flagship: Path):
    from edgevision.moe.plan import read_header

    header = read_header(flagship)
    lay = header.layout
    assert (lay.n_layer, lay.n_expert, lay.n_expert_used, len(lay.moe_layers)) == (N_LAYER, N_EXPERT, N_USED, N_LAYER)
    # one expert: gate+up (2 x 704 rows of 2816, Q4_K: 144 bytes per 256) and down (2816 rows of 704, Q4_0: 18 per
    # 32), plus its f32 output scale: 3 x 704 x 2816 weights at 4.5 bits
    expert = 2 * N_FF_EXP * N_EMBD // 256 * 144 + N_EMBD * N_FF_EXP // 32 * 18 + 4
    assert lay.expert_bytes(0) == expert == 3_345_412
    assert lay.expert_total == N_LAYER * N_EXPERT * expert
    assert round(lay.expert_total / GIB, 2) == 11.96
    assert round(header.parameters / 1e9, 1) == 25.2 and round(header.active_parameters / 1e9, 1) == 3.8
    assert header.expert_parameters == N_LAYER * N_EXPERT * (3 * N_FF_EXP * N_EMBD + 1)
    # the KV cache: 25 sliding layers of 8 heads x 256, 5 full layers of 2 heads x 512, K and V in F16
    kv = (25 * 8 * (256 + 256) + 5 * 2 * (512 + 512)) * 2
    assert header.kv_cache_bytes(2048) == 2048 * kv
    assert header.kv_cache_bytes(2048, swa_full=False) == 1536 * 25 * 8 * 512 * 2 + 2048 * 5 * 2 * 1024 * 2


def _section(out: str) -> dict:
    text = out.split("config section (decoder):\n", 1)[1]
    return yaml.safe_load(text)


def test_plan_answers_for_the_flagship_on_both_boards(flagship: Path, tmp_path: Path):
    from edgevision.config import PlacementSettings
    from edgevision.moe.plan import BOARDS, fit, read_header
    from edgevision.schema import load, parse_size

    header = read_header(flagship)
    lay = header.layout
    results = {}
    for board in ("orin-nx-16", "orin-nx-8"):
        proc = _cli("plan", str(flagship), "--board", board, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        result = fit(header, board=BOARDS[board])
        results[board] = result
        # the totals from the published shapes, and the memory left for the weights after every stage and the KV
        assert "experts: 30 x 128 x 3.35 MB = 11.96 GiB" in out and "25.23 B (3.82 B per token)" in out
        stages = sum(s.bytes for s in BOARDS[board].stages)
        assert result.weights_budget == BOARDS[board].usable - stages - header.kv_cache_bytes(2048)
        plan = result.plan
        assert plan is not None and plan.resident_bytes == lay.other_bytes
        assert plan.resident_bytes + plan.pinned_bytes <= result.weights_budget
        # full, less the page cache one token's paged experts need (8 per layer; pinned pages are not reclaimable)
        assert result.paging_room == 8 * 30 * lay.expert_bytes(0)
        room = result.weights_budget - result.paging_room - plan.resident_bytes
        assert plan.pinned_bytes <= room < plan.pinned_bytes + lay.expert_bytes(0)
        assert f"pinned experts          {len(plan.pinned)} of 3840" in out
        assert f"misses per token: {result.misses_per_token:.1f}" in out
        # neither board holds every expert: prune-to-fit keeps what fits, and says what it drops
        k = result.keep_per_layer
        assert k is not None and lay.other_bytes + k * 30 * lay.expert_bytes(0) <= result.weights_budget
        assert lay.other_bytes + (k + 1) * 30 * lay.expert_bytes(0) > result.weights_budget
        assert f"prune-to-fit: keep {k} of 128 experts per layer" in out
        # the section to paste is a valid config
        section = _section(out)
        pasted = tmp_path / f"{board}.yaml"
        pasted.write_text(yaml.safe_dump(section["decoder"]["placement"]))
        loaded = load(pasted, PlacementSettings)  # the settings' own strict loader accepts it
        assert parse_size(loaded.ram_budget) == (result.weights_budget - result.paging_room) // 2**20 * 2**20
    big, small = results["orin-nx-16"], results["orin-nx-8"]
    assert big.keep_per_layer == 112 and small.keep_per_layer == 27
    assert big.hit_rate > 0.9 and small.hit_rate < 0.5
    assert big.tokens_per_s() > 3 * small.tokens_per_s()


def test_plan_says_plainly_when_the_model_cannot_fit(flagship: Path):
    proc = _cli("plan", str(flagship), "--ram", "1GiB", timeout=60)
    assert proc.returncode == 1
    assert "DOES NOT FIT: the non-expert weights alone take 1.47 GiB" in proc.stdout
    bad = _cli("plan", str(flagship), "--ram", "lots", timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "edgevision: error: plan: --ram 'lots' is not a size; write e.g. 10GiB or 512MiB"
    ]


def test_a_gpu_budget_is_spent_on_whole_layers_and_counted_once(flagship: Path):
    from edgevision.moe.plan import BOARDS, fit, read_header

    header = read_header(flagship)
    cpu = fit(header, board=BOARDS["orin-nx-16"])
    gpu = fit(header, board=BOARDS["orin-nx-16"], gpu=4 * GIB)
    assert gpu.plan is not None and len(gpu.plan.gpu_layers) == 4 * GIB // header.layout.layer_bytes(0)
    # unified memory: what the GPU holds comes out of the same budget, so RAM pins shrink by as much
    assert gpu.plan.pinned_bytes + gpu.plan.gpu_bytes <= cpu.weights_budget - header.layout.other_bytes
    assert not any(layer in gpu.plan.gpu_layers for layer, _ in gpu.plan.pinned)


# -- tier 1: online adaptation keeps going after a failure --------------------------------------------------


class _FlakyPinner:
    """Stands in for ExpertPinner: the second call to `pin` fails, as mlock does when the limit is reached."""

    def __init__(self) -> None:
        self.calls = 0
        self.pinned: set = set()

    def pin(self, experts):
        from edgevision.errors import EdgevisionError
        from edgevision.moe.pinning import PinChange

        self.calls += 1
        if self.calls == 2:
            raise EdgevisionError("cannot lock expert pages (Cannot allocate memory, 4096 bytes locked so far)")
        wanted = set(experts)
        change = PinChange(len(wanted - self.pinned), len(self.pinned - wanted), 0)
        self.pinned = wanted
        return change

    def prefetch(self, experts) -> None:
        pass


def test_a_failed_replan_is_logged_and_retried_after_a_back_off_and_gpu_layers_are_never_pinned():
    from edgevision.moe.online import OnlineResidency

    tensors = tuple(ExpertTensor(f"blk.{il}.ffn_gate_up_exps.weight", il, 10_000 * (il + 1), 400, 4) for il in range(3))
    layout = ExpertLayout(Path("m.gguf"), 10**6, 3, 4, 2, tensors, 1000)
    pinner = _FlakyPinner()
    online = OnlineResidency(
        layout,
        pinner,
        np.ones((3, 4)),
        ram_budget=1000 + 3 * 100,
        gpu_budget=400,
        replan_every=1,
        backoff=(30.0, 60.0),
        prior_tokens=1e-3,
    )
    with online:
        online.start()
        first = online.stats.plan
        assert first is not None and len(first.gpu_layers) == 1
        assert not any(layer in first.gpu_layers for layer, _ in pinner.pinned)  # GPU experts are not pinned again
        online.drain()  # this re-plan fails: counted, logged, the last plan stays
        assert online.stats.errors == 1 and "Cannot allocate memory" in online.stats.last_error
        assert online.stats.plan is first
        ids = np.array([[3, 2]], dtype=np.int32)
        gates = np.array([[0.6, 0.4]], dtype=np.float32)
        for layer in range(3):
            online.observe(layer, ids, gates)  # asks for a re-plan: within the back-off, it waits
        online.drain()  # an explicit request goes ahead, with everything observed
        stats = online.stats
        assert pinner.calls == 3 and stats.replans == 1  # the request in the back-off was not run; then one was
        cpu_layers = [layer for layer in range(3) if layer not in stats.plan.gpu_layers]
        assert {(layer, 3) for layer in cpu_layers} < pinner.pinned  # the live favourite of each CPU layer
        assert len(pinner.pinned) == 3 and all(expert in (2, 3) for _, expert in pinner.pinned)
    assert online._worker is None  # closed cleanly


# -- locking under a small RLIMIT_MEMLOCK (no CAP_IPC_LOCK) ---------------------------------------------------

_LOCK_SCRIPT = """
import ctypes, json, resource, sys
from pathlib import Path

libc = ctypes.CDLL(None, use_errno=True)

class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
assert libc.capget(ctypes.byref(header), data) == 0
for d in data[:1]:  # CAP_IPC_LOCK is bit 14 of the first word: drop it, so RLIMIT_MEMLOCK applies
    d.effective &= ~(1 << 14); d.permitted &= ~(1 << 14); d.inheritable &= ~(1 << 14)
assert libc.capset(ctypes.byref(header), data) == 0
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

from edgevision.config import PlacementSettings
from edgevision.errors import EdgevisionError
from edgevision.moe.layout import read_layout
from edgevision.moe.pinning import ExpertPinner
from edgevision.moe.placement import DecoderPlacement, lock_need, lock_plan, locked_bytes_now
from edgevision.moe.residency import plan_residency

model = Path(sys.argv[1])
layout = read_layout(model)
out = {}
try:  # the product path: refused before anything is locked
    DecoderPlacement.open(model, PlacementSettings(ram_budget="64MiB", online=False, prefetch=False), n_ctx=256)
except EdgevisionError as error:
    out["open"] = str(error)
out["locked_after_open"] = locked_bytes_now()
# locking itself failing part-way (as when other locked memory takes the room): rolled back
plan = plan_residency(layout, __import__("numpy").ones((layout.n_layer, layout.n_expert)), ram_budget=2**26)
pinner = ExpertPinner(layout)
try:
    lock_plan(pinner, plan, lock_resident=True, need=lock_need(layout, plan, lock_resident=True))
except EdgevisionError as error:
    out["lock"] = str(error)
out["locked_after_lock"] = locked_bytes_now()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def moe_q8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("moe") / "moe-q8_0.gguf"
    return _tool("make_synthetic").write_moe_decoder(path, ftype="q8_0", router_skew=1.5, n_ff_exp=256)


def test_locking_under_a_small_rlimit_memlock_fails_in_one_line_and_leaves_nothing_locked(moe_q8: Path):
    limit = 64 * 1024
    proc = subprocess.run(
        [sys.executable, "-c", _LOCK_SCRIPT, str(moe_q8), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("open", "lock"):
        message = out[key]
        assert "\n" not in message
        assert f"RLIMIT_MEMLOCK is {limit} bytes" in message and "LimitMEMLOCK=" in message, message
        assert "CAP_IPC_LOCK" in message
    assert out["locked_after_open"] == 0 and out["locked_after_lock"] == 0


# -- tier 3: the plan applied by `ask` and `edgevision run` ---------------------------------------------------


@pytest.fixture(scope="module")
def moe_config(tmp_path_factory, moe_q8: Path, whisper_dir, piper_voice, make_tower, ocr_models) -> tuple[Path, Path]:
    """Two configs for the synthetic MoE decoder and a tower of its width: without a placement, and with one
    that pins a third of the experts and re-plans every 16 tokens."""
    from edgevision.moe.layout import read_layout

    base = tmp_path_factory.mktemp("moe-config")
    tower = base / "tower-moe.onnx"
    assert make_tower.main(["--out", str(tower), "--match-gguf", str(moe_q8)]) == 0
    layout = read_layout(moe_q8)
    budget = layout.other_bytes + 10 * layout.expert_bytes(0)
    common = (
        f"speech:\n  recognizer: {{kind: whisper, model: {whisper_dir}}}\n"
        f"  synthesizer: {{kind: piper, voice: {piper_voice}}}\n"
        f"vision:\n  tower: {tower}\n"
        f"ocr:\n  models: {ocr_models}\n"
        f"decoder:\n  model: {moe_q8}\n  n_ctx: 1024\n  max_answer_tokens: 12\n  n_threads: 1\n"
    )
    plain, placed = base / "plain.yaml", base / "placed.yaml"
    plain.write_text(common)
    placed.write_text(common + f"  placement:\n    ram_budget: {budget}\n    replan_every: 16\n")
    return plain, placed


def _answer(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("answer:"))


def test_ask_with_a_placement_section_applies_the_plan_and_gives_the_same_answer(moe_config, moe_q8: Path):
    plain, placed = moe_config
    question = "What is on the table?"
    without = _cli("ask", "--config", str(plain), "--image", str(PHOTO), "--question", question)
    assert without.returncode == 0, without.stderr
    assert "placement:" not in without.stdout
    env = dict(os.environ)
    with_plan = _cli("ask", "--config", str(placed), "--image", str(PHOTO), "--question", question, env=env)
    assert with_plan.returncode == 0, with_plan.stderr
    assert _answer(with_plan.stdout) == _answer(without.stdout) and len(_answer(without.stdout)) > len("answer:  ")
    line = next(line for line in with_plan.stdout.splitlines() if line.startswith("placement:"))
    # 10 experts pinned; llama.cpp's loader placed every expert tensor (4 layers x 3) in the CPU buffer type
    assert line.startswith("placement: 10 experts pinned") and "12 expert tensors placed in the CPU buffer" in line
    hit = float(line.split("hit rate ")[1].split("%")[0])
    assert 0 < hit <= 100
    # the start-up log shows the plan in one block
    assert "decoder placement for moe-q8_0.gguf:" in with_plan.stderr and "pinned          10 of 32" in with_plan.stderr


def test_edgevision_run_with_a_placement_shows_it_in_status_and_in_every_record(moe_config, tmp_path: Path):
    from edgevision.telemetry.log import read

    _plain, placed = moe_config
    socket_dir = Path(tempfile.mkdtemp(prefix="ev-"))
    control, log = socket_dir / "control.sock", tmp_path / "interactions.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(
        placed.read_text()
        + f"devices:\n  camera: {{kind: image, source: {PHOTO}}}\n  button: socket\n  control_socket: {control}\n"
        f"  microphone: {{kind: wav, source: {SPOKEN}}}\n"
        f"  speaker: {{kind: wav, folder: {tmp_path / 'spoken'}, realtime: false}}\n"
        f"telemetry:\n  log_path: {log}\n  power_reader: none\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEVISION_CONFIG", "INVOCATION_ID", "NOTIFY_SOCKET")}
    with open(tmp_path / "stderr", "w+") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edgevision", "run", "--config", str(config)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:

            def status() -> dict:
                proc = _cli("status", "--json", "--socket", str(control), env=env, timeout=30)
                assert proc.returncode == 0, proc.stderr
                return json.loads(proc.stdout)

            deadline = time.monotonic() + 240
            while not (control.exists() and status()["ready"]):
                assert daemon.poll() is None, stderr.seek(0) or stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the daemon did not become ready"
                time.sleep(0.5)
            assert _cli("press", "--socket", str(control), env=env).returncode == 0
            time.sleep(0.6)
            assert _cli("release", "--socket", str(control), env=env).returncode == 0
            while not (log.exists() and read(log)):
                assert daemon.poll() is None and time.monotonic() < deadline + 120, "no answer was recorded"
                time.sleep(0.5)
            shown = status()["placement"]
            text = _cli("status", "--socket", str(control), env=env, timeout=30).stdout
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                code = daemon.wait(timeout=120)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                shutil.rmtree(socket_dir, ignore_errors=True)
        stderr.seek(0)
        errors = stderr.read()
    assert code == 0 and "Traceback" not in errors, errors[-3000:]
    assert "decoder placement for moe-q8_0.gguf:" in errors
    assert shown["pinned_experts"] == 10 and shown["locked_bytes"] >= shown["pinned_bytes"] > 0
    assert shown["overridden_to_cpu"] == 12 and shown["expert_selections"] > 0 and 0 < shown["hit_rate"] <= 1
    assert shown["storage_bytes_read"] >= 0 and shown["major_faults"] >= 0
    assert "placement: 10 experts pinned" in text and "hit rate" in text
    (record,) = read(log)
    assert record["answer"] and record["error"] is None
    figures = record["placement"]
    assert set(figures) >= {"major_faults", "storage_bytes_read", "hit_rate", "expert_selections"}
    assert figures["expert_selections"] > 0 and 0 <= figures["hit_rate"] <= 1


def test_plan_measures_what_prune_to_fit_costs_on_held_out_questions_with_images(tmp_path: Path, make_tower):
    model = _tool("make_synthetic").write_moe_decoder(
        tmp_path / "moe-e32.gguf", ftype="q8_0", n_expert=32, n_ff_exp=128, router_skew=0.8, upcycle_noise=0.1
    )
    tower = tmp_path / "tower.onnx"
    assert make_tower.main(["--out", str(tower), "--match-gguf", str(model)]) == 0
    from edgevision.moe.layout import read_layout

    layout = read_layout(model)
    budget = layout.other_bytes + 12 * 4 * layout.expert_bytes(0)  # room for 12 of 32 experts in each of 4 layers
    proc = _cli(
        "plan",
        str(model),
        "--ram",
        str(budget),
        "--measure",
        str(ROOT / "calibration"),
        "--tower",
        str(tower),
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "prune-to-fit: keep 12 of 32 experts per layer" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("prune-to-fit measured (keep 12"))
    assert "held-out (with image rows)" in line
    agreement = float(line.split("agreement ")[1].split("%")[0])
    kl = float(line.split("mean KL ")[1].split(" ")[0])
    assert 0 < agreement < 100 and kl > 0  # pruning 20 of 32 experts changes something, and it is measured


def test_measuring_needs_the_weights(flagship: Path):
    proc = _cli("plan", str(flagship), "--board", "orin-nx-16", "--measure", str(ROOT / "calibration"), timeout=60)
    assert proc.returncode == 2 and "has no weights (a header-only or sparse file)" in proc.stderr
