# livesnap: `make test` and `make demo` set up everything they need (Debian 12 / Ubuntu, root).
PY := .venv/bin/python

.PHONY: setup daemons lint test demo bench clean

setup:
	bash scripts/setup.sh

daemons: setup
	bash scripts/start-libvirtd.sh

# the architecture's contracts (.importlinter, docs/architecture.md): about a second
lint: setup
	.venv/bin/lint-imports --no-logo --no-cache

# Most of the suite's time is waiting (TCG guests, stalls, polling), not CPU: TEST_WORKERS
# pytest-xdist workers overlap the waits even on 2 cores. --dist loadgroup keeps each
# xdist_group (tests sharing host-wide state) in one worker; but with pytest 9.2 and
# xdist 3.8.0 the groups are ignored (pytest-dev/pytest-xdist#1386), so tests that share
# host-wide state also lock it themselves. TEST_WORKERS=0: serially.
# 4, measured on 2 loaded cores (tests/engine/test_service.py + tests/xen/test_tapdisk.py, one
# minute apart): serially 140 s, 3 workers 54 s, 4 workers 49 s.
TEST_WORKERS ?= 4
# The tests of the real blktap (tests/xen, tests/xapi) run after the others, in a pytest of
# their own with BLKTAP_WORKERS workers, as measured (the two directories alone on this
# machine's 2 cores: serially 341 s and 405 s; 3 workers 180 s and 207 s; all green; not mixed
# with the other tests' guests). Their former test-bed failures are understood and mended
# (docs/xen.md, "Two upstream tapdisk behaviours"): tapdisk left a finished 'tap-ctl pause'
# unanswered until some event woke it (livesnap's pause now nudges it), and the test bed
# removed minors' ID files that other workers' tapdisks held (two tapdisks on one minor,
# 'tap-ctl create' EINVAL) and left killed tapdisks' metrics behind ('tap-ctl create' EEXIST).
# No test is rerun. tests/bench/test_xen_bench.py and test_xen_sm_bench.py (the Xen
# benchmarks' smoke runs, on real tapdisks) run with them.
BLKTAP_WORKERS ?= 3
# tests/hooks/test_libvirtd.py installs livesnap's hook into the shared libvirtd's
# /etc/libvirt/hooks/qemu.d and removes it afterwards. libvirtd lists qemu.d at every hook
# call, then runs each entry: a removal between the two fails that call ("cannot execute
# binary ... No such file or directory"), and with it another test's domain start (seen once
# in a CI run). So it runs with the Xen tests, which start no libvirtd domain.
HOST_HOOK_TESTS = tests/hooks/test_libvirtd.py

test: daemons lint
	$(PY) -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadgroup \
	  --ignore=tests/xen --ignore=tests/xapi --ignore=tests/bench/test_xen_bench.py \
	  --ignore=tests/bench/test_xen_sm_bench.py --ignore=$(HOST_HOOK_TESTS) tests
	$(PY) -m pytest -q --durations=10 -n $(BLKTAP_WORKERS) --dist loadgroup tests/xen tests/xapi \
	  tests/bench/test_xen_bench.py tests/bench/test_xen_sm_bench.py $(HOST_HOOK_TESTS)

demo: daemons
	$(PY) scripts/demo.py

bench: daemons
	$(PY) bench/vhd_coalesce.py

clean:
	rm -rf .venv build .pytest_cache .hypothesis .import_linter_cache
