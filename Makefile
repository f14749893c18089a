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

# Most of the suite's time is waiting (TCG guests, stalls, polling), not CPU: TEST_WORKERS
# pytest-xdist workers overlap the waits even on 2 cores. --dist loadgroup keeps each
# xdist_group (tests sharing host-wide state) in one worker; but with pytest 9.2 and
# xdist 3.8.0 the groups are ignored (pytest-dev/pytest-xdist#1386), so tests that share
# host-wide state also lock it themselves. TEST_WORKERS=0: serially.
# 4, measured on 2 loaded cores (tests/engine/test_service.py + tests/xen/test_tapdisk.py, one
# minute apart): serially 140 s, 3 workers 54 s, 4 workers 49 s.
TEST_WORKERS ?= 4
# A real tapdisk over NBD sometimes never answers 'tap-ctl pause' (seen about once in a few
# hundred pauses, more under load; tests/xen/test_open_leaf.py's heavy-allocation test shows
# it most): under investigation (issue 13's notes). Until it is understood, a test that fails
# with exactly that error is run again (at most twice); any other failure fails the run.

# The tests of the real blktap (tests/xen, tests/xapi) run after the others, in a pytest of
# their own, one test at a time, on an otherwise idle machine: real tapdisks of parallel
# workers were seen sharing a minor (tap-ctl create EINVAL, destroy EAGAIN, two tapdisks
# listed for one minor), and under the load of the other tests' guests a real tapdisk over
# NBD more often leaves 'tap-ctl pause' unanswered; both test-bed problems not yet understood.
# A test that failed with exactly one of those two test-bed errors ('tap-ctl pause' of a real
# tapdisk unanswered within livesnap's 30 s, also as the XAPI plugin reports it; 'tap-ctl
# create' of a test's own tapdisk refused) is run again, at most 3 times; any other failure
# fails the run. Seen on an idle machine too: 3 such failures in one serial run of the 110
# tests here. tests/bench/test_xen_bench.py (the Xen benchmark's smoke runs, on real tapdisks)
# runs with them.
RERUN := --reruns 3 --only-rerun 'no answer within 30' --only-rerun 'tap-ctl create -a vhd:.* failed'

test: daemons lint
	$(PY) -m pytest -q --durations=20 -n $(TEST_WORKERS) --dist loadgroup $(RERUN) \
	  --ignore=tests/xen --ignore=tests/xapi --ignore=tests/bench/test_xen_bench.py tests
	$(PY) -m pytest -q --durations=10 $(RERUN) tests/xen tests/xapi tests/bench/test_xen_bench.py

clean:
	rm -rf .venv build .pytest_cache .hypothesis .import_linter_cache
