# Two commands for a newcomer: `make demo` (the whole flow, offline) and `make test`.
# Each creates .venv on first use and installs the pinned requirements into it.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat requirements/*.txt pyproject.toml | sha256sum | cut -c1-12)
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-fast install clean bench-methods bento

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements/base.txt -r requirements/onnx.txt -r requirements/serve.txt -r requirements/score.txt -r requirements/ray.txt -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/clipheads demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --timeout=600 --durations=20 -n 3 --dist loadfile  # three workers on two cores: many tests wait on servers and subprocesses, a third worker keeps both cores busy (13:09 -> 11:31 here); a file's tests stay together (its module fixtures: one server each)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

# The synthetic-world results table of every method (issue 4/5): world seed 1 (full), all
# synth_* recipes, 3 seeds; resumable. DEVICE=cuda JOBS=8 on a GPU machine; BENCH_ARGS=--recompute for units that predate the recorded configuration.
WORLD  ?= runs/world-s1
DEVICE ?= cpu
JOBS   ?= 1
BENCH_ARGS ?=
bench-methods: $(STAMP)
	test -f $(WORLD)/world.json || $(BIN)/clipheads data synth $(WORLD) --seed 1 --size full
	$(BIN)/clipheads bench protocol 'synth_*' --data-root $(WORLD) --out bench/methods_synthetic --device $(DEVICE) --jobs $(JOBS) $(BENCH_ARGS)

# A Bento (bentofile.yaml): the code travels as the clipheads wheel, so the Bento imports the
# same `clipheads.*` namespace as an install. Offline: no locking against an index.
# MODEL=TAG: a Bento whose `models:` carry that model-store entry (head + stored backbone weights)
# and whose CLIPHEADS_SOURCE names it (build/bentofile.yaml from `clipheads models bentofile`).
MODEL ?=
bento: $(STAMP)
	rm -rf dist build/lib build/bdist.* *.egg-info && $(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .  # no stale build/lib in the wheel
	if [ -n "$(MODEL)" ]; then \
	  mkdir -p build && $(BIN)/clipheads models bentofile "$(MODEL)" --out build/bentofile.yaml && \
	  $(BIN)/bentoml build -f build/bentofile.yaml . ; \
	else $(BIN)/bentoml build ; fi

clean:
	rm -rf $(VENV) build dist *.egg-info
