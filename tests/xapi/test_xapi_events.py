"""A livesnap snapshot deleted outside livesnap, as ``xe vdi-destroy`` / ``xe
snapshot-uninstall`` / XenCenter delete it: ``VDI.destroy`` on the XAPI stand-in runs SM's
real driver ``vdi_delete`` (testxen/sm.py: the image unlinked or its LV removed, the record
forgotten, SM's GC kicked), and livesnap's follower (``livesnap xapi-follow``,
livesnap/platforms/xapi_follow.py) gives it livesnap's merge at once, with SM's GC held off
the SR by SM's own ``gc_active`` lock and abort flag. Then SM's real GC finds nothing to do,
and every guest write and every other snapshot's data is there (reads through the real
tapdisk). Also: SM's GC first (the catalog follows its leaf-coalesce), the follower started
after the delete, a VDI that is not livesnap's, a base copy left with two children."""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from testxen import blktap as txblktap
from testxen import sm as smmod
from testxen import sm_hosts
from testxen.world import ROOT

from test_sm_gc import (BIG, MiB, Scenario, _fold_sr, _fold_vm, _only_image,  # noqa: F401
                        blktap, sm, sm_tree)


def _face(world, name):
    """The VDI ref of snapshot ``name``'s face (other_config livesnap_snapshot)."""
    refs = [r for r, rec in world.xapi.objects["VDI"].items()
            if rec["other_config"].get("livesnap_snapshot") == name]
    assert len(refs) == 1, refs
    return refs[0]


def _xe(world):
    """A XenAPI session over xapi's socket, as ``xe`` opens one."""
    return world.xenapi_session("xe")


def _vdi_destroy(world, ref):
    """``xe vdi-destroy uuid=...``: VDI.destroy through xapi's API."""
    s = _xe(world)
    try:
        s.xenapi.VDI.destroy(ref)
    finally:
        s.xenapi.session.logout()


def _ipc_dir(sm):
    return os.path.join(sm.state, "ipc")


def _follow_argv(world, sm, *extra):
    return [sys.executable, "-m", "livesnap", "xapi-follow", "--xapi-socket", world.socket,
            "--sm-ipc-dir", _ipc_dir(sm)] + list(extra)


def _follow_once(world, sm):
    """``livesnap xapi-follow --once``: [one JSON line per VM acted on]."""
    p = subprocess.run(_follow_argv(world, sm, "--once"), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=world.env(),
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


@pytest.fixture
def sm_world(world, sm):
    """The world with SM behind SR.scan and VDI.destroy."""
    world.xapi.scanner = sm.scan
    world.xapi.vdi_destroyer = sm.destroyer()
    return world


def _check_sm_end_state(world, sm, sr, vm, disk, expected):
    """The VM stopped (every acknowledged guest write in its disk): one image at the disk's
    path holding the earlier data, SM finds nothing to coalesce, and a full GC pass changes
    nothing."""
    vm.stop()
    _only_image(world, sr, disk)
    assert txblktap.read(disk, 8 * MiB, 24 * MiB) == expected
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view
    after = sm.gc(sr)
    assert list(after["vdis"]) == [os.path.basename(disk)[:-len(".vhd")]
                                   if disk.endswith(".vhd") else
                                   os.path.basename(disk)[len("VHD-"):]], after
    _only_image(world, sr, disk)
    assert txblktap.read(disk, 8 * MiB, 24 * MiB) == expected


@pytest.mark.parametrize("kind", ["ext", "lvm"])
def test_xe_delete_then_follower_started_after_folds(request, sm_world, sm, kind):
    """The running VM's only snapshot deleted with ``xe vdi-destroy`` while no follower
    runs: SM unlinks (LVHD: removes) the face and kicks its GC. ``xapi-follow --once``
    (what the service does when it starts) finds the face gone from XAPI, holds SM's GC off
    and folds the base copy into the running leaf with livesnap's pauses."""
    world = sm_world
    sr = _fold_sr(request, world, sm, kind)
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    face = _face(world, "s1")
    face_path = world.xapi.vdi_path(face)
    vm.start()
    _vdi_destroy(world, face)
    assert world.xapi.vdi_destroyer is not None and sm.kicks == [sr]
    assert face not in world.xapi.objects["VDI"]
    if kind == "ext":
        assert not os.path.exists(face_path)
    out, = _follow_once(world, sm)
    assert out["vm_uuid"] == vm.uuid and "error" not in out, out
    r = out["result"]
    merge, = r["merges"]
    assert merge["method"] == "fold" and r["datapath"] == "tapdisk", r
    assert r["followed_sm"]["deleted"] == ["s1"] and r["followed_sm"]["merged"] == [], r
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    assert _follow_once(world, sm) == []              # nothing left to follow
    _check_sm_end_state(world, sm, sr, vm, disk, expected)


def test_xe_delete_followed_through_events(sm_world, sm):
    """The follower running (``livesnap xapi-follow``, event.from on vdi and vm): the
    snapshot's VDI destroyed as xe destroys it is followed by the fold, reported on the
    follower's stdout; SM's GC then has nothing to do."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    vm, disk = _fold_vm(world, bt, world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    p = subprocess.Popen(_follow_argv(world, sm), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, env=world.env(),
                         cwd=ROOT)
    try:
        # the follower has its token once it has called event.from
        _wait(lambda: any(m == "event.from" for m, _ in world.xapi.calls), p)
        assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] != []
        _vdi_destroy(world, _face(world, "s1"))
        line = _readline(p)
        out = json.loads(line)
        assert out["vm_uuid"] == vm.uuid and "error" not in out, (out, _stderr(p))
        assert out["result"]["merges"][0]["method"] == "fold", out
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


def _wait(cond, p, limit=120.0):
    """Until ``cond()``; fails if the follower ``p`` exits first, or after ``limit``
    seconds (a hang, not a timing check)."""
    end = time.monotonic() + limit
    while not cond():
        assert p.poll() is None, ("the follower exited", p.returncode, _stderr(p))
        assert time.monotonic() < end, "the follower did not call event.from"
        time.sleep(0.05)


def _readline(p, limit=300.0):
    ready, _, _ = select.select([p.stdout], [], [], limit)
    assert ready, ("no report from the follower", _stderr(p))
    line = p.stdout.readline()
    assert line, ("the follower exited", p.poll(), _stderr(p))
    return line


def _stderr(p):
    if p.poll() is None:
        return "(running)"
    return p.stderr.read()


@pytest.mark.parametrize("kind", ["ext", "lvm"])
def test_sms_gc_first_then_follower_follows(request, sm_world, sm, kind):
    """The race the other way: SM's GC, kicked by the delete, runs before livesnap (here to
    its end: an online leaf-coalesce through SM's tapdisk-pause plugin). The follower then
    re-reads the images under SM's SR lock and its catalog follows what SM did (the face
    deleted, the base copy merged away into the leaf): nothing left to merge, no snapshot
    listed, the data intact."""
    world = sm_world
    x = world.xapi
    bt = smmod.Blktap(txblktap.prefix())
    # a leaf small enough for SM's live leaf-coalesce (LIVE_LEAF_COALESCE_MAX_SIZE, 20 MiB;
    # a bigger one SM first snapshots, VDI.snapshot, which the stand-in has no driver for)
    sr = _fold_sr(request, world, sm, kind)
    vm = world.add_vm(ndisks=1, sr=sr, size=BIG)
    disk = vm.paths["xvda"]
    bt.write(disk, 8 * MiB, 8 * MiB, 0x31)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    bt.write(disk, 12 * MiB, 4 * MiB, 0x32)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    leaf_ref, = [r for r, rec in x.objects["VDI"].items()
                 if x.vdi_path(r) == disk]
    sm_hosts.master(x, sm).plug(leaf_ref, disk)   # attached here: SM's own tapdisk-pause
    vm.start()
    _vdi_destroy(world, _face(world, "s1"))
    sm.gc(sr)                                             # SM's GC wins the race
    assert "Calling tap-pause on host" in sm.log()
    assert "Calling tap unpause with minor" in sm.log()  # SM's own plugin found the tapdisk
    if kind == "lvm":
        # the stand-in's attach keeps no SM refcount (RefCounter "lvm-<sr>"), so SM's GC
        # deactivates the LV it renamed to the leaf's name; on a host the attached VDI's
        # refcount keeps it active
        sc = Scenario.__new__(Scenario)
        sc.world, sc.sr = world, sr
        sc.activate()
    out, = _follow_once(world, sm)
    assert "error" not in out, out
    r = out["result"]
    assert r["followed_sm"]["deleted"] == ["s1"] and len(r["followed_sm"]["merged"]) == 1, r
    assert "merges" not in r or r["merges"] == [], r
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    check = world.ok("check", vm_uuid=vm.uuid)
    assert check["ok"], check
    _check_sm_end_state(world, sm, sr, vm, disk, expected)


def test_vdi_not_livesnaps_is_ignored(sm_world, sm):
    """A VDI no livesnap catalog knows, destroyed with xe (SM deletes it): the follower
    does nothing; the livesnap VM's snapshot stays as it was."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    vm, disk = _fold_vm(world, bt, world.sr)
    other = world.add_vm("other", ndisks=1)
    ref, = [r for r, rec in world.xapi.objects["VDI"].items()
            if world.xapi.vdi_path(r) == other.paths["xvda"]]
    before = world.ok("snapshot_list", vm_uuid=vm.uuid)
    _vdi_destroy(world, ref)
    assert not os.path.exists(other.paths["xvda"])
    assert _follow_once(world, sm) == []
    assert world.ok("snapshot_list", vm_uuid=vm.uuid) == before
    assert world.ok("check", vm_uuid=vm.uuid)["ok"]


def test_two_children_stay_hidden_until_one(sm_world, sm):
    """s1, then a revert to s1 keeping the current state as k1 (VM halted): s1's base copy
    has three children (s1's face, k1, the new leaf). s1 destroyed with xe: the follower
    forgets s1, the base stays hidden with two children, SM's GC finds nothing to merge and
    k1 reads as before. k1 destroyed with xe: the base, down to one child, is merged into
    the leaf at once."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    sc = Scenario(world, bt, sm, world.sr)
    sc.write()
    sc.create("s1")
    sc.write()
    world.ok("snapshot_revert", vm_uuid=sc.vm.uuid, name="s1", keep_current="k1")
    k1 = bt.read(sc.images()["k1"])
    disk_before = bt.read(sc.disk)
    _vdi_destroy(world, _face(world, "s1"))
    out, = _follow_once(world, sm)
    assert "error" not in out and out["result"]["followed_sm"]["deleted"] == ["s1"], out
    assert not out["result"].get("merges"), out
    listing = world.ok("snapshot_list", vm_uuid=sc.vm.uuid)
    assert [s["name"] for s in listing["snapshots"]] == ["k1"], listing
    view = sm.classify(world.sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == [], view
    sm.gc(world.sr)
    assert bt.read(sc.images()["k1"]) == k1
    assert bt.read(sc.disk) == disk_before
    _vdi_destroy(world, _face(world, "k1"))
    out, = _follow_once(world, sm)
    assert "error" not in out and out["result"]["followed_sm"]["deleted"] == ["k1"], out
    assert [m["method"] for m in out["result"]["merges"]] == ["fold"], out
    assert world.ok("snapshot_list", vm_uuid=sc.vm.uuid)["snapshots"] == []
    assert sorted(world.xapi.sr_images(world.sr).values()) == [sc.disk]
    assert bt.read(sc.disk) == disk_before
    view = sm.classify(world.sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view


def test_gc_held_off_while_livesnap_holds_gc_active(sm_world, sm):
    """SM's GC kicked while livesnap holds the SR's ``gc_active`` (sm_gc.held_off) exits
    at once ("Another GC instance already active") and changes nothing; after the release
    it runs."""
    from livesnap.platforms import sm_gc
    world = sm_world
    ref, bases, before = _sm_layout_ref(world)
    sr_uuid = world.xapi.record("SR", world.sr)["uuid"]
    with sm_gc.held_off(sr_uuid, lock_dir=world.sm_lock_dir, ipc_dir=_ipc_dir(sm)) as held:
        assert held["aborted"] is False
        view = sm.gc(world.sr)
        assert "Another GC instance already active, exiting" in sm.log()
        assert sorted(view["vdis"]) == sorted(bases + [world.xapi.record("VDI", ref)["uuid"]])
    after = sm.gc(world.sr)
    assert list(after["vdis"]) == [world.xapi.record("VDI", ref)["uuid"]], after


def _sm_layout_ref(world):
    bt = smmod.Blktap(txblktap.prefix())
    ref, bases = smmod.file_layout(world.xapi, world.sr, bt, 4 * MiB,
                                   [[(0, MiB // 2, 0x11)]], [(3 * MiB, MiB, 0x77)])
    return ref, bases, bt.read(world.xapi.vdi_path(ref))


def test_running_gc_aborted_by_sms_abort_flag(sm_world, sm):
    """A GC in its quiet period (SM's ``_gcLoopPause``: 5 minutes after a kick, holding
    ``gc_active``) is asked to stop by the abort flag, as ``cleanup.py -a`` asks it: livesnap
    gets ``gc_active`` once the GC has let go, clears the flag, and the GC did nothing."""
    from livesnap.platforms import sm_gc
    world = sm_world
    ref, bases, before = _sm_layout_ref(world)
    sr_uuid = world.xapi.record("SR", world.sr)["uuid"]
    p = sm.start("gc-quiet", world.sr)
    try:
        end = time.monotonic() + 120
        while "GC active, about to go quiet" not in sm.log():
            assert p.poll() is None, (p.returncode, p.communicate(), sm.log()[-3000:])
            assert time.monotonic() < end, sm.log()[-3000:]
            time.sleep(0.05)
        with sm_gc.held_off(sr_uuid, lock_dir=world.sm_lock_dir, ipc_dir=_ipc_dir(sm),
                            timeout=120) as held:
            assert held["aborted"] is True
            assert not os.path.exists(os.path.join(_ipc_dir(sm), sr_uuid, "abort"))
            p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Aborted" in sm.log() or "abort" in sm.log().lower(), sm.log()[-3000:]
    view = sm.classify(world.sr)
    assert sorted(view["vdis"]) == sorted(bases + [world.xapi.record("VDI", ref)["uuid"]])



def test_livesnap_delete_after_xe_delete_merges_what_is_left(sm_world, sm):
    """``snapshot_delete`` (livesnap's own, the plugin) of a snapshot whose VDI was already
    deleted with xe: not "no such snapshot", but the merge SM's delete left to do, reported
    as deleted through XAPI."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    _vdi_destroy(world, _face(world, "s1"))
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert r["deleted_by"] == "xapi" and r["action"] == "merged", r
    assert [m["method"] for m in r["merges"]] == ["fold"], r
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    world.fail("snapshot_delete", {"vm_uuid": vm.uuid, "name": "s1"},
               "LIVESNAP_SNAPSHOT_NOT_FOUND")
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


def test_one_disk_of_two_deleted_with_xe(sm_world, sm):
    """A two-disk snapshot of which xe deletes one disk's VDI: that disk's base copy is
    folded into its leaf; the snapshot stays with its other disk, which reads as taken;
    SM's GC finds nothing to do."""
    world = sm_world
    bt = smmod.Blktap(txblktap.prefix())
    vm = world.add_vm(ndisks=2)
    for t, p in sorted(vm.paths.items()):
        bt.write(p, 0, MiB, 0x41 if t == "xvda" else 0x42)
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    images = {d["target"]: d["image"] for d in r["disks"]}
    taken = {t: bt.read(p) for t, p in images.items()}
    for p in vm.paths.values():
        bt.write(p, 2 * MiB, MiB, 0x43)
    disks = {t: bt.read(p) for t, p in vm.paths.items()}
    face_a, = [ref for ref in world.xapi.objects["VDI"]
               if world.xapi.vdi_path(ref) == images["xvda"]]
    _vdi_destroy(world, face_a)
    out, = _follow_once(world, sm)
    assert "error" not in out, out
    assert out["result"]["followed_sm"]["deleted"] == [], out          # xvdb's face is left
    assert [(m["disk"], m["method"]) for m in out["result"]["merges"]] == [("xvda", "fold")]
    snap, = world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]
    assert [d["target"] for d in snap["disks"]] == ["xvdb"], snap
    assert bt.read(images["xvdb"]) == taken["xvdb"]
    assert {t: bt.read(p) for t, p in vm.paths.items()} == disks
    view = sm.classify(world.sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view
    assert world.ok("check", vm_uuid=vm.uuid)["ok"]


def test_install_unit(tmp_path):
    """``xapi-follow --install-unit DIR`` writes the systemd unit that runs the follower
    with this interpreter and state directory (no XAPI needed)."""
    state = str(tmp_path / "state")
    p = subprocess.run([sys.executable, "-m", "livesnap", "xapi-follow", "--state-dir", state,
                        "--install-unit", str(tmp_path / "units")], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "units" / "livesnap-xapi-follow.service").read_text()
    assert "ExecStart=%s -m livesnap.cli.main xapi-follow --state-dir %s" % (
        sys.executable, state) in text and "After=xapi.service" in text, text
    # what the unit runs is the command itself (never handed to a livesnap service)
    p = subprocess.run([sys.executable, "-m", "livesnap.cli.main", "xapi-follow", "--help"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0 and "--once" in p.stdout, (p.stdout, p.stderr)


def test_livesnap_delete_aborts_a_waiting_gc(sm_world, sm):
    """livesnap's own delete (the plugin) of a running VM's only snapshot while SM's GC,
    kicked earlier, waits in its quiet period holding ``gc_active``: the delete asks it to
    stop with SM's abort flag, folds with the GC held off, and the GC process ends without
    having done anything; the flag is gone afterwards."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    sr_uuid = world.xapi.record("SR", world.sr)["uuid"]
    vm.start()
    p = sm.start("gc-quiet", world.sr)
    try:
        end = time.monotonic() + 120
        while "GC active, about to go quiet" not in sm.log():
            assert p.poll() is None, (p.returncode, p.communicate(), sm.log()[-3000:])
            assert time.monotonic() < end, sm.log()[-3000:]
            time.sleep(0.05)
        r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
        assert r["action"] == "merged" and r["merges"][0]["method"] == "fold", r
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and json.loads(out.splitlines()[-1]) == {"aborted": True}, (
            out, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "IPCFlag: set" not in sm.log()                 # the flag was livesnap's, not SM's
    assert not os.path.exists(os.path.join(_ipc_dir(sm), sr_uuid, "abort"))
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


def test_follower_recovers_an_interrupted_delete_first(sm_world, sm):
    """s1, s2 of a running VM; livesnap's delete of s2 killed inside its fold (the last
    pause); then s1 destroyed with xe. The follower finishes the interrupted delete
    (``recover``) before it follows SM, then folds s1's base copy, now down to the leaf."""
    import xmlrpc.client
    from conftest_paths import PLUGIN
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    vm.start()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid,
                                                                      "name": "s2"}),
                                                    methodname="snapshot_delete")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(LIVESNAP_FAULT="tapdisk:folded:0"), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    _vdi_destroy(world, _face(world, "s1"))
    out, = _follow_once(world, sm)
    assert "error" not in out, out
    assert out["recovered"]["op"] == "delete", out
    assert out["result"]["followed_sm"]["deleted"] == ["s1"], out
    assert [m["method"] for m in out["result"]["merges"]] == ["fold"], out
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    vm.stop()
    _only_image(world, world.sr, disk)
    view = sm.classify(world.sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view


def test_lvhd_face_left_hidden_by_a_failed_lvremove(request, sm_world, sm):
    """``LVHDVDI.delete`` hides the snapshot's VHD and forgets its record before its
    ``lvremove``, and goes on when that fails ("maybe is leaf coalescing"): a hidden leaf
    LV whose VDI is gone. The follower takes it as deleted: livesnap removes the LV and folds
    the base copy, and SM's GC finds nothing (no garbage left either)."""
    from livesnap import vhd
    world = sm_world
    sr = _fold_sr(request, world, sm, "lvm")
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    face = _face(world, "s1")
    face_path = world.xapi.vdi_path(face)
    vm.start()
    # what LVHDVDI.delete leaves when its lvremove fails (l. 1424-1448)
    from livesnap.tools import lvm
    vg, lv = lvm.split_path(face_path)
    if not os.path.exists(face_path):
        lvm.activate(vg, lv)
    lvm.set_readonly(vg, lv, False)
    vhd.set_hidden(face_path, 1)
    world.xapi.call("VDI.db_forget", [world.session, face])
    out, = _follow_once(world, sm)
    assert "error" not in out, out
    r = out["result"]
    assert r["followed_sm"]["deleted"] == ["s1"], r
    assert [m["method"] for m in r["merges"]] == ["fold"], r
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    assert lv not in standin_lvs()
    _check_sm_end_state(world, sm, sr, vm, disk, expected)


def standin_lvs():
    from testxen import lvm as standin
    return sorted(standin.Vg(os.environ["TESTXEN_LVM_ROOT"]).loops())


def test_recover_after_xe_delete_merges(sm_world, sm):
    """``recover`` (the plugin's, no operation open) after an xe delete: the catalog follows
    SM and the base copy is folded, as the follower would."""
    world = sm_world
    vm, disk = _fold_vm(world, smmod.Blktap(txblktap.prefix()), world.sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    _vdi_destroy(world, _face(world, "s1"))
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["recovered"] is None, r
    f = r["followed_sm"]
    assert f["followed_sm"]["deleted"] == ["s1"], r
    assert [m["method"] for m in f["merges"]] == ["fold"], r
    assert world.ok("recover", vm_uuid=vm.uuid)["followed_sm"] is None
    _check_sm_end_state(world, sm, world.sr, vm, disk, expected)


@pytest.mark.parametrize("flag_set_before", [False, True])
def test_gc_that_does_not_stop_is_a_clear_error(tmp_path, flag_set_before):
    """A process holding an SR's ``gc_active`` that never looks at the abort flag:
    ``held_off`` gives up after its timeout with ``SmGcBusy`` (the BUSY code) naming the SR
    and the lock; the abort flag is removed if livesnap set it, left if someone else had."""
    from livesnap.errors import Busy, SmGcBusy
    from livesnap.platforms import sm_gc
    sr = "0b4cd3a4-8d9e-4b43-9a55-5e0d1f7c2a11"
    locks, ipc = str(tmp_path / "lock"), str(tmp_path / "ipc")
    os.makedirs(os.path.join(locks, sr))
    flag = os.path.join(ipc, sr, "abort")
    if flag_set_before:
        os.makedirs(os.path.dirname(flag))
        with open(flag, "w") as f:
            f.write("1\n")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"), os.path.join(locks, sr, "gc_active")],
        stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SmGcBusy) as e:
            with sm_gc.held_off(sr, lock_dir=locks, ipc_dir=ipc, timeout=0.5):
                pass
        assert isinstance(e.value, Busy) and e.value.sr == sr, e.value
        assert "did not stop" in str(e.value) and "gc_active" in str(e.value)
        assert os.path.exists(flag) == flag_set_before
    finally:
        holder.kill()
        holder.wait()
    with sm_gc.held_off(sr, lock_dir=locks, ipc_dir=ipc, timeout=5) as held:
        assert held["aborted"] is False                  # free now: taken at once
