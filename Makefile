# The README's commands. Every target first runs the idempotent set-up.
PY := .venv/bin/python

.PHONY: setup test demo demo-model bench
setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	@bash scripts/demo.sh

demo-model: setup
	@bash scripts/build_demo_model.sh

# The quick benchmark profile (demo model: latency of four backends, TorchServe at two concurrency
# levels; benchmarks/README.md) -> build/bench/quick/results/. Nothing tracked is written: add the runs
# to benchmarks/history/ on purpose with `benchmarks/quick.py --record`.
bench: setup
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/quick.py
