"""livesnap's VM snapshot record removed as ``xe`` removes a snapshot (testxen/xe.py: the
calls of xapi's CLI server, cli_operations.ml), on the XAPI stand-in with SM's real
``vdi_delete`` behind ``VDI.destroy``:

* ``xe snapshot-uninstall``: ``VM.destroy`` of the record, then ``VDI.destroy`` of each VDI
  its VBDs own; livesnap's follower (``xapi-follow``, through XAPI's events or run once)
  folds the base copy into the running leaf, SM's GC then finds nothing, check is clean
  and no record is left;
* ``xe snapshot-destroy``: ``VM.destroy`` only; the VDIs stay XAPI snapshots of the disk's
  VDI and the snapshot stays livesnap's, and livesnap never makes the record again (not at
  its next operation, not in recover, not in the follower's merge of another snapshot);
  check gives it as a note."""
import json
import signal
import subprocess

import pytest

from testxen import blktap as txblktap
from testxen import sm as smmod
from testxen import xe
from testxen.world import ROOT

from test_sm_gc import BIG, MiB, _fold_sr, _fold_vm, blktap, sm, sm_tree  # noqa: F401
from test_xapi_events import (_check_sm_end_state, _follow_argv, _follow_once, _readline,
                              _stderr, _wait, _xe, sm_world)  # noqa: F401


def records(world, vm):
    """{livesnap snapshot name: ref} of the VM's snapshot records."""
    return {rec["other_config"].get("livesnap_snapshot"): ref
            for ref, rec in world.xapi.objects["VM"].items()
            if rec["is_a_snapshot"] and rec["snapshot_of"] == vm.ref}


def run_xe(world, fn, *args):
    s = _xe(world)
    try:
        return fn(s, *args)
    finally:
        s.xenapi.session.logout()


def _no_record_left(world, vm):
    assert records(world, vm) == {}
    assert [ref for ref, rec in world.xapi.objects["VBD"].items()
            if ref not in world.xapi.objects["VM"][rec["VM"]]["VBDs"]] == []


@pytest.mark.parametrize("kind", ["ext", "lvm"])
def test_snapshot_uninstall_followed_through_events(request, sm_world, sm, kind):
    """The running follower; ``xe snapshot-uninstall`` of s1's record: the record goes,
    then its VDI (SM unlinks or removes the face and kicks its GC); the follower folds s1's
    base copy into the running leaf. No record, no snapshot left; check ok; SM's GC finds
    nothing; every write is in the disk."""
    world = sm_world
    sr = _fold_sr(request, world, sm, kind)
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    snap = records(world, vm)["s1"]
    vm.start()
    p = subprocess.Popen(_follow_argv(world, sm), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, env=world.env(),
                         cwd=ROOT)
    try:
        _wait(lambda: any(m == "event.from" for m, _ in world.xapi.calls), p)
        (vm_ref, vdis), = run_xe(world, xe.snapshot_uninstall, snap)
        assert vm_ref == snap and len(vdis) == 1
        out = json.loads(_readline(p))
        assert out["vm_uuid"] == vm.uuid and "error" not in out, (out, _stderr(p))
        r = out["result"]
        assert r["followed_sm"]["deleted"] == ["s1"], r
        assert [m["method"] for m in r["merges"]] == ["fold"], r
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    calls = [m for m, _ in world.xapi.calls if m in ("VM.destroy", "VDI.destroy")]
    assert calls == ["VM.destroy", "VDI.destroy"], calls
    _no_record_left(world, vm)
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    check = world.ok("check", vm_uuid=vm.uuid)
    assert check["ok"] and check["notes"] == [], check
    _check_sm_end_state(world, sm, sr, vm, disk, expected)


@pytest.mark.parametrize("kind", ["ext", "lvm"])
def test_snapshot_uninstall_of_a_two_disk_snapshot(request, sm_world, sm, kind):
    """Two-disk snapshots s1, s2 of a running VM. s1 uninstalled with xe (one record, two
    owned VBDs: both VDIs destroyed): the follower merges s1's base copies (each down to one
    child, s2's base), s2, its record and its data untouched, SM's GC finds nothing. Then s2
    uninstalled: both disks' base copies are folded into the running leaves."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    sr = _fold_sr(request, world, sm, kind)
    vm = world.add_vm(ndisks=2, sr=sr, size=BIG)
    for i, (t, path) in enumerate(sorted(vm.paths.items())):
        bt.write(path, 8 * MiB, 4 * MiB, 0x41 + i)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    for i, (t, path) in enumerate(sorted(vm.paths.items())):
        bt.write(path, 10 * MiB, 4 * MiB, 0x51 + i)
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    s2_images = {d["target"]: d["image"] for d in r["disks"]}
    s2_data = {t: bt.read(p) for t, p in s2_images.items()}
    for i, (t, path) in enumerate(sorted(vm.paths.items())):
        bt.write(path, 12 * MiB, 4 * MiB, 0x61 + i)
    vm.start()
    recs = records(world, vm)
    s2_rec = recs["s2"]
    (_, vdis), = run_xe(world, xe.snapshot_uninstall, recs["s1"])
    assert len(vdis) == 2
    out, = _follow_once(world, sm)
    assert out["vm_uuid"] == vm.uuid and "error" not in out, out
    assert out["result"]["followed_sm"]["deleted"] == ["s1"], out
    assert sorted(records(world, vm)) == ["s2"] and records(world, vm)["s2"] == s2_rec
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] \
        == ["s2"]
    assert {t: bt.read(p) for t, p in s2_images.items()} == s2_data
    check = world.ok("check", vm_uuid=vm.uuid)
    assert check["ok"], check
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view
    # then s2 too: both base chains fold into the running leaves
    disks = {t: txblktap.read(p, 8 * MiB, 24 * MiB) for t, p in vm.paths.items()}
    (_, vdis), = run_xe(world, xe.snapshot_uninstall, s2_rec)
    assert len(vdis) == 2
    out, = _follow_once(world, sm)
    assert "error" not in out and out["result"]["followed_sm"]["deleted"] == ["s2"], out
    assert sorted((m["disk"], m["method"]) for m in out["result"]["merges"]) == \
        [("xvda", "fold"), ("xvdb", "fold")], out
    _no_record_left(world, vm)
    assert world.ok("check", vm_uuid=vm.uuid)["ok"]
    vm.stop()
    assert {t: txblktap.read(p, 8 * MiB, 24 * MiB) for t, p in vm.paths.items()} == disks
    assert sorted(world.xapi.sr_images(sr).values()) == sorted(vm.paths.values())
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view
    assert sorted(sm.gc(sr)["vdis"]) == sorted(
        world.xapi.record("VDI", world.xapi.record("VBD", v)["VDI"])["uuid"]
        for v in world.xapi.record("VM", vm.ref)["VBDs"])
