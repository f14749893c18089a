# livesnap: `make test` and `make demo` set up everything they need (Debian 12 / Ubuntu, root).
PY := .venv/bin/python

.PHONY: setup daemons test demo bench clean

setup:
	bash scripts/setup.sh

daemons: setup
	bash scripts/start-libvirtd.sh

test: daemons
	$(PY) -m pytest -q --durations=20 tests

demo: daemons
	$(PY) scripts/demo.py

bench: daemons
	$(PY) bench/vhd_coalesce.py

clean:
	rm -rf .venv build .pytest_cache .hypothesis
