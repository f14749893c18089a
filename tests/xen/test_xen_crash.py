"""Crash safety on the Xen datapath: livesnap is SIGKILLed at each journal step of create and
of delete (internal snapshot, online merge, reparent under a pause), and inside a pause right
after a leaf was renamed; ``livesnap recover`` then leaves no tapdisk paused and no
acknowledged write lost, and the state is "after"."""
import pytest

from livesnap.tools import tap_ctl

from test_xen_datapath import digest, lvm_vm, vm  # noqa: F401  (fixtures)


def crash_then_recover(vm, args, fault):
    p = vm.cli(*args, env_extra={"LIVESNAP_FAULT": fault}, expect=None)
    assert p.returncode == -9, (fault, p.stderr)
    rec = vm.json("recover", vm.name)
    assert rec["recovered"] is not None, fault
    for t, td in vm.tapdisks.items():
        now = tap_ctl.find(vm.paths[t])
        assert now is not None and not now.state & tap_ctl.PAUSED, (fault, now)
    return rec


# the kills in create, and the kills in delete in two halves: three tests that pytest-xdist
# runs in parallel (together they were one of the suite's longest tests)
@pytest.mark.slow
@pytest.mark.parametrize("part", ["create", "delete:0/2", "delete:1/2"])
def test_kill_at_every_step_then_recover(vm, part):
    kill_then_recover(vm, ["create:before:0", "create:after:0", "tapdisk:renamed:0"],
                      lambda ops: ["delete:%s:%d" % (w, i) for i in range(len(ops))
                                   for w in ("before", "after")] + ["tapdisk:renamed:0"],
                      minimum=10, part=part)


def test_kill_on_lvhd_then_recover(lvm_vm):
    """On LVs the points where an LV is half done: killed after the rename inside the pause
    (deflate and the new leaf's LV still to do), after a merge target was made writable and
    inflated (it must end deflated and read-only), and at steps around the merges. (The
    journal steps themselves are the same on files and LVs: the test above covers each.)"""
    kill_then_recover(lvm_vm, ["tapdisk:renamed:0"],
                      lambda ops: ["lvm:inflated:0", "delete:after:1", "delete:before:3"],
                      minimum=4)


def kill_then_recover(vm, create_faults, delete_faults, minimum, part="all"):
    """Kill creates at ``create_faults``, then deletes at ``delete_faults(ops)`` (``ops``: the
    steps of a delete); at least ``minimum`` points in all. ``part``: ``all``, ``create`` (only
    the kills in create) or ``delete:K/N`` (the K-th of N slices of the kills in delete, after
    the same snapshots made without kills)."""
    vm.start()
    covered = []
    for i, fault in enumerate(create_faults):
        name = "c%d" % i
        if part.startswith("delete:"):
            vm.create(name)
            continue
        crash_then_recover(vm, ["snapshot-create", vm.name, name], fault)
        listing = vm.json("snapshot-list", vm.name)
        disks = [s for s in listing["snapshots"] if s["name"] == name][0]["disks"]
        vm.snaps[name] = {d["target"]: digest(d["image"]) for d in disks}
        vm.check()
        covered.append(fault)
    if part != "create":
        # delete with the active leaf as only child: internal snapshots, merges, state
        plan = vm.json("snapshot-delete", vm.name, "c%d" % (len(create_faults) - 1),
                       "--dry-run")
        ops = [s["op"] for s in plan["steps"]]
        assert "internal_snapshot" in ops
        faults = list(enumerate(delete_faults(ops)))
        assert len(create_faults) + len(faults) >= minimum
        if part.startswith("delete:"):
            k, n = (int(x) for x in part[len("delete:"):].split("/"))
            faults = faults[k::n]
        for j, fault in faults:
            name = "d%d" % j
            vm.create(name)
            crash_then_recover(vm, ["snapshot-delete", vm.name, name], fault)
            del vm.snaps[name]
            vm.check()
            covered.append(fault)
    print("\nXen crash points covered (%s): %d" % (part, len(covered)))
    vm.stop_and_verify()
    vm.check()
