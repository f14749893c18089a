"""Crash safety under a running, writing guest: livesnap is SIGKILLed at each journal step
of create and of each merge kind (active commit, pull, intermediate commit), and right after
it started a block job; ``livesnap recover`` then finishes the operation, the guest keeps
running and writing, and no acknowledged write is lost."""
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


def test_kill_at_every_step_while_the_guest_writes(live):
    live.start()
    g = live.guest
    covered = []
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

    def setup_active_commit(i):
        g.wait_acks(40)
        live.create("a%d" % i)
        g.wait_acks(2)
        return "a%d" % i, "commit"

    def setup_pull(i):
        live.create("p%d-base" % i)       # so that p's own image holds only a few writes
        g.wait_acks(1)
        live.create("p%d" % i)
        g.wait_acks(60)
        return "p%d" % i, "pull"

    def setup_intermediate(i):
        live.create("m%d" % i)
        g.wait_acks(2)
        live.create("m%d-top" % i)
        g.wait_acks(2)
        return "m%d" % i, "commit"

    for setup in (setup_active_commit, setup_pull, setup_intermediate):
        # the journal steps of this kind, and one kill inside the block job
        name, kind = setup(0)
        plan, faults = points(live, ["snapshot-delete", live.name, name])
        assert merge_kinds(plan) == [kind, kind], (setup.__name__, merge_kinds(plan))
        faults.append("job:started:0")
        for j, fault in enumerate(faults):
            if j:
                name, _ = setup(j)
            crash_then_recover(live, ["snapshot-delete", live.name, name], fault)
            del live.snaps[name]
            live.check_snapshots()
            covered.append((setup.__name__, fault))
        for leftover in sorted(live.snaps):
            live.delete(leftover)
    print("\nonline crash points covered: %d" % len(covered))
    assert len(covered) >= 20
    live.stop_and_verify()
