"""XAPI's VM snapshot record of each livesnap snapshot (livesnap/platforms/xapi_records.py),
what XenCenter's Snapshots tab and ``xe snapshot-list`` read, kept by the plugin's
operations through the XAPI stand-in's ``VM.snapshot``/``VBD.create``/``VM.destroy``
(testxen/xapi_vms.py): one record per visible snapshot with one VBD per snapshot disk,
gone with its snapshot and only it, listed, checked, remade by ``recover`` after a kill and
never doubled."""
import subprocess
import xmlrpc.client

import pytest

from conftest_paths import PLUGIN

NULL_REF = "OpaqueRef:NULL"


def records(world, vm):
    """{name: (ref, record)} of the VM's snapshot records; fails on a name held twice."""
    x = world.xapi
    out = {}
    for ref, rec in x.objects["VM"].items():
        if rec["is_a_snapshot"] and rec["snapshot_of"] == vm.ref:
            name = rec["other_config"].get("livesnap_snapshot")
            assert name not in out, "two records of snapshot %s" % name
            out[name] = (ref, rec)
    return out


def disks_of(world, rec):
    """{userdevice: VDI uuid} of a VM record's disk VBDs."""
    x = world.xapi
    return {x.record("VBD", v)["userdevice"]: x.record("VDI", x.record("VBD", v)["VDI"])["uuid"]
            for v in rec["VBDs"] if x.record("VBD", v)["type"] == "Disk"}


def snapshot_disks(world, vm, name):
    """{userdevice: VDI uuid} of a livesnap snapshot, from snapshot_list."""
    import os
    listing = world.ok("snapshot_list", vm_uuid=vm.uuid, all="true")["snapshots"]
    snap, = [s for s in listing if s["name"] == name]
    return {str("abcdefgh".index(d["target"][-1])): os.path.basename(d["image"])[:-len(".vhd")]
            for d in snap["disks"]}


def killed(world, fn, fault, **args):
    args = dict(args)
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, args), methodname=fn)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(LIVESNAP_FAULT=fault), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)


def check_problems(world, vm):
    return world.ok("check", vm_uuid=vm.uuid)["problems"]


@pytest.mark.parametrize("running", [True, False], ids=["running", "halted"])
def test_two_disks_one_record(world, running):
    """A VM with two disks: ONE record per snapshot, with both disks' VBDs (the VM's slots)
    naming the snapshot's VDIs, each VDI a snapshot of its disk's VDI; a second snapshot a
    second record, the VM's parent the newest; recover changes nothing."""
    x = world.xapi
    vm = world.add_vm(ndisks=2)
    if running:
        vm.start()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    recs = records(world, vm)
    assert sorted(recs) == ["s1", "s2"]
    vm_vdis = {x.record("VBD", v)["userdevice"]: x.record("VBD", v)["VDI"]
               for v in x.record("VM", vm.ref)["VBDs"]}
    for name, (ref, rec) in recs.items():
        assert disks_of(world, rec) == snapshot_disks(world, vm, name)
        assert rec["power_state"] == "Halted" and rec["name_label"] == name
        assert "revert" in rec["blocked_operations"]
        for v in rec["VBDs"]:
            vbd = x.record("VBD", v)
            face = x.record("VDI", vbd["VDI"])
            assert face["is_a_snapshot"] and face["snapshot_of"] == vm_vdis[vbd["userdevice"]]
            assert "owner" in vbd["other_config"]
    assert x.record("VM", vm.ref)["parent"] == recs["s2"][0]
    assert x.record("VM", recs["s2"][0])["parent"] == recs["s1"][0]
    before = {n: (ref, list(rec["VBDs"])) for n, (ref, rec) in recs.items()}
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["metadata"] == [], r
    assert {n: (ref, list(rec["VBDs"])) for n, (ref, rec) in records(world, vm).items()} \
        == before
    assert check_problems(world, vm) == []
    if running:
        vm.stop()


def test_delete_destroys_only_that_record(world):
    """Deleting s2 of s1, s2, s3 (running VM): s2's record is destroyed, s1's and s3's keep
    their VBDs and every VDI they name; the VM's parent chain skips s2."""
    x = world.xapi
    vm = world.add_vm(ndisks=2)
    vm.start()
    for name in ("s1", "s2", "s3"):
        world.ok("snapshot_create", vm_uuid=vm.uuid, name=name)
    before = records(world, vm)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    after = records(world, vm)
    assert sorted(after) == ["s1", "s3"]
    assert before["s2"][0] not in x.objects["VM"]
    for name in ("s1", "s3"):
        ref, rec = after[name]
        assert ref == before[name][0] and rec["VBDs"] == before[name][1]["VBDs"]
        assert disks_of(world, rec) == snapshot_disks(world, vm, name)
    assert x.record("VM", after["s3"][0])["parent"] == after["s1"][0]
    assert check_problems(world, vm) == []
    vm.stop()


def test_list_reports_the_record(world):
    """snapshot_list gives each snapshot its record's uuid (snapshots made by create and by
    a revert that keeps the current state); after a delete the others keep theirs."""
    vm = world.add_vm(ndisks=1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1", keep_current="k1")
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    for gone in (None, "s1"):
        if gone:
            world.ok("snapshot_delete", vm_uuid=vm.uuid, name=gone)
        listing = {s["name"]: s for s in world.ok("snapshot_list", vm_uuid=vm.uuid,
                                                  all="true")["snapshots"]}
        recs = records(world, vm)
        assert sorted(listing) == sorted(recs) == sorted({"s1", "k1", "s2"} - {gone})
        assert {n: s["xapi_snapshot"] for n, s in listing.items()} == \
            {n: rec["uuid"] for n, (ref, rec) in recs.items()}
    assert check_problems(world, vm) == []


def _destroyed_unmarked(world, vm):
    """The record destroyed while its VDIs do not name it (a record of a livesnap before
    the marks): taken as lost, not as the user's snapshot-destroy (test_xe_uninstall.py)."""
    ref, rec = records(world, vm)["s1"]
    for vdi in world.xapi.objects["VDI"].values():
        vdi["other_config"].pop("livesnap_record", None)
    world.xapi._vm_destroy("VM.destroy", ref)
    return "snapshot s1 has no VM snapshot record"


def _wrong_vdi(world, vm):
    """The record's VBD of disk 0 moved to the VM's own VDI."""
    x = world.xapi
    ref, rec = records(world, vm)["s1"]
    vbd = [v for v in rec["VBDs"] if x.record("VBD", v)["userdevice"] == "0"][0]
    own = [x.record("VBD", v)["VDI"] for v in x.record("VM", vm.ref)["VBDs"]
           if x.record("VBD", v)["userdevice"] == "0"][0]
    x.record("VDI", x.record("VBD", vbd)["VDI"])["VBDs"].remove(vbd)
    x.record("VBD", vbd)["VDI"] = own
    return "names VDIs"


def _vbd_lost(world, vm):
    """The record's VBD of disk 1 gone (a kill between two VBD.create)."""
    x = world.xapi
    ref, rec = records(world, vm)["s1"]
    vbd = [v for v in rec["VBDs"] if x.record("VBD", v)["userdevice"] == "1"][0]
    x.record("VDI", x.record("VBD", vbd)["VDI"])["VBDs"].remove(vbd)
    rec["VBDs"].remove(vbd)
    x._del("VBD", vbd)
    return "names VDIs"


def _stale(world, vm):
    """A record naming a livesnap snapshot the catalog does not have."""
    x = world.xapi
    vdis = [x.record("VBD", v)["VDI"] for v in x.record("VM", vm.ref)["VBDs"]]
    ghost = x._vm_snapshot("VM.snapshot", vm.ref, "ghost", vdis)
    x.record("VM", ghost)["other_config"]["livesnap_snapshot"] = "ghost"
    return "names livesnap snapshot ghost"


@pytest.mark.parametrize("drift", [_destroyed_unmarked, _wrong_vdi, _vbd_lost, _stale],
                         ids=lambda f: f.__name__.strip("_"))
def test_check_names_a_bad_record_and_recover_mends_it(world, drift):
    """check names a snapshot with no record, a record naming other VDIs (or fewer), a record
    of a snapshot livesnap does not have; recover brings the records in step (one record
    per snapshot, its VDIs the snapshot's), and check is clean again."""
    vm = world.add_vm(ndisks=2)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    n_vdis = len(world.xapi.objects["VDI"])
    want = drift(world, vm)
    problems = check_problems(world, vm)
    assert [p for p in problems if want in p], problems
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["metadata"], r
    assert check_problems(world, vm) == []
    recs = records(world, vm)
    assert sorted(recs) == ["s1"]
    assert disks_of(world, recs["s1"][1]) == snapshot_disks(world, vm, "s1")
    assert len(world.xapi.objects["VDI"]) == n_vdis        # no VDI made or destroyed
    assert world.ok("recover", vm_uuid=vm.uuid)["metadata"] == []


@pytest.mark.parametrize("fault,change", [("create:committed:0", "made"),
                                          ("xapi:snapshotted:0", "adopted")])
@pytest.mark.parametrize("running", [True, False], ids=["running", "halted"])
def test_killed_between_the_images_and_the_record(world, fault, change, running):
    """The plugin killed after the images are committed but before the record exists
    (``create:committed:0``) or right after ``VM.snapshot`` made it, before livesnap marked
    it (``xapi:snapshotted:0``): check names the missing record; recover makes it, or adopts
    the unmarked one, so that there is exactly one record, naming the snapshot's VDIs; a
    second recover changes nothing."""
    x = world.xapi
    vm = world.add_vm(ndisks=2)
    if running:
        vm.start()
    killed(world, "snapshot_create", fault, vm_uuid=vm.uuid, name="s1")
    made = [ref for ref, rec in x.objects["VM"].items() if rec["is_a_snapshot"]]
    assert len(made) == (1 if change == "adopted" else 0)
    assert [p for p in check_problems(world, vm) if "no VM snapshot record" in p]
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["metadata"] == [[change, "s1"]], r
    recs = records(world, vm)
    assert sorted(recs) == ["s1"]
    assert [ref for ref, rec in x.objects["VM"].items() if rec["is_a_snapshot"]] == \
        [recs["s1"][0]]
    if made:
        assert recs["s1"][0] == made[0]
    assert disks_of(world, recs["s1"][1]) == snapshot_disks(world, vm, "s1")
    assert world.ok("recover", vm_uuid=vm.uuid)["metadata"] == []
    assert check_problems(world, vm) == []
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    assert sorted(records(world, vm)) == ["s1", "s2"]
    if running:
        vm.stop()


def test_a_snapshot_of_some_disks_has_their_vbds_only(world):
    """``disks=xvdb`` on a two-disk VM: the record has the one VBD of slot 1; XAPI's own
    snapshot of the VM would have had both (nothing is ignored there)."""
    vm = world.add_vm(ndisks=2)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1", disks="xvdb")
    ref, rec = records(world, vm)["s1"]
    assert disks_of(world, rec) == snapshot_disks(world, vm, "s1")
    assert sorted(disks_of(world, rec)) == ["1"]
    assert check_problems(world, vm) == []
