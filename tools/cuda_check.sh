#!/usr/bin/env bash
# The CUDA check: build llama-cpp-python 0.3.36 with CUDA for the GPU present, then run the placement,
# observation and router-bench checks (tools/cuda_check.py) and write a short report.
#
#   tools/cuda_check.sh prepare   # on a machine with network: fill .cuda-carry/ (git-ignored, < 64 MiB)
#   tools/cuda_check.sh           # on the GPU machine (no network needed): build, check, report
#
# prepare downloads the llama-cpp-python sdist and slims it (llama.cpp's bundled vocab models, docs, tests,
# benches, other GPU back-ends and the .git folder go: 77 MB -> about 20 MB), and the wheels of the build and
# runtime dependencies that are pure Python (scikit-build-core, pathspec, packaging, gguf, diskcache, jinja2,
# typing-extensions, tqdm, ...) and cmake and ninja. The GPU machine must have python3 (3.10+) with numpy and
# pyyaml, nvcc and a C++ compiler; what is missing is said in the report.
#
# The report goes to $OUT/cuda-check.md when $OUT is set (the device runner), else out/cuda-check/report.md;
# it is written step by step, so a failure or a timeout still leaves what was found. Budget: about 9 minutes
# on a 16-core H100/H200 box (the build is most of it: one CUDA architecture, FlashAttention kernels off).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/.cuda-carry
VERSION=0.3.36

if [[ "${1:-run}" == "prepare" ]]; then
    set -ex
    PY=${PYTHON:-python3}
    rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/tmp"
    "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$CARRY/tmp"
    tar -xzf "$CARRY/tmp/llama_cpp_python-$VERSION.tar.gz" -C "$CARRY/tmp"
    src=$CARRY/tmp/llama_cpp_python-$VERSION
    v=$src/vendor/llama.cpp
    rm -rf "$src/.git" "$src/examples" "$src/docs" "$v/models" "$v/docs" "$v/tests" "$v/benches" "$v/media" \
        "$v/.github" "$v/.devops" "$v/examples" "$v/gguf-py" "$v/conversion" "$v/scripts"
    for backend in vulkan sycl cann metal opencl musa hip kompute rpc webgpu zdnn blas virtgpu openvino hexagon; do
        rm -rf "$v/ggml/src/ggml-$backend"
    done
    # llama.cpp's CMake adds tests/examples only when asked; keep empty folders for the ones it may look at
    mkdir -p "$v/tests" "$v/examples"
    tar -czf "$CARRY/llama_cpp_python-$VERSION-slim.tar.gz" -C "$CARRY/tmp" "llama_cpp_python-$VERSION"
    rm -rf "$CARRY/tmp"
    "$PY" -m pip download --only-binary :all: --no-deps -d "$CARRY/wheels" \
        scikit-build-core pathspec packaging gguf diskcache jinja2 typing-extensions tqdm requests \
        urllib3 idna certifi charset-normalizer ninja cmake
    "$PY" -m pip download --no-binary :all: --no-deps -d "$CARRY/wheels" markupsafe
    du -sh "$CARRY"
    size=$(du -sb "$CARRY" | cut -f1)
    (( size < 60 * 1024 * 1024 )) || { echo "carry folder is $size bytes: over the 60 MiB budget"; exit 1; }
    echo "ready: run 'tools/cuda_check.sh' on the GPU machine with .cuda-carry carried"
    exit 0
fi

REPORT_DIR=${OUT:-$ROOT/out/cuda-check}
mkdir -p "$REPORT_DIR"
REPORT=$REPORT_DIR/cuda-check.md
LOG=$REPORT_DIR/cuda-check.log
START=$(date +%s)
exec > >(tee -a "$LOG") 2>&1
set -x

note() { printf '%s\n' "$*" >> "$REPORT"; }
step() { note ""; note "## $1"; note ""; echo "=== $1 ($(( $(date +%s) - START )) s)"; }
finish() {
    local rc=$?
    note ""
    note "Finished after $(( $(date +%s) - START )) s, exit status $rc. Full log: cuda-check.log"
    exit $rc
}
trap finish EXIT

: > "$REPORT"
note "# CUDA check: llama-cpp-python $VERSION with CUDA"
note ""
note "Started $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

step "Machine"
GPU=$(timeout 30 nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)
note "- GPU: ${GPU:-none found}"
CUDA_CC=$(timeout 30 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
note "- nvcc: $(nvcc --version 2>/dev/null | tail -1 || echo 'not found')"
note "- cmake: $(cmake --version 2>/dev/null | head -1 || echo 'not found (taken from the carried wheels if there)')"
PY=$(command -v python3.11 || command -v python3.12 || command -v python3.10 || command -v python3)
note "- python: $PY $("$PY" --version 2>&1)"
if [[ -z "$CUDA_CC" ]]; then note "No NVIDIA GPU found: nothing to check."; exit 2; fi
if [[ ! -d "$CARRY" ]]; then note "No .cuda-carry/: run 'tools/cuda_check.sh prepare' where there is network, and carry it."; exit 2; fi

step "Python environment"
# The machine's python3 already holds numpy, pyyaml, jinja2 and friends; what it lacks goes into a folder on
# PYTHONPATH (a venv would hide the machine's packages when python3 is itself a venv).
SITE=$ROOT/.cuda-venv/site
mkdir -p "$SITE"
VPY=$PY
export PYTHONPATH=$SITE
for wheel in scikit_build_core pathspec gguf diskcache; do
    timeout 120 "$VPY" -m pip install --no-index --no-deps --no-compile --target "$SITE" "$CARRY"/wheels/${wheel}-*.whl \
        >> "$LOG" 2>&1 || note "- the carried $wheel wheel did not install (see the log)"
done
MISSING=$("$VPY" - <<'EOF2'
import importlib.util
print(" ".join(m for m in ("numpy", "yaml", "gguf", "jinja2", "diskcache", "scikit_build_core") if importlib.util.find_spec(m) is None))
EOF2
)
note "- missing Python modules: ${MISSING:-none}"
command -v cmake >/dev/null || { note "FAILED: no cmake on this machine"; exit 3; }

step "Build (sm_$CUDA_CC, FlashAttention kernels off, $(nproc) jobs)"
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_CC -DGGML_CUDA_FA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON"
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
BUILD_START=$(date +%s)
if timeout 480 "$VPY" -m pip install --no-index --no-deps --no-build-isolation --target "$SITE" \
    "$CARRY/llama_cpp_python-$VERSION-slim.tar.gz" >> "$LOG" 2>&1; then
    note "- built and installed in $(( $(date +%s) - BUILD_START )) s (CMAKE_ARGS: $CMAKE_ARGS)"
else
    note "- FAILED after $(( $(date +%s) - BUILD_START )) s (exit $?); the last lines of the build:"
    note '```'
    tail -25 "$LOG" >> "$REPORT"
    note '```'
    exit 4
fi

step "A MoE model (tools/make_synthetic.py: the benchmark's layout, 8 layers x 32 experts, q8_0)"
MODEL_DIR=$ROOT/out/cuda-check/models
mkdir -p "$MODEL_DIR"
MODEL=$(ls "$MODEL_DIR"/*.gguf 2>/dev/null | head -1)
if [[ -z "$MODEL" ]]; then
    timeout 300 "$VPY" tools/make_synthetic.py decoder --out "$MODEL_DIR" --ftype q8_0 --n-layer 8 --n-embd 1024 \
        --n-head 8 --n-ff 1024 --n-ff-exp 1024 --n-expert 32 --n-expert-used 2 --router-skew 0.8 >> "$LOG" 2>&1 \
        || { note "FAILED: making the model"; exit 5; }
    MODEL=$(ls "$MODEL_DIR"/*.gguf | head -1)
fi
note "- $(basename "$MODEL"), $(du -m "$MODEL" | cut -f1) MiB"

step "Checks"
PYTHONPATH=$ROOT:$SITE timeout 360 "$VPY" tools/cuda_check.py "$MODEL" >> "$REPORT" 2>> "$LOG"
rc=$?
(( rc == 0 )) || note "- tools/cuda_check.py exited $rc (124: timed out)"
exit $rc
