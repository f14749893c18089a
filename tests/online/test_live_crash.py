"""Crash safety under a running, writing guest: livesnap is SIGKILLed at each journal step
of create and of each merge kind (active commit, pull, intermediate commit), and right after
it started a block job; ``livesnap recover`` then finishes the operation, the guest keeps
running and writing, and no acknowledged write is lost."""
import pytest

from online_helpers import merge_kinds


def points(live, args):
    plan = live.json(*(args + ["--dry-run"]))
    n = len(plan["steps"])
    return plan, [("%s:%s:%d" % (op, when, i)) for i in range(n) for when in ("before", "after")
                  for op in [args[0].split("-")[1]]]


def crash_then_recover(live, args, fault):
    proc = live.cli(*args, env_extra={"LIVESNAP_FAULT": fault}, expect=None)
    assert proc.returncode == -9, (fault, proc.stderr)
    assert live.guest.is_active()
    rec = live.json("recover", live.name)
    assert rec["recovered"] is not None, fault
    assert live.guest.is_active()
    live.guest.wait_acks(2)                 # still writing
    return rec


def setup_active_commit(live, i):
    live.guest.wait_acks(40)
    live.create("a%d" % i)
    live.guest.wait_acks(2)
    return "a%d" % i, "commit"


def setup_pull(live, i):
    live.create("p%d-base" % i)       # so that p's own image holds only a few writes
    live.guest.wait_acks(1)
    live.create("p%d" % i)
    live.guest.wait_acks(60)
    return "p%d" % i, "pull"


def setup_intermediate(live, i):
    live.create("m%d" % i)
    live.guest.wait_acks(2)
    live.create("m%d-top" % i)
    live.guest.wait_acks(2)
    return "m%d" % i, "commit"


# one test per operation kind, each with its own guest, so that pytest-xdist runs them in
# parallel (together they were the suite's longest test)
@pytest.mark.slow
@pytest.mark.parametrize("part", ["create", "active_commit", "pull", "intermediate"])
def test_kill_at_every_step_while_the_guest_writes(live, part):
    live.start()
    covered = []
    if part == "create":
        # create: one journal step (the atomic snapshot of both disks)
        for fault in ["create:before:0", "create:after:0"]:
            name = "c%d" % len(covered)
            crash_then_recover(live, ["snapshot-create", live.name, name], fault)
            listing = live.json("snapshot-list", live.name)
            disks = [s for s in listing["snapshots"] if s["name"] == name][0]["disks"]
            from testguest import chain_digest
            live.snaps[name] = {d["target"]: chain_digest(d["image"]) for d in disks}
            live.check_snapshots()
            covered.append(fault)
        for name in sorted(live.snaps):
            live.delete(name)
        assert len(covered) == 2
    else:
        setup = {"active_commit": setup_active_commit, "pull": setup_pull,
                 "intermediate": setup_intermediate}[part]
        # the journal steps of this kind, and one kill inside the block job
        name, kind = setup(live, 0)
        plan, faults = points(live, ["snapshot-delete", live.name, name])
        assert merge_kinds(plan) == [kind, kind], (part, merge_kinds(plan))
        faults.append("job:started:0")
        for j, fault in enumerate(faults):
            if j:
                name, _ = setup(live, j)
            crash_then_recover(live, ["snapshot-delete", live.name, name], fault)
            del live.snaps[name]
            live.check_snapshots()
            covered.append((part, fault))
        for leftover in sorted(live.snaps):
            live.delete(leftover)
        assert len(covered) >= 6        # (with create's 2: the 20 points of the whole)
    print("\nonline crash points covered (%s): %d" % (part, len(covered)))
    live.stop_and_verify()
