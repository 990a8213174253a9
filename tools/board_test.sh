#!/usr/bin/env bash
# Run the board tests on a Jetson (or any CUDA machine with TensorRT) over SSH and bring the results back.
#
#   tools/board_test.sh user@jetson [REMOTE_DIR]
#
# Copies this working tree to REMOTE_DIR (default: edgevision, in the remote home) with rsync, then there:
# makes the virtual environment if needed (with --system-site-packages, so JetPack's TensorRT bindings are
# visible), installs pycuda, runs `make models`, `make engines`, `pytest -m board` (junit XML), and
# `edgevision bench vision` where that benchmark exists. The results come back into
# out/board/HOST-UTCTIME/ (or $OUT): junit XML, logs, the bench output, the plans' manifests, and what the
# board is (TensorRT version, GPU, JetPack release). The remote .venv/, models/ and plans are kept between
# runs; a second run is quick.
#
# Environment: OUT (local results folder), PRECISION (fp16 or int8, for make engines), SSH_OPTS (extra ssh
# options, e.g. "-p 2222"). Exit status: non-zero if copying failed or any step on the board failed.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,16s/^# \{0,1\}//p' "$0"
    exit 2
fi
HOST=$1
REMOTE_DIR=${2:-edgevision}
PRECISION=${PRECISION:-fp16}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/out/board/${HOST#*@}-$(date -u +%Y%m%dT%H%M%SZ)}
# shellcheck disable=SC2206  # SSH_OPTS is split into words on purpose
SSH=(ssh ${SSH_OPTS:-} -o BatchMode=yes)

mkdir -p "$OUT"
echo "board_test: copying $ROOT to $HOST:$REMOTE_DIR"
rsync -az --delete -e "${SSH[*]}" \
    --exclude '/.venv' --exclude '/models' --exclude '/out' --exclude '/.git' \
    --exclude '/engines/*.plan' --exclude '/engines/*.manifest.json' --exclude '/engines/*.onnx' \
    --exclude '__pycache__/' --exclude '.pytest_cache/' --exclude '.ruff_cache/' --exclude '*.egg-info/' \
    "$ROOT/" "$HOST:$REMOTE_DIR/"

echo "board_test: running on $HOST (the first run builds llama.cpp and pycuda: tens of minutes on an Orin)"
set +e
"${SSH[@]}" "$HOST" bash -s -- "$REMOTE_DIR" "$PRECISION" <<'REMOTE'
set -uo pipefail
cd "$1" || exit 1
PRECISION=$2
RESULTS=out/board-results
rm -rf "$RESULTS" && mkdir -p "$RESULTS"
export PATH=/usr/local/cuda/bin:$PATH
failed=0
step() {  # step NAME COMMAND...: run, log to $RESULTS/NAME.log, record the status
    local name=$1; shift
    echo "== $name: $*"
    "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "$name $rc" >>"$RESULTS/status.txt"
    tail -n 25 "$RESULTS/$name.log"
    [[ $rc -eq 0 ]] || { echo "== $name failed ($rc)"; failed=1; }
    return $rc
}
{
    echo "host: $(hostname)"
    cat /etc/nv_tegra_release 2>/dev/null
    uname -a
    python3 -c 'import tensorrt; print("tensorrt", tensorrt.__version__)' 2>&1
} >"$RESULTS/platform.txt"

[[ -x .venv/bin/python ]] || step venv-create python3 -m venv --system-site-packages .venv
step venv make venv || exit 1
.venv/bin/python -c 'import pycuda' 2>/dev/null || step pycuda .venv/bin/pip install pycuda
.venv/bin/python - >>"$RESULTS/platform.txt" 2>&1 <<'PY'
from edgevision.vision.tensorrt import running_platform
print(running_platform())
PY
step models make models
step engines make engines PRECISION="$PRECISION"
step pytest .venv/bin/python -m pytest -m board -v -rs --junitxml="$RESULTS/board-junit.xml" tests
if grep -q "SKIPPED.*test_tensorrt.py" "$RESULTS/pytest.log"; then  # a board that skips them proves nothing
    echo "== the TensorRT tests were skipped on the board (see pytest.log for why)"
    echo "tensorrt-tests-skipped 1" >>"$RESULTS/status.txt"
    failed=1
fi
if .venv/bin/edgevision bench --help 2>/dev/null | grep -qw vision; then
    step bench-vision .venv/bin/edgevision bench vision
else
    echo "edgevision bench vision: not in this build" >"$RESULTS/bench-vision.log"
fi
cp engines/*.manifest.json "$RESULTS/" 2>/dev/null
exit $failed
REMOTE
remote_rc=$?
set -e

echo "board_test: fetching results into $OUT"
rsync -az -e "${SSH[*]}" "$HOST:$REMOTE_DIR/out/board-results/" "$OUT/"
echo "board_test: results in $OUT:"
ls -1 "$OUT"
[[ -f $OUT/status.txt ]] && cat "$OUT/status.txt"
exit "$remote_rc"
