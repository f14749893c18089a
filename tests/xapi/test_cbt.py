"""Changed-block tracking kept across livesnap's operations as SM keeps it (issue 13 item 6;
XEN-NOTES.md §7b; livesnap/datapaths/cbt_logs.py): a running disk whose real tapdisk has its
CBT log open (``tap-ctl create -C``, as SM attaches a VDI with CBT on); after livesnap's
snapshots the changed blocks that XAPI's ``VDI.list_changed_blocks`` would report (SM's loop
over the logs, testxen/cbt.py, with the real cbt-util) are exactly the blocks written between
the two VDIs; after livesnap's deletes (each with pauses of the running leaf) the logs are
linked as SM's ``VDI.delete`` leaves them and the leaf's log still records every write."""
import os
import shutil
import subprocess
import xmlrpc.client

import pytest

from conftest_paths import PLUGIN
from livesnap import vhd
from livesnap.platforms.xapi import image_uuid
from livesnap.tools import lvm, tap_ctl
from testxen import blktap, cbt, nbd

KiB = 1024


@pytest.fixture(params=["ext", "lvm"])
def sr_of(request, world):
    if request.param == "ext":
        return world.sr
    world.lvm_vg = request.getfixturevalue("lvm_vg")
    return world.add_lvm_sr(world.lvm_vg)


def _start_tracked(world, ndisks=1, sr=None):
    """A VM with CBT on for each disk (log made and activated as SM does: a file, or on LVHD
    an LV of 4 MiB tagged ``cbtlog``), each disk served by a real tapdisk with its log (no
    guest: the test writes the blocks itself)."""
    vm = world.add_vm(ndisks=ndisks, sr=sr)
    x = world.xapi
    disks = {}
    for t, path in sorted(vm.paths.items()):
        u = image_uuid(path)
        ref, = [r for r, rec in x.objects["VDI"].items() if rec["uuid"] == u]
        log = cbt.log_path(os.path.dirname(path), u)
        if lvm.split_path(log):
            lvm.lvcreate(lvm.split_path(log)[0], lvm.split_path(log)[1], 4 << 20, tag="cbtlog")
        cbt.enable(log, int(x.record("VDI", ref)["virtual_size"]))
        x.record("VDI", ref)["cbt_enabled"] = True
        cbt.activate(log)
        pid, minor = world.tapdisks.create(path, guest=False, cbtlog=log)
        vm.tapdisks[t] = tap_ctl.get(pid, minor)
        disks[t] = (u, ref, log)
    x.record("VM", vm.ref)["power_state"] = "Running"
    x.record("VM", vm.ref)["resident_on"] = x.host
    return vm, disks


def _write(td, blocks, pattern):
    """One 4 KiB write inside each 64 KiB block of ``blocks``, through the running tapdisk."""
    with nbd.Client(blktap.nbd_socket(td.pid, td.minor), timeout=60) as c:
        for b in sorted(blocks):
            c.write(b * cbt.BLOCK + 8 * KiB, bytes([pattern]) * (4 * KiB))


def _snapshot_vdi(world, leaf_ref, name):
    """The uuid of the VDI livesnap's snapshot ``name`` made of the disk ``leaf_ref``."""
    x = world.xapi
    found = [rec["uuid"] for rec in x.objects["VDI"].values()
             if rec.get("is_a_snapshot") and rec.get("snapshot_of") == leaf_ref
             and rec.get("other_config", {}).get("livesnap_snapshot") == name]
    assert len(found) == 1, found
    return found[0]


def _record(world, vdi_uuid):
    rec, = [rec for rec in world.xapi.objects["VDI"].values() if rec["uuid"] == vdi_uuid]
    return rec


def _log_lvs(log):
    """{LV name: tags} of the CBT logs' LVs in ``log``'s VG (LVM's own report), or None for a
    file log."""
    vg_lv = lvm.split_path(log)
    if vg_lv is None:
        return None
    out = subprocess.run([os.environ["LVM"], "lvs", "--noheadings", "-o", "lv_name,lv_tags",
                          vg_lv[0]], stdout=subprocess.PIPE, universal_newlines=True,
                         check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {r[0]: (r[1] if len(r) > 1 else "") for r in rows if "cbtlog" in r[0]}


def _stop(world, vm, disks):
    for t, td in vm.tapdisks.items():
        rc, out, err = world.tapdisks.destroy(td.pid, td.minor)
        assert rc == 0, err
        cbt.deactivate(disks[t][2])
        if lvm.split_path(disks[t][2]):                  # SM's deactivate: the LV too
            lvm.activate(*lvm.split_path(disks[t][2]), active=False)
        assert blktap.check(vm.paths[t]) == []
    vm.tapdisks = {}
    world.xapi.record("VM", vm.ref)["power_state"] = "Halted"


def test_snapshots_and_deletes_keep_the_changed_blocks(world, sr_of):
    vm, disks = _start_tracked(world, sr=sr_of)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    td = vm.tapdisks["xvda"]
    w1, w2, w3, w4, w5 = {1, 5, 40}, {5, 7, 100}, {2, 7, 64}, {3, 90}, {11, 127}

    _write(td, w1, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    s1 = _snapshot_vdi(world, ref, "s1")
    # SM's _cbt_snapshot: the leaf's log became the snapshot's, closed and consistent; the
    # leaf has a new log that follows it, open (not consistent)
    assert cbt.blocks(cbt.log_path(sr_dir, s1)) == w1
    assert cbt.header(cbt.log_path(sr_dir, s1)) == {"parent": cbt.NULL, "child": u,
                                                    "consistent": True, "size": 8 << 20}
    assert cbt.header(leaf_log) == {"parent": s1, "child": cbt.NULL, "consistent": False,
                                    "size": 8 << 20}
    assert _record(world, s1)["cbt_enabled"] is True        # as SM introduces it
    assert not [n for n in os.listdir(sr_dir) if "livesnap-new" in n]

    _write(td, w2, 2)                       # after the snapshot's unpause: tracked
    assert cbt.changed_blocks(sr_dir, s1, u) == w2

    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    s2 = _snapshot_vdi(world, ref, "s2")
    _write(td, w3, 3)
    assert cbt.changed_blocks(sr_dir, s1, s2) == w2
    assert cbt.changed_blocks(sr_dir, s2, u) == w3
    assert cbt.changed_blocks(sr_dir, s1, u) == w2 | w3
    assert cbt.header(cbt.log_path(sr_dir, s1))["child"] == s2

    # delete s1: its log ORed into its child's (s2's, closed), s2 now first in the chain
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert r["action"] == "merged", r
    assert not os.path.exists(cbt.log_path(sr_dir, s1))
    assert cbt.header(cbt.log_path(sr_dir, s2))["parent"] == cbt.NULL
    assert cbt.blocks(cbt.log_path(sr_dir, s2)) == w1 | w2
    _write(td, w4, 4)                       # after the merge's pauses: still tracked
    assert cbt.changed_blocks(sr_dir, s2, u) == w3 | w4
    # LVHD: every log an LV tagged as SM tags them (its scan finds logs by the tag)
    assert _log_lvs(leaf_log) in (None, {u + ".cbtlog": "cbtlog", s2 + ".cbtlog": "cbtlog"})

    # delete s2: its log ORed into the running leaf's (paused around it, a pause reported as
    # the remove's), the base folded into the leaf with more pauses; the leaf's log keeps
    # recording
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    assert [p["disk"] for p in r["pauses"] if p["step"] == "remove"] == ["xvda"], r["pauses"]
    assert not os.path.exists(cbt.log_path(sr_dir, s2))
    assert cbt.header(leaf_log) == {"parent": cbt.NULL, "child": cbt.NULL,
                                    "consistent": False, "size": 8 << 20}
    assert cbt.blocks(leaf_log) == w1 | w2 | w3 | w4
    _write(td, w5, 5)
    assert cbt.blocks(leaf_log) == w1 | w2 | w3 | w4 | w5
    assert sorted(n for n in os.listdir(sr_dir) if n.endswith(".cbtlog")) == [u + ".cbtlog"]

    # and a snapshot after all that still starts from here
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s3")
    s3 = _snapshot_vdi(world, ref, "s3")
    _write(td, {9}, 6)
    assert cbt.changed_blocks(sr_dir, s3, u) == {9}
    assert cbt.blocks(cbt.log_path(sr_dir, s3)) == w1 | w2 | w3 | w4 | w5
    _stop(world, vm, disks)


def test_two_disks_each_keep_their_own_log(world):
    """Both disks paused together for one snapshot: each unpause names its own disk's log."""
    vm, disks = _start_tracked(world, ndisks=2)
    sr_dir = os.path.dirname(disks["xvda"][2])
    _write(vm.tapdisks["xvda"], {1}, 1)
    _write(vm.tapdisks["xvdb"], {2}, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _write(vm.tapdisks["xvda"], {10}, 2)
    _write(vm.tapdisks["xvdb"], {20, 21}, 2)
    for t, (u, ref, log) in disks.items():
        s = _snapshot_vdi(world, ref, "s1")
        assert cbt.blocks(cbt.log_path(sr_dir, s)) == {"xvda": {1}, "xvdb": {2}}[t]
        assert cbt.changed_blocks(sr_dir, s, u) == {"xvda": {10}, "xvdb": {20, 21}}[t]
    _stop(world, vm, disks)


def test_a_halted_vm_keeps_its_logs_too(world, sr_of):
    """Offline (no tapdisk): the same logs, the leaf's new log consistent (closed), a
    delete merges the snapshot's log into the leaf's without a pause; on LVHD the logs'
    LVs, inactive as SM leaves a detached VDI's, are inactive again afterwards."""
    vm, disks = _start_tracked(world, ndisks=1, sr=sr_of)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    _write(vm.tapdisks["xvda"], {4}, 1)
    _stop(world, vm, disks)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    s1 = _snapshot_vdi(world, ref, "s1")
    lv = lvm.split_path(leaf_log)
    if lv:
        assert not os.path.exists(leaf_log)
        assert not os.path.exists(cbt.log_path(sr_dir, s1))
        assert sorted(n for n in world.lvm_vg.loops() if n.endswith("cbtlog")) == \
            sorted([u + ".cbtlog", s1 + ".cbtlog"])
        assert _record(world, s1)["cbt_enabled"] is True
    assert cbt.blocks(cbt.log_path(sr_dir, s1)) == {4}
    assert cbt.header(leaf_log) == {"parent": s1, "child": cbt.NULL, "consistent": True,
                                    "size": 8 << 20}
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert not os.path.exists(cbt.log_path(sr_dir, s1))
    assert cbt.blocks(leaf_log) == {4}
    assert cbt.header(leaf_log)["parent"] == cbt.NULL


def test_killed_between_the_log_renames_recover_puts_the_new_log_in_place(world, sr_of):
    """Killed inside the snapshot's pause after the leaf's log became the snapshot's and
    before the new one is in place (the tapdisk left paused, its log closed): ``recover``
    finishes the snapshot, the unpause names the leaf's new log, and the logs are what an
    uninterrupted snapshot leaves."""
    vm, disks = _start_tracked(world, sr=sr_of)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    td = vm.tapdisks["xvda"]
    _write(td, {1}, 1)
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps(
        (world.session, {"vm_uuid": vm.uuid, "name": "s1"}), methodname="snapshot_create")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        env=world.env(LIVESNAP_FAULT="cbt:renamed:0"), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert not os.path.exists(leaf_log)                 # killed between the renames
    assert tap_ctl.get(td.pid, td.minor).state & tap_ctl.PAUSED
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["op"] == "create", r
    assert not tap_ctl.get(td.pid, td.minor).state & tap_ctl.PAUSED
    s1 = _snapshot_vdi(world, ref, "s1")
    assert cbt.blocks(cbt.log_path(sr_dir, s1)) == {1}
    assert cbt.header(cbt.log_path(sr_dir, s1)) == {"parent": cbt.NULL, "child": u,
                                                    "consistent": True, "size": 8 << 20}
    assert cbt.header(leaf_log) == {"parent": s1, "child": cbt.NULL, "consistent": False,
                                    "size": 8 << 20}
    _write(td, {2}, 2)
    assert cbt.changed_blocks(sr_dir, s1, u) == {2}
    assert not [n for n in os.listdir(sr_dir) if "livesnap-new" in n]
    _stop(world, vm, disks)


# -- against SM's own CBT code ---------------------------------------------------------------

@pytest.fixture
def sm(world):
    from testxen import sm as smmod
    return smmod.Sm(smmod.unpack(), blktap.vhd_util_bin(), world.xapi, world.socket,
                    os.path.join(world.base, "sm"), lock_dir=world.sm_lock_dir)


def _logs(d):
    """{file name: (header, blocks)} of the CBT logs in ``d`` (headers compared by field:
    cbt-util leaves the header's padding uninitialised)."""
    return {n: (cbt.header(os.path.join(d, n)), cbt.blocks(os.path.join(d, n)))
            for n in sorted(os.listdir(d)) if n.endswith(".cbtlog")}


def _copy_logs(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    for n in os.listdir(src):
        if n.endswith(".cbtlog"):
            shutil.copy2(os.path.join(src, n), os.path.join(dst, n))


def test_the_logs_are_what_sms_own_code_leaves(world, sm):
    """Before each livesnap operation on the running disk the logs are copied; SM's own
    ``_cbt_snapshot`` / ``VDI.delete`` (its code, the real cbt-util) then runs on the copy
    for the same VDIs: afterwards both directories hold the same logs, field by field and
    bit by bit (and SM, too, pauses the running leaf for the delete whose log merges into
    the leaf's)."""
    vm, disks = _start_tracked(world)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    sm_dir = os.path.join(world.base, "sm-logs")
    td = vm.tapdisks["xvda"]

    def as_sm(op, vdi, **kw):
        return sm.cbt(world.sr, op, sm_dir, vdi, blktap.cbt_util_bin(), size=8 << 20, **kw)

    _write(td, {1, 5}, 1)
    for name, writes in (("s1", {7}), ("s2", {9, 5})):
        _copy_logs(sr_dir, sm_dir)
        world.ok("snapshot_create", vm_uuid=vm.uuid, name=name)
        s = _snapshot_vdi(world, ref, name)
        as_sm("snapshot", u, snapshot_uuid=s, consistent=False)     # attached: not consistent
        assert _logs(sr_dir) == _logs(sm_dir), name
        _write(td, writes, 2)
    s1, s2 = _snapshot_vdi(world, ref, "s1"), _snapshot_vdi(world, ref, "s2")
    _copy_logs(sr_dir, sm_dir)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert as_sm("delete", s1) == {"paused": []}                 # s2's log is closed
    assert _logs(sr_dir) == _logs(sm_dir)
    _copy_logs(sr_dir, sm_dir)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    assert as_sm("delete", s2) == {"paused": [u]}                # the leaf's log is open
    assert _logs(sr_dir) == _logs(sm_dir)
    _stop(world, vm, disks)


def test_a_snapshot_whose_pause_fails_leaves_the_logs_as_they_were(world):
    """tap-ctl's pause fails (a wrapper that refuses ``pause``): the snapshot is rolled back
    before anything took effect, and the leaf's next log, made before the pause, is gone; the
    leaf's log is untouched and still records; the next snapshot works."""
    vm, disks = _start_tracked(world)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    td = vm.tapdisks["xvda"]
    _write(td, {3}, 1)
    before = _logs(sr_dir)
    wrapper = os.path.join(world.base, "tap-ctl-no-pause")
    with open(wrapper, "w") as f:
        f.write('#!/bin/sh\n[ "$1" = pause ] && { echo refused >&2; exit 5; }\nexec %s "$@"\n'
                % blktap.tap_ctl_bin())
    os.chmod(wrapper, 0o755)
    reply = world.run_plugin("snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"},
                             TAP_CTL=wrapper)
    assert reply["Status"] == "Failure", reply
    assert _logs(sr_dir) == before
    assert not [n for n in os.listdir(sr_dir) if "livesnap-new" in n]
    _write(td, {4}, 2)
    assert cbt.blocks(leaf_log) == {3, 4}
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    assert cbt.blocks(cbt.log_path(sr_dir, _snapshot_vdi(world, ref, "s1"))) == {3, 4}
    _stop(world, vm, disks)


def test_sms_gc_leaf_coalesce_keeps_the_log_too(world, sm):
    """The control: SM's own GC leaf-coalesces a running tracked leaf (its pauses through the
    tapdisk-pause plugin, which names the log at the unpause as SM's does): the same tapdisk
    records the writes after it, as after livesnap's fold."""
    from testxen import sm as smmod
    from testxen import sm_hosts
    x = world.xapi
    tools = smmod.Blktap(blktap.prefix())
    ref, bases = smmod.file_layout(x, world.sr, tools, 8 << 20, [[(0, 1 << 20, 0x11)]],
                                   [(3 << 20, 1 << 20, 0x77)])
    path = x.vdi_path(ref)
    u = x.record("VDI", ref)["uuid"]
    log = cbt.log_path(os.path.dirname(path), u)
    cbt.enable(log, 8 << 20)
    cbt.activate(log)
    x.record("VDI", ref)["cbt_enabled"] = True
    sm_hosts.master(x, sm).plug(ref, path)          # attached here: SM's own plugin pauses
    pid, minor = world.tapdisks.create(path, guest=False, cbtlog=log)
    td = tap_ctl.get(pid, minor)
    _write(td, {2}, 1)
    after = sm.gc(world.sr)
    assert list(after["vdis"]) == [u], after
    assert "Calling tap-unpause on host" in sm.log()
    assert "Calling tap unpause with minor %d" % minor in sm.log()     # SM's own plugin
    _write(td, {5}, 2)
    assert cbt.blocks(log) == {2, 5}


# -- revert: what XAPI's VM.revert leaves (SM's VDI.delete of the old VDI, VDI.clone of the
# snapshot's, which makes no log) -----------------------------------------------------------

def _activate_all(world, log):
    """LVHD: every LV of the SR active, to be read (a halted VM's are left inactive)."""
    vg_lv = lvm.split_path(log)
    if vg_lv:
        for name in world.lvm_vg.loops():
            lvm.activate(vg_lv[0], name)


def _log_names(log):
    d = os.path.dirname(log)
    lvs = _log_lvs(log)
    return sorted(lvs) if lvs is not None else sorted(n for n in os.listdir(d)
                                                      if n.endswith(".cbtlog"))


def _logs_of(log):
    """{log name: (header, blocks)} of the SR of ``log`` (files, or LVs read as SM's cbt-util
    reads them)."""
    d = os.path.dirname(log)
    return {n: (cbt.header(os.path.join(d, n)), cbt.blocks(os.path.join(d, n)))
            for n in _log_names(log)}


def _copy_logs_of(log, dst):
    """The SR's logs (files or LVs' bytes) copied as files into ``dst``, for SM's code."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    d = os.path.dirname(log)
    for n in _log_names(log):
        cbt.header(os.path.join(d, n))                      # an inactive LV: activated
        with open(os.path.join(d, n), "rb") as f, open(os.path.join(dst, n), "wb") as g:
            g.write(f.read())           # an LV: 4 MiB, the log at its start (cbt-util reads
                                        # the header, then the bitmap it sizes)


def _differing_blocks(a, b):
    """The 64 KiB blocks whose contents differ between the two chains (the real tapdisk
    reads them)."""
    da, db = blktap.read(a), blktap.read(b)
    assert len(da) == len(db)
    return {i // cbt.BLOCK for i in range(0, len(da), cbt.BLOCK)
            if da[i:i + cbt.BLOCK] != db[i:i + cbt.BLOCK]}


def _vdi_ref(world, u):
    ref, = [r for r, rec in world.xapi.objects["VDI"].items() if rec["uuid"] == u]
    return ref


@pytest.mark.parametrize("face_data", [False, True], ids=["empty-face", "face-with-data"])
def test_revert_leaves_the_logs_as_xapis_revert(world, sr_of, sm, face_data):
    """Halted revert of a tracked disk to s1 (s2 after it), the snapshot's own image empty
    (the new leaf on its base copy) or written to (SM's clone of it first): the logs are
    those SM's own code leaves, on a copy, for XAPI's ``VM.revert`` (``VDI.delete`` of the
    VM's VDI, then ``clone`` of the snapshot's, which SM makes without a ``cbtlog``): the
    leaf's log is gone, s2's log ends the chain, s1's and s2's logs are as they were; the
    VDI's ``cbt_enabled`` is off, the snapshots' on. A backup tool's changed blocks from a
    snapshot to the disk are then no answer at all (SM: unrelated, so a full backup), never
    too few; after CBT is turned on again (``VDI.enable_cbt``) a new snapshot starts a new
    chain whose changed blocks cover every block that differs."""
    vm, disks = _start_tracked(world, sr=sr_of)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    sm_dir = os.path.join(world.base, "sm-logs")
    lvhd = bool(lvm.split_path(leaf_log))
    td = vm.tapdisks["xvda"]
    w1, w2, w3 = {1, 5}, {5, 9}, {2, 9, 30}
    _write(td, w1, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _write(td, w2, 2)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    _write(td, w3, 3)
    _stop(world, vm, disks)
    s1, s2 = _snapshot_vdi(world, ref, "s1"), _snapshot_vdi(world, ref, "s2")
    _activate_all(world, leaf_log)
    if face_data:
        blktap.write(world.xapi.vdi_path(_vdi_ref(world, s1)), 40 * cbt.BLOCK, b"\x44" * 4096)
    s1_path = world.xapi.vdi_path(_vdi_ref(world, s1))
    s1_bytes, s1_parent = blktap.read(s1_path), vhd.parent_of(s1_path)
    before = _logs_of(leaf_log)
    _copy_logs_of(leaf_log, sm_dir)

    r = world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1")
    assert r["snapshot"] == "s1", r
    _activate_all(world, leaf_log)
    # SM's clone of the snapshot's VDI when its image holds data (a new base copy under it)
    assert (vhd.parent_of(s1_path) != s1_parent) == face_data

    # SM's own code on the copy: VDI.delete of the old VDI, clone of the snapshot's
    def as_sm(op, vdi):
        return sm.cbt(world.sr, op, sm_dir, vdi, blktap.cbt_util_bin(), size=8 << 20,
                      lvhd=lvhd)
    assert as_sm("delete", u) == {"paused": []}
    cloned = as_sm("clone", s1)
    assert [c["cbtlog"] for c in cloned["snapshot_calls"]] == [None], cloned
    after = _logs_of(leaf_log)
    assert after == _logs(sm_dir)
    # field by field, what that is
    assert u + ".cbtlog" not in after
    assert after[s1 + ".cbtlog"] == before[s1 + ".cbtlog"]
    h2, b2 = after[s2 + ".cbtlog"]
    assert h2 == dict(before[s2 + ".cbtlog"][0], child=cbt.NULL) and b2 == w2
    assert sorted(after) == sorted([s1 + ".cbtlog", s2 + ".cbtlog"])
    if lvhd:
        assert _log_lvs(leaf_log) == {s1 + ".cbtlog": "cbtlog", s2 + ".cbtlog": "cbtlog"}
    assert _record(world, u)["cbt_enabled"] is False
    assert _record(world, s1)["cbt_enabled"] is True and _record(world, s2)["cbt_enabled"]

    # the disk reads as s1; the snapshots' changed blocks are as before
    _activate_all(world, leaf_log)
    assert blktap.read(vm.paths["xvda"]) == s1_bytes
    assert cbt.changed_blocks(sr_dir, s1, s2) == w2
    for s in (s1, s2):
        with pytest.raises(cbt.Unrelated):
            cbt.changed_blocks(sr_dir, s, u)

    # the backup tool turns CBT on again (SM's _create_cbt_log) and takes its next delta
    if lvhd:
        vg, _ = lvm.split_path(leaf_log)
        lvm.lvcreate(vg, u + ".cbtlog", 4 << 20, tag="cbtlog")
    cbt.enable(leaf_log, 8 << 20)
    world.xapi.record("VDI", ref)["cbt_enabled"] = True
    cbt.activate(leaf_log)
    pid, minor = world.tapdisks.create(vm.paths["xvda"], guest=False, cbtlog=leaf_log)
    vm.tapdisks["xvda"] = td = tap_ctl.get(pid, minor)
    world.xapi.record("VM", vm.ref)["power_state"] = "Running"
    _write(td, {3}, 5)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s3")
    s3 = _snapshot_vdi(world, ref, "s3")
    _write(td, {4, 40}, 6)
    changed = cbt.changed_blocks(sr_dir, s3, u)
    assert changed == {4, 40}
    with pytest.raises(cbt.Unrelated):
        cbt.changed_blocks(sr_dir, s2, s3)
    _stop(world, vm, disks)
    _activate_all(world, leaf_log)
    s3_path = world.xapi.vdi_path(_vdi_ref(world, s3))
    assert _differing_blocks(s3_path, vm.paths["xvda"]) <= changed
    assert _differing_blocks(world.xapi.vdi_path(_vdi_ref(world, s1)), s3_path) <= \
        cbt.blocks(cbt.log_path(sr_dir, s3))


def test_revert_keeping_the_current_state_keeps_its_log(world, sr_of, sm):
    """``--keep-current k``: XAPI's ``VM.snapshot`` (k) then ``VM.revert`` (s1). SM's own
    code on a copy (``_cbt_snapshot`` of the detached disk: consistent; ``VDI.delete`` of
    the VM's VDI; clone of s1's) leaves the same logs: the leaf's log became k's, closed,
    after s1's in the chain; the reverted disk has none. The changed blocks from s1 to k
    are the blocks written since s1, and cover every block that differs."""
    vm, disks = _start_tracked(world, sr=sr_of)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    sm_dir = os.path.join(world.base, "sm-logs")
    lvhd = bool(lvm.split_path(leaf_log))
    td = vm.tapdisks["xvda"]
    _write(td, {1, 5}, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _write(td, {5, 6, 77}, 2)
    _stop(world, vm, disks)
    s1 = _snapshot_vdi(world, ref, "s1")
    before = _logs_of(leaf_log)
    _copy_logs_of(leaf_log, sm_dir)

    r = world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1", keep_current="k")
    assert r["kept"] == "k", r
    k = _snapshot_vdi(world, ref, "k")

    def as_sm(op, vdi, **kw):
        return sm.cbt(world.sr, op, sm_dir, vdi, blktap.cbt_util_bin(), size=8 << 20,
                      lvhd=lvhd, **kw)
    as_sm("snapshot", u, snapshot_uuid=k, consistent=True)          # VM.snapshot, halted
    assert as_sm("delete", u) == {"paused": []}                      # VM.revert
    assert [c["cbtlog"] for c in as_sm("clone", s1)["snapshot_calls"]] == [None]
    after = _logs_of(leaf_log)
    assert after == _logs(sm_dir)
    assert sorted(after) == sorted([s1 + ".cbtlog", k + ".cbtlog"])
    assert after[k + ".cbtlog"] == (dict(before[u + ".cbtlog"][0], consistent=True),
                                    {5, 6, 77})
    assert after[s1 + ".cbtlog"][0]["child"] == k
    if lvhd:
        assert _log_lvs(leaf_log) == {s1 + ".cbtlog": "cbtlog", k + ".cbtlog": "cbtlog"}
    assert _record(world, u)["cbt_enabled"] is False
    assert _record(world, k)["cbt_enabled"] is True
    changed = cbt.changed_blocks(sr_dir, s1, k)
    assert changed == {5, 6, 77}
    _activate_all(world, leaf_log)
    assert _differing_blocks(world.xapi.vdi_path(_vdi_ref(world, s1)),
                             world.xapi.vdi_path(_vdi_ref(world, k))) <= changed
    with pytest.raises(cbt.Unrelated):
        cbt.changed_blocks(sr_dir, k, u)


def test_revert_killed_between_the_image_and_its_log_recover_drops_the_log(world, sr_of):
    """Killed after the old leaf's image was removed and before its log was dropped (fault
    point ``remove:unlinked:0``): ``recover`` finishes the revert and the logs, the record
    and the disk are what an uninterrupted revert leaves."""
    vm, disks = _start_tracked(world, sr=sr_of)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    _write(vm.tapdisks["xvda"], {1}, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _write(vm.tapdisks["xvda"], {2}, 2)
    _stop(world, vm, disks)
    s1 = _snapshot_vdi(world, ref, "s1")
    before = _logs_of(leaf_log)
    _activate_all(world, leaf_log)
    s1_bytes = blktap.read(world.xapi.vdi_path(_vdi_ref(world, s1)))
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps(
        (world.session, {"vm_uuid": vm.uuid, "name": "s1"}), methodname="snapshot_revert")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        env=world.env(LIVESNAP_FAULT="remove:unlinked:0"), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stderr)
    assert u + ".cbtlog" in _log_names(leaf_log)          # killed before the drop
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["op"] == "revert", r
    after = _logs_of(leaf_log)
    assert sorted(after) == [s1 + ".cbtlog"]
    assert after[s1 + ".cbtlog"] == (dict(before[s1 + ".cbtlog"][0], child=cbt.NULL), {1})
    assert _record(world, u)["cbt_enabled"] is False
    _activate_all(world, leaf_log)
    assert blktap.read(vm.paths["xvda"]) == s1_bytes


def test_revert_of_two_disks_one_tracked(world):
    """Two disks, CBT turned off on one before the snapshot (SM's disable: its log removed,
    ``cbt_enabled`` off): the revert drops the tracked disk's log only and turns off only its
    record's ``cbt_enabled``; the other disk's record is left as it was."""
    vm, disks = _start_tracked(world, ndisks=2)
    sr_dir = os.path.dirname(disks["xvda"][2])
    ub, refb, logb = disks["xvdb"]
    os.unlink(logb)                               # VDI.disable_cbt (no parent log yet)
    world.xapi.record("VDI", refb)["cbt_enabled"] = False
    _write(vm.tapdisks["xvda"], {1}, 1)
    _write(vm.tapdisks["xvdb"], {1}, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _write(vm.tapdisks["xvda"], {2}, 2)
    _write(vm.tapdisks["xvdb"], {3}, 2)
    for td in vm.tapdisks.values():
        rc, out, err = world.tapdisks.destroy(td.pid, td.minor)
        assert rc == 0, err
    vm.tapdisks = {}
    cbt.deactivate(disks["xvda"][2])
    world.xapi.record("VM", vm.ref)["power_state"] = "Halted"
    ua, refa, loga = disks["xvda"]
    sa = _snapshot_vdi(world, refa, "s1")
    sb = _snapshot_vdi(world, refb, "s1")
    world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1")
    assert _logs(sr_dir) == {sa + ".cbtlog": ({"parent": cbt.NULL, "child": cbt.NULL,
                                               "consistent": True, "size": 8 << 20}, {1})}
    assert _record(world, ua)["cbt_enabled"] is False
    assert _record(world, ub)["cbt_enabled"] is False
    assert _record(world, sa)["cbt_enabled"] is True
    assert _record(world, sb)["cbt_enabled"] is False
    for t in ("xvda", "xvdb"):
        s = _snapshot_vdi(world, disks[t][1], "s1")
        assert blktap.read(vm.paths[t]) == blktap.read(world.xapi.vdi_path(_vdi_ref(world, s)))
