"""The XAPI stand-in's VM snapshot calls (testxen/xapi_vms.py) over XML-RPC through the XenAPI
client, with xapi's semantics (xapi_vm_clone.ml, xapi_vbd.ml, xapi_vm.ml): VM.snapshot leaves
out the VBDs of ignored VDIs and fails as a backend error on a disk it would have SM
snapshot; VBD.create attaches a VDI to a snapshot VM with xapi's checks; VM.destroy of a
snapshot drops its VBD records and keeps every VDI."""
import pytest
import XenAPI

NULL_REF = "OpaqueRef:NULL"


@pytest.fixture
def api(world):
    s = world.xenapi_session("test")
    try:
        yield s.xenapi
    finally:
        s.xenapi.session.logout()


def _vm(world, ndisks=2, cd=None):
    x = world.xapi
    vm = x.add_vm("vm1", power_state="Running")
    vdis = [x.add_vdi(world.sr) for _ in range(ndisks)]
    for i, vdi in enumerate(vdis):
        x.add_vbd(vm, vdi, userdevice=str(i))
    if cd is not None:
        x.add_vbd(vm, cd, userdevice="3", type="CD", mode="RO")
    return vm, vdis


def _vbd(vm, vdi, userdevice, **over):
    r = {"VM": vm, "VDI": vdi, "userdevice": userdevice, "bootable": False, "mode": "RW",
         "type": "Disk", "unpluggable": True, "empty": False, "other_config": {"owner": ""},
         "qos_algorithm_type": "", "qos_algorithm_params": {}, "device": "",
         "currently_attached": False}
    r.update(over)
    return r


def _fails(code, fn, *args):
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    assert e.value.details[0] == code, e.value.details
    return e.value.details


def test_vm_snapshot_ignoring_every_disk_then_vbds_to_other_vdis(world, api):
    """VM.snapshot with every disk VDI ignored: a snapshot VM (Halted, is_a_snapshot,
    is_a_template, snapshot_of the VM, the VM's parent now the snapshot) with no disk VBD and
    the CD kept; VBD.create then gives it a disk VBD per VDI."""
    x = world.xapi
    iso = x.add_vdi(world.sr, type="user", read_only=True)
    vm, vdis = _vm(world, cd=iso)
    x.record("VM", vm)["other_config"]["k"] = "v"
    snap = api.VM.snapshot(vm, "s1", vdis)
    rec = api.VM.get_record(snap)
    assert rec["is_a_snapshot"] is True and rec["is_a_template"] is True
    assert rec["snapshot_of"] == vm and rec["power_state"] == "Halted"
    assert rec["name_label"] == "s1" and rec["other_config"]["k"] == "v"
    assert rec["snapshot_time"] != "19700101T00:00:00Z"
    assert rec["snapshot_info"]["power-state-at-snapshot"] == "Running"
    assert api.VM.get_snapshots(vm) == [snap] and api.VM.get_parent(vm) == snap
    vbds = [api.VBD.get_record(v) for v in rec["VBDs"]]
    assert [(v["type"], v["VDI"], v["userdevice"]) for v in vbds] == [("CD", iso, "3")]
    snaps_of = [x.add_vdi(world.sr, is_a_snapshot=True, snapshot_of=v) for v in vdis]
    for i, vdi in enumerate(snaps_of):
        api.VBD.create(_vbd(snap, vdi, str(i)))
    disks = {api.VBD.get_userdevice(v): api.VBD.get_VDI(v) for v in api.VM.get_VBDs(snap)
             if api.VBD.get_type(v) == "Disk"}
    assert disks == {"0": snaps_of[0], "1": snaps_of[1]}
    assert [snap] == [r for r, v in api.VM.get_all_records_where(
        'field "is_a_snapshot" = "true"').items()]


def test_vm_snapshot_of_a_disk_not_ignored_is_sms_work(world, api):
    """A disk not ignored goes to VDI.snapshot first (the SR's SM driver, none here): a
    backend failure, and no record made."""
    x = world.xapi
    vm, vdis = _vm(world)
    before = {c: dict(t) for c, t in x.objects.items() if c in ("VM", "VBD", "VDI")}
    details = _fails("SR_BACKEND_FAILURE_82", api.VM.snapshot, vm, "s1", vdis[:1])
    assert "no SM driver" in details[2]
    assert {c: dict(x.objects[c]) for c in before} == before
    _fails("SR_BACKEND_FAILURE_82", api.VM.snapshot, vm, "s1")     # ignore_vdis defaults []


def test_vm_snapshot_refusals(world, api):
    vm, vdis = _vm(world)
    snap = api.VM.snapshot(vm, "s1", vdis)
    _fails("VM_IS_SNAPSHOT", api.VM.snapshot, snap, "s2", [])
    _fails("HANDLE_INVALID", api.VM.snapshot, NULL_REF, "s2", [])


def test_vbd_create_checks(world, api):
    x = world.xapi
    vm, vdis = _vm(world)
    snap = api.VM.snapshot(vm, "s1", vdis)
    ro = x.add_vdi(world.sr, read_only=True)
    iso = x.add_vdi(world.sr, type="iso")
    _fails("VDI_READONLY", api.VBD.create, _vbd(snap, ro, "0"))
    _fails("VDI_INCOMPATIBLE_TYPE", api.VBD.create, _vbd(snap, iso, "0"))
    _fails("VBD_CDS_MUST_BE_READONLY", api.VBD.create, _vbd(snap, ro, "0", type="CD"))
    _fails("VBD_NOT_REMOVABLE_MEDIA", api.VBD.create, _vbd(snap, NULL_REF, "0", empty=True))
    _fails("INVALID_DEVICE", api.VBD.create, _vbd(snap, vdis[0], "xyz"))
    _fails("HANDLE_INVALID", api.VBD.create, _vbd(snap, "OpaqueRef:nope", "0"))
    vbd = api.VBD.create(_vbd(snap, ro, "0", mode="RO", device="xvda",
                              currently_attached=True))
    rec = api.VBD.get_record(vbd)
    assert rec["device"] == "" and rec["currently_attached"] is False   # not suspended
    _fails("DEVICE_ALREADY_EXISTS", api.VBD.create, _vbd(snap, vdis[0], "0"))
    assert api.VDI.get_VBDs(ro) == [vbd]


def test_vm_destroy_of_a_snapshot_keeps_the_vdis(world, api):
    """VM.destroy of one of two snapshots: its VBDs go, every VDI stays, the other snapshot
    keeps its VBDs, the VM's parent chain skips it; a running VM is refused."""
    x = world.xapi
    vm, vdis = _vm(world, ndisks=1)
    faces = [x.add_vdi(world.sr, is_a_snapshot=True, snapshot_of=vdis[0]) for _ in range(2)]
    s1 = api.VM.snapshot(vm, "s1", vdis)
    api.VBD.create(_vbd(s1, faces[0], "0"))
    s2 = api.VM.snapshot(vm, "s2", vdis)
    v2 = api.VBD.create(_vbd(s2, faces[1], "0"))
    assert api.VM.get_parent(vm) == s2 and api.VM.get_parent(s2) == s1
    n_vdis = len(x.objects["VDI"])
    api.VM.destroy(s2)
    assert len(x.objects["VDI"]) == n_vdis
    assert api.VDI.get_VBDs(faces[1]) == [] and len(api.VDI.get_VBDs(faces[0])) == 1
    assert api.VM.get_parent(vm) == s1 and api.VM.get_children(s1) == [vm]
    assert api.VM.get_snapshots(vm) == [s1]
    assert v2 not in x.objects["VBD"]
    _fails("HANDLE_INVALID", api.VM.get_record, s2)
    _fails("VM_BAD_POWER_STATE", api.VM.destroy, vm)
