# edgevision: everything a newcomer runs goes through here.
#   make demo   - set up, provision models, answer the bundled spoken question about the bundled photo (a label)
#   make eval   - read and answer the labelled set in eval/reading: CER, keyword recall, safety violations
#   make test   - set up, provision models, run the test suite
#   make bench-model - the two 876 MiB MoE models 'edgevision bench moe' decodes under a memory cap (realistic, static)
#   make engines - on the board: build TensorRT plans from the ONNX towers in engines/ (PRECISION=int8 for INT8)
#   make bench-e2e - spoken questions through the daemon: overlapped vs sequential, release → first audio
#   make bench-board HOST=user@jetson - the benchmark suites on a board over SSH: results folder and report
#   make lint   - ruff check, ruff format --check and mypy (CI runs it before the tests)
#   make bench-e2e-peer - the daemon vs the pipeline a user would script (synthesised, then recorded questions)
#   sudo make install   - the daemon as a systemd service (user edgevision, /opt/edgevision, /etc/edgevision)
#   sudo make uninstall - remove the service and /opt/edgevision (keeps config, models, logs and the user)
SHELL := /bin/bash
PYTHON ?= python3
# the service's Python: the system's, which the service user can run and whose packages (JetPack's TensorRT
# bindings) the installed venv sees
INSTALL_PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := models
SYN := $(MODELS)/synthetic
EDGEVISION := $(BIN)/edgevision
CONFIG := config/edgevision.yaml
GEMMA3 := $(MODELS)/gemma-3-270m-q4_k_m.gguf
SMOLLM2 := $(MODELS)/smollm2-135m-instruct-q4_1.gguf
MOE_VARIANTS := f32 q8_0 q4_0
# file names as tools/make_synthetic.py writes them (its default_filename)
MOE_STEM := $(SYN)/gemma4-moe-synthetic-l4-e8k2
MOE := $(foreach v,$(MOE_VARIANTS),$(MOE_STEM)-$(v).gguf)

.PHONY: demo eval test venv models engines lint clean help bench-model bench-e2e bench-e2e-peer peer-models bench-board install uninstall

help:
	@sed -n 's/^#   //p' Makefile

demo: models
	mkdir -p out
	$(EDGEVISION) ask --config $(CONFIG) --image assets/label.jpg --audio assets/question-label.wav --out out/answer.wav

eval: models
	mkdir -p out
	$(EDGEVISION) eval --config $(CONFIG) --json out/eval.json

test: models
	$(BIN)/python -m pytest

venv: $(STAMP)

# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores; pip caches the wheel).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c 'from edgevision.decoder.nodefilter import build; build()'  # the eval callback's C filter
	$(BIN)/python -c 'from edgevision.moe.nvme_server import build; build()'  # the emulated NVMe's C server
	touch $@

models: $(STAMP) $(MODELS)/.bundled $(MOE) $(SYN)/tower-gemma3-270m.onnx $(SYN)/tower-smollm2-135m.onnx \
	$(SYN)/tower-gemma4-moe.onnx peer-models

$(MODELS)/.bundled: $(STAMP)
	$(EDGEVISION) models --dir $(MODELS) provision
	touch $@

$(MOE_STEM)-%.gguf: tools/make_synthetic.py $(STAMP)
	$(BIN)/python tools/make_synthetic.py decoder --out $(SYN) --ftype $*
	$(EDGEVISION) models --dir $(MODELS) register $@ --kind decoder --source "synthetic (tools/make_synthetic.py)"

$(SYN)/tower-gemma3-270m.onnx: tools/make_tower.py $(MODELS)/.bundled
	$(BIN)/python tools/make_tower.py --out $@ --match-gguf $(GEMMA3)
	$(EDGEVISION) models --dir $(MODELS) register $@ --kind tower --source "synthetic (tools/make_tower.py)"

$(SYN)/tower-smollm2-135m.onnx: tools/make_tower.py $(MODELS)/.bundled
	$(BIN)/python tools/make_tower.py --out $@ --match-gguf $(SMOLLM2)
	$(EDGEVISION) models --dir $(MODELS) register $@ --kind tower --source "synthetic (tools/make_tower.py)"

$(SYN)/tower-gemma4-moe.onnx: tools/make_tower.py $(MOE_STEM)-f32.gguf
	$(BIN)/python tools/make_tower.py --out $@ --match-gguf $(MOE_STEM)-f32.gguf
	$(EDGEVISION) models --dir $(MODELS) register $@ --kind tower --source "synthetic (tools/make_tower.py)"

# TensorRT plans (+ manifests) from engines/*.onnx; the towers listed here are linked into engines/ first, and
# the OCR models' plans go into engines/ppocrv5/ (FP16).
# Without TensorRT it says so and exits non-zero, leaving engines/ as it was.
ENGINES ?= engines
PRECISION ?= fp16
ENGINE_TOWERS ?= $(SYN)/tower-gemma3-270m.onnx $(SYN)/tower-smollm2-135m.onnx $(SYN)/tower-gemma4-moe.onnx

engines: $(STAMP)
	$(BIN)/python tools/build_engines.py --engines $(ENGINES) --precision $(PRECISION) $(foreach t,$(ENGINE_TOWERS),--tower $(t)) \
		--ocr $(MODELS)/ppocrv5

# The models of 'edgevision bench moe' (see docs/moe-benchmark.md): Q8_0, 8 layers x 32 experts of 3.2 MiB (top 2),
# experts upcycled from one FFN per layer (each the shared FFN plus 10% own noise, as MoE-LLaVA's experts start
# as copies of the dense FFN). BENCH_MOE (the default) routes by content: tokens belong to 16 topics with their
# own hot experts, text stays on a topic for a while (temporal locality), image-like rows route their own way
# (make_synthetic.py --preset realistic-0.7). BENCH_MOE_STATIC is the earlier model: one fixed preference for
# every token (--preset static, the hottest quarter of experts takes ~0.9 of the gate mass).
# Q8_0 because llama.cpp repacks Q4_0 into its own memory on AVX2 CPUs, which would take the experts out of
# the file mapping that residency manages.
BENCH_SHAPE := --ftype q8_0 --n-layer 8 --n-embd 1024 --n-head 8 --n-ff 1024 --n-ff-exp 1024 --n-expert 32 \
	--n-expert-used 2 --upcycle-noise 0.1
BENCH_MOE := $(MODELS)/bench/gemma4-moe-synthetic-l8-e32k2-up0.1-t16s3p4i0.3c0.3-q8_0.gguf
BENCH_MOE_STATIC := $(MODELS)/bench/gemma4-moe-synthetic-l8-e32k2-skew0.8-up0.1-q8_0.gguf

bench-model: $(BENCH_MOE) $(BENCH_MOE_STATIC)

$(BENCH_MOE): tools/make_synthetic.py | $(STAMP)
	$(BIN)/python tools/make_synthetic.py decoder --out $(MODELS)/bench $(BENCH_SHAPE) --preset realistic-0.7

$(BENCH_MOE_STATIC): tools/make_synthetic.py | $(STAMP)
	$(BIN)/python tools/make_synthetic.py decoder --out $(MODELS)/bench $(BENCH_SHAPE) --preset static

lint: $(STAMP)
	$(BIN)/ruff check edgevision tools tests
	$(BIN)/ruff format --check edgevision tools tests
	$(BIN)/mypy edgevision

bench-e2e: models
	$(EDGEVISION) bench e2e --config $(CONFIG)

# The suites on a board over SSH (docs/board-benchmarks.md): SUITES=all or e.g. e2e,vision; BENCH_BOARD_ARGS for
# the rest (--quick, --compare out/bench/OLDER, -p PORT, -i KEY, --models DIR).
SUITES ?= all
BENCH_BOARD_ARGS ?=

bench-board: $(if $(HOST),$(STAMP))
	@test -n "$(HOST)" || { echo "make bench-board: name the board: make bench-board HOST=user@jetson"; exit 2; }
	$(EDGEVISION) bench board $(HOST) --suites $(SUITES) $(BENCH_BOARD_ARGS)
# The same synthetic tower twice for 'bench e2e --peer': as an mmproj (the peer's Llava15ChatHandler) and
# its ONNX export (the daemon), with the CLS layout of the bundled llama.cpp.
PEER_MMPROJ := $(SYN)/mmproj-gemma3-270m.gguf

peer-models: $(PEER_MMPROJ) $(PEER_MMPROJ:.gguf=.onnx)

$(PEER_MMPROJ): tools/make_mmproj.py | $(STAMP)
	$(BIN)/python tools/make_mmproj.py --type mlp --n-embd 640 --out $@

$(PEER_MMPROJ:.gguf=.onnx): $(PEER_MMPROJ) tools/export_tower.py
	$(BIN)/python tools/export_tower.py mmproj $< --out $@ --llama-cpp-cls-last

bench-e2e-peer: models
	$(EDGEVISION) bench e2e --config $(CONFIG) --decoder $(GEMMA3) --peer -n 8 --cold 2
	$(EDGEVISION) bench e2e --config $(CONFIG) --decoder $(GEMMA3) --peer -n 8 --audio assets/question.wav

# --- the service (see systemd/edgevision.service) ---
# On the board: sudo make install INSTALL_EXTRAS=jetson CMAKE_ARGS=-DGGML_CUDA=on
OPT := /opt/edgevision
STATE := /var/lib/edgevision
ETC := /etc/edgevision
UNIT := /etc/systemd/system/edgevision.service
INSTALL_EXTRAS ?=
CMAKE_ARGS ?=

install:
	@test "$$(id -u)" = 0 || { echo "make install: run it as root: sudo make install"; exit 1; }
	getent group gpio >/dev/null || groupadd --system gpio
	getent group input >/dev/null || groupadd --system input
	id -u edgevision >/dev/null 2>&1 || useradd --system --user-group --home-dir $(STATE) --no-create-home \
		--shell /usr/sbin/nologin edgevision
	usermod --append --groups video,audio,input,gpio edgevision
	test -x $(OPT)/venv/bin/python || $(INSTALL_PYTHON) -m venv --system-site-packages $(OPT)/venv
	$(OPT)/venv/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(CMAKE_ARGS)" $(OPT)/venv/bin/python -m pip install --quiet '.$(if $(INSTALL_EXTRAS),[$(INSTALL_EXTRAS)])'
	install -m 0644 README.md $(OPT)/README.md
	install -d -m 0755 $(ETC)
	# the example config, its models in $(STATE)/models; an existing config is kept
	test -e $(ETC)/config.yaml || sed -e 's|\.\./models/|$(STATE)/models/|' -e 's|\.\./engines/|$(STATE)/engines/|' \
		$(CONFIG) > $(ETC)/config.yaml
	install -d -o edgevision -g edgevision -m 0750 $(STATE) $(STATE)/models $(STATE)/engines /var/log/edgevision
	# the models the config names; not models/bench (the MoE benchmark's model is for 'edgevision bench moe' only)
	if [ -d $(MODELS) ]; then \
		for f in $(MODELS)/*; do [ "$${f##*/}" = bench ] || cp -rnL "$$f" $(STATE)/models/; done; \
		chown -R edgevision:edgevision $(STATE)/models; \
	fi
	# TensorRT plans, their manifests and the ONNX they were built from (a config with vision.backend: tensorrt)
	for f in $(ENGINES)/*.plan $(ENGINES)/*.manifest.json $(ENGINES)/*.onnx; do \
		if [ -e "$$f" ]; then cp -nL "$$f" $(STATE)/engines/ && chown edgevision:edgevision $(STATE)/engines/"$${f##*/}"; fi; \
	done
	# the OCR models' plans (a config with ocr.backend: tensorrt)
	if [ -d $(ENGINES)/ppocrv5 ]; then cp -rnL $(ENGINES)/ppocrv5 $(STATE)/engines/ && chown -R edgevision:edgevision $(STATE)/engines/ppocrv5; fi
	install -m 0644 systemd/edgevision.service $(UNIT)
	# without a running systemd (a container, an image being built) the unit is enabled for the next boot
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	systemctl enable edgevision.service
	@echo "installed. Start: sudo systemctl start edgevision; logs: journalctl -u edgevision -f;" \
		"config: $(ETC)/config.yaml; status: sudo -u edgevision $(OPT)/venv/bin/edgevision status"

uninstall:
	@test "$$(id -u)" = 0 || { echo "make uninstall: run it as root: sudo make uninstall"; exit 1; }
	if [ -d /run/systemd/system ]; then systemctl disable --now edgevision.service || true; \
	else systemctl disable edgevision.service || true; fi
	rm -f $(UNIT)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	rm -rf $(OPT)
	@echo "removed the service and $(OPT); kept $(ETC), $(STATE), /var/log/edgevision and the edgevision user" \
		"(remove them with: sudo rm -rf $(ETC) $(STATE) /var/log/edgevision; sudo userdel edgevision)"

clean:
	rm -rf $(VENV) $(MODELS) out .pytest_cache
