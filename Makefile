# The README's commands. Every target first runs the idempotent set-up.
PY := .venv/bin/python

.PHONY: setup test demo demo-model
setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	@bash scripts/demo.sh

demo-model: setup
	@bash scripts/build_demo_model.sh
