# livesnap: `make test` and `make demo` set up everything they need (Debian 12 / Ubuntu, root).
PY := .venv/bin/python

.PHONY: setup daemons lint test demo bench clean

setup:
	bash scripts/setup.sh

daemons: setup
	bash scripts/start-libvirtd.sh

# the architecture's contracts (.importlinter, docs/architecture.md): about a second
lint: setup
	.venv/bin/lint-imports --no-logo

test: daemons lint
	$(PY) -m pytest -q --durations=20 tests

demo: daemons
	$(PY) scripts/demo.py

bench: daemons
	$(PY) bench/vhd_coalesce.py

clean:
	rm -rf .venv build .pytest_cache .hypothesis .import_linter_cache
