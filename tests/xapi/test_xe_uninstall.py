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

from test_sm_gc import BIG, MiB, _fold_sr, _fold_vm, activate_lvs, blktap, sm, sm_tree  # noqa: F401,E501
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
    activate_lvs(world, sr)                 # s2's own VDIs inactive, as SM leaves them
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
    activate_lvs(world, sr)
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


def _faces(world, name):
    """{userdevice: VDI record} of snapshot ``name``'s VDIs."""
    x = world.xapi
    return {rec["uuid"]: rec for rec in x.objects["VDI"].values()
            if rec["other_config"].get("livesnap_snapshot") == name}


def _disk_vdis(world, vm):
    x = world.xapi
    return {x.record("VBD", v)["VDI"] for v in x.record("VM", vm.ref)["VBDs"]}


@pytest.mark.parametrize("running", [True, False], ids=["running", "halted"])
def test_snapshot_destroy_is_not_undone(world, running):
    """``xe snapshot-destroy`` of s1's record (two disks): the record goes, s1's VDIs stay
    XAPI snapshots of the disks' VDIs, marked with the gone record's uuid. livesnap does not
    make it again: not at recover, not at its next create, not when it deletes s2; check is
    ok and gives it as a note; snapshot_list keeps s1. Then s1 deleted through livesnap:
    its VDIs go, the note too."""
    x = world.xapi
    vm = world.add_vm(ndisks=2)
    if running:
        vm.start()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    snap = records(world, vm)["s1"]
    snap_uuid = x.record("VM", snap)["uuid"]
    faces = _faces(world, "s1")
    assert len(faces) == 2 and {f["other_config"]["livesnap_record"]
                                for f in faces.values()} == {snap_uuid}
    run_xe(world, xe.snapshot_destroy, snap)
    assert sorted(records(world, vm)) == ["s2"]
    assert sorted(_faces(world, "s1")) == sorted(faces)
    for f in _faces(world, "s1").values():
        assert f["is_a_snapshot"] and f["snapshot_of"] in _disk_vdis(world, vm)
    check = world.ok("check", vm_uuid=vm.uuid)
    assert check["ok"], check
    assert [n for n in check["notes"] if "s1" in n and snap_uuid in n], check
    assert world.ok("recover", vm_uuid=vm.uuid)["metadata"] == []
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s3")
    assert sorted(records(world, vm)) == ["s2", "s3"]
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    assert sorted(records(world, vm)) == ["s3"]
    listing = world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]
    assert [s["name"] for s in listing] == ["s1", "s3"], listing
    assert world.ok("recover", vm_uuid=vm.uuid)["metadata"] == []
    assert sorted(records(world, vm)) == ["s3"]
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert r["action"] in ("merged", "deleted"), r
    assert _faces(world, "s1") == {}
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] \
        == ["s3"]
    check = world.ok("check", vm_uuid=vm.uuid)
    assert check["ok"] and check["notes"] == [], check
    if running:
        vm.stop()


def test_killed_before_the_vdis_name_the_record(world):
    """The plugin killed after s1's record has its VBDs, before s1's VDIs name it
    (``xapi:recorded:0``): recover adopts the record (no second one) and marks the VDIs;
    a snapshot-destroy after that is the user's and is kept."""
    from test_vm_snapshot_records import killed
    x = world.xapi
    vm = world.add_vm(ndisks=2)
    killed(world, "snapshot_create", "xapi:recorded:0", vm_uuid=vm.uuid, name="s1")
    snap = records(world, vm)["s1"]
    assert {f["other_config"].get("livesnap_record") for f in _faces(world, "s1").values()} \
        == {None}
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert records(world, vm) == {"s1": snap}, r
    snap_uuid = x.record("VM", snap)["uuid"]
    assert {f["other_config"].get("livesnap_record") for f in _faces(world, "s1").values()} \
        == {snap_uuid}
    run_xe(world, xe.snapshot_destroy, snap)
    assert world.ok("recover", vm_uuid=vm.uuid)["metadata"] == []
    assert records(world, vm) == {}
    assert world.ok("check", vm_uuid=vm.uuid)["ok"]


def test_follower_ignores_a_snapshot_destroy(sm_world, sm):
    """The running follower (event.from on vm and vdi): ``xe snapshot-destroy`` of s1's
    record (a VM del event, no VDI gone) makes it do nothing; then ``xe
    snapshot-uninstall`` of s2's record: the follower merges s2's base copy and reports
    that only, and s1's record is not made again by the merge's sync of XAPI's records."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    vm, disk = _fold_vm(world, bt, world.sr)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    bt.write(disk, 16 * MiB, 4 * MiB, 0x35)
    recs = records(world, vm)
    vm.start()
    p = subprocess.Popen(_follow_argv(world, sm), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, env=world.env(),
                         cwd=ROOT)
    try:
        _wait(lambda: any(m == "event.from" for m, _ in world.xapi.calls), p)
        run_xe(world, xe.snapshot_destroy, recs["s1"])
        run_xe(world, xe.snapshot_uninstall, recs["s2"])
        out = json.loads(_readline(p))
        assert out["vm_uuid"] == vm.uuid and "error" not in out, (out, _stderr(p))
        assert out["result"]["followed_sm"]["deleted"] == ["s2"], out
        assert [m["method"] for m in out["result"]["merges"]] == ["fold"], out
    finally:
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=60)
    assert rest.strip() == "", (rest, err)
    assert "Traceback" not in err, err
    assert records(world, vm) == {}
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] \
        == ["s1"]
    check = world.ok("check", vm_uuid=vm.uuid)
    assert check["ok"] and [n for n in check["notes"] if "s1" in n], check
    assert _follow_once(world, sm) == []
    vm.stop()


def test_vm_uninstall_of_the_vm_and_its_snapshot(sm_world, sm):
    """``xe vm-uninstall`` of a halted VM with a livesnap snapshot: xe destroys the VM, its
    own disk's VDI (its VBD has ``owner``, as vm-install gives it), then the snapshot's record
    and VDI. The follower does not fail on a VM XAPI no longer has: it reports it gone and
    leaves its images to SM's GC, which removes the base copy (garbage: hidden, no child)."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    vm, disk = _fold_vm(world, bt, world.sr)
    x = world.xapi
    for v in x.record("VM", vm.ref)["VBDs"]:
        x.record("VBD", v).setdefault("other_config", {})["owner"] = ""
    vm_uuid, snap = vm.uuid, records(world, vm)["s1"]
    done = run_xe(world, xe.vm_uninstall, vm.ref)
    assert [vm_ref for vm_ref, _ in done] == [vm.ref, snap]
    assert all(len(vdis) == 1 for _, vdis in done), done
    assert vm.ref not in x.objects["VM"] and snap not in x.objects["VM"]
    out = _follow_once(world, sm)
    assert [o["vm_uuid"] for o in out] == [vm_uuid] and "error" not in out[0], out
    assert out[0].get("vm_gone") is True, out
    sm.gc(world.sr)
    assert x.sr_images(world.sr) == {}, x.sr_images(world.sr)
