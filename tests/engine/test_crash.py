"""Crash safety: livesnap is SIGKILLed before and after every journal step of every kind of
operation; ``livesnap recover`` then brings the domain to exactly "before" or "after"."""
import os

import pytest

from helpers import chain_digest



def state_of(dom):
    listing = dom.json("snapshot-list", dom.name)
    snaps = {s["name"]: {d["target"]: chain_digest(d["image"]) for d in s["disks"]}
             for s in listing["snapshots"]}
    return snaps, dom.digests()


def setup_create(dom):
    dom.write("vda", 1, 0)
    return ["snapshot-create", dom.name, "new"], "create"


def setup_delete_remove(dom):
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vdb", 2, 0)
    dom.json("snapshot-create", dom.name, "s2")
    dom.json("snapshot-revert", dom.name, "s1")          # s2 has no child now
    return ["snapshot-delete", dom.name, "s2"], "delete"


def setup_delete_commit(dom):
    for i in range(6):
        dom.write("vda", 1, i * 65536)
        dom.write("vdb", 1, i * 65536)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 0)                               # small child: commit
    dom.json("snapshot-create", dom.name, "s2")
    return ["snapshot-delete", dom.name, "s1"], "delete"


def setup_delete_pull(dom):
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    for i in range(8):                                   # big active child: pull
        dom.write("vda", 2, i * 65536)
        dom.write("vdb", 2, i * 65536)
    return ["snapshot-delete", dom.name, "s1"], "delete"


def setup_delete_hide(dom):
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 65536)
    dom.json("snapshot-create", dom.name, "s2")
    dom.json("snapshot-revert", dom.name, "s1")          # s1 has two children
    return ["snapshot-delete", dom.name, "s1"], "delete"


def setup_delete_cascade(dom):
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 65536)
    dom.json("snapshot-create", dom.name, "s2")
    dom.json("snapshot-revert", dom.name, "s1")
    dom.json("snapshot-delete", dom.name, "s1")           # hidden
    return ["snapshot-delete", dom.name, "s2"], "delete"  # remove s2 -> reclaim s1


def setup_revert(dom):
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vdb", 2, 0)
    return ["snapshot-revert", dom.name, "s1"], "revert"


def setup_revert_keep(dom):
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vdb", 2, 0)
    return ["snapshot-revert", dom.name, "s1", "--keep-current", "k"], "revert"


SCENARIOS = [setup_create, setup_delete_remove, setup_delete_commit, setup_delete_pull,
             setup_delete_hide, setup_delete_cascade, setup_revert, setup_revert_keep]


def expected_after(args, before):
    snaps, live = before
    snaps = dict(snaps)
    if args[0] == "snapshot-create":
        snaps[args[2]] = dict(live)
    elif args[0] == "snapshot-delete":
        del snaps[args[2]]
    else:
        target = snaps[args[2]]
        if "--keep-current" in args:
            snaps[args[-1]] = {t: live[t] for t in target}
        live = dict(live, **target)
    return snaps, live


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__[6:])
def test_kill_at_every_step_then_recover(make_dom, scenario):
    probe = make_dom(sub="probe")
    args, op = scenario(probe)
    nsteps = len(probe.json(*args, "--dry-run")["steps"])
    assert nsteps >= 1
    points = [(when, i) for i in range(nsteps) for when in ("before", "after")]
    for when, i in points:
        dom = make_dom(sub="%s-%d" % (when, i))
        args, op = scenario(dom)
        before = state_of(dom)
        after = expected_after(args, before)
        proc = dom.cli(*args, env_extra={"LIVESNAP_FAULT": "%s:%s:%d" % (op, when, i)},
                       expect=None)
        assert proc.returncode == -9, (when, i, proc.stderr)
        # a new command refuses to run over the interrupted one, naming recover
        refused = dom.cli("snapshot-create", dom.name, "other", expect=1)
        assert "livesnap recover" in refused.stderr
        assert dom.cli("check", dom.name, expect=1).returncode == 1
        rec = dom.json("recover", dom.name)
        assert rec["recovered"] is not None
        got = state_of(dom)
        assert got in (before, after), (when, i)
        assert got == after          # roll-forward: every interrupted operation completes
        assert dom.json("recover", dom.name)["recovered"] is None     # idempotent
        chk = dom.json("check", dom.name)
        assert chk["ok"], chk["problems"]
        # re-running the interrupted command is safe: it has nothing left to do
        again = dom.cli(*args, expect=None)
        if args[0] == "snapshot-revert" and "--keep-current" not in args:
            assert again.returncode == 0    # reverting twice reads the same
        else:                               # already exists / already deleted
            assert again.returncode == 1 and again.stderr.startswith("error: ")
        assert state_of(dom) == after
        dom.destroy()
    print("\n%s: %d crash points covered" % (scenario.__name__, len(points)))


def test_report_crash_points(make_dom):
    """How many crash points the scenarios cover (test_kill_at_every_step_then_recover kills at
    each of its scenario's points), counted from their plans as that test counts them: it
    used to count what the other tests of this process had run, which under pytest-xdist
    is only the share of one worker."""
    total = 0
    for scenario in SCENARIOS:
        probe = make_dom(sub="count-" + scenario.__name__)
        args, op = scenario(probe)
        total += 2 * len(probe.json(*args, "--dry-run")["steps"])
    print("\ncrash points covered: %d across %d operation kinds" % (total, len(SCENARIOS)))
    assert total >= 40


def test_sigterm_stops_between_steps_and_recover_finishes(make_dom):
    """SIGTERM during an operation only stops it at the next step boundary: exit 143, the
    journal names what is left, 'livesnap recover' finishes it."""
    import signal
    import subprocess
    import sys
    import time
    dom = make_dom(sub="term")
    args, op = setup_delete_commit(dom)
    before = state_of(dom)
    after = expected_after(args, before)
    reached = os.path.join(os.path.dirname(dom.state_dir), "fault-reached")
    env = dict(dom.env(), LIVESNAP_FAULT="delete:after:0:sleep=3",
               LIVESNAP_FAULT_REACHED=reached)
    proc = subprocess.Popen([sys.executable, "-m", "livesnap"] + args, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(reached):    # wait until inside the stall after the first step
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err)
    assert "livesnap recover" in err
    refused = dom.cli("snapshot-create", dom.name, "x", expect=1)
    assert "interrupted operation" in refused.stderr
    rec = dom.json("recover", dom.name)
    assert rec["steps_done_before"] == 1
    assert state_of(dom) == after
    assert dom.json("check", dom.name)["ok"]
