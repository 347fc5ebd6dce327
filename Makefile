# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The farm's state (S3 data, models, signing keys, job store) lives in $FARM_HOME, else
# ~/.local/state/videofarm: the same place `.venv/bin/farm status` and `farm down` look.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1

DEMO_PROMPT ?= 桜の花びらが舞う京都の古い路地を猫が歩く、映画のような映像
DEMO_OUT ?= out/demo.mp4

.PHONY: demo test test-gpu install bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is a local CPU wheel here; anything else downloads gigabytes.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	bash scripts/install-system-packages.sh
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/farm up
	@# Invite-only: as operator, make an invite; as a newcomer, redeem it (the key is saved for `farm submit`).
	@$(BIN)/farm whoami >/dev/null 2>&1 || $(BIN)/farm redeem "$$($(BIN)/farm invite create --note demo -q)" --name demo
	@mkdir -p $(dir $(DEMO_OUT))
	$(BIN)/farm submit "$(DEMO_PROMPT)" --size 128x128 --seconds 2 --steps 8 --seed 42 --wait --out $(DEMO_OUT)
	$(BIN)/farm verify $(DEMO_OUT)
	@echo "The farm keeps running: OpenAI base_url http://127.0.0.1:8000/v1, 'farm status' to look, '$(BIN)/farm down' to stop."

test: $(BIN)/.installed
	$(BIN)/python -m pytest --durations=25

# On a machine with CUDA (pip install -e '.[gpu]' adds xformers): the device-contract tests.
test-gpu: $(BIN)/.installed
	$(BIN)/python -m pytest -m gpu tests/render

# Issue 9's rows, each measured side by side in its own run (about 20 minutes on 2 cores): the sharded core
# vs diffusers, per-optimisation rows in-process, one job and the ideal, the farm vs a naive Ray Serve
# app at 16 clips at once, batching on vs off through the farm at 8.
bench: $(BIN)/.installed
	$(BIN)/python bench/bench_shards.py
	$(BIN)/python bench/bench_throughput.py --compile
	$(BIN)/python bench/bench_farm.py
	$(BIN)/python bench/bench_baseline.py --clips 16 --repeats 3
	$(BIN)/python bench/bench_batching.py --clips 8

clean:
	-$(BIN)/farm down
	rm -rf out
