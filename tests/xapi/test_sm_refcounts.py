"""SM's LV refcounts on LVHD after livesnap's chain changes (issue 13, point 4).

On the pool master SM counts, per VDI uuid in ``/var/run/sm/refcount/lvm-<sr>/``, who needs
an LV active: an attached leaf holds the binary count, each hidden image under it one normal
count per attached leaf (SM's attach, ``LVHDVDI._chainSetActive``); SM's snapshot, coalesce
and leaf-coalesce move the counts with the images. After each livesnap operation the counts
must be those SM's own code rebuilds from the chain (``lvhdutil.setInnerNodeRefcounts``, run
by a new pool master; it asserts that no visible image has a normal count), SM's detach must
find the counts it takes back (no "decrementing ... refcount of 0" in SMlog), and SM's GC must
run its leaf-coalesce over a livesnap-made chain with them. All of SM's side runs SM's code
(testxen/sm.py: ``attach``, ``detach``, ``refcounts``, ``fix_refcounts``, ``gc``); LVM is
configured as in dom0 (tests/conftest.py ``lvm_vg``)."""
import os

import pytest

from testxen import sm_hosts

from test_sm_gc import blktap, sm, sm_tree  # noqa: F401  (fixtures)

MiB = 1 << 20


def _uuid(path):
    return os.path.basename(path)[len("VHD-"):]


@pytest.fixture
def lvhd(world, sm, lvm_vg):
    """An LVHD SR (SM's MGT volume made), SR.scan run by SM's own scan."""
    sr = world.add_lvm_sr(lvm_vg)
    sm.lvhd_init(sr)
    world.xapi.scanner = sm.scan
    return sr


def _as_sm_rebuilds(sm, sr):
    """The refcounts now; SM's setInnerNodeRefcounts over them changes nothing."""
    before = sm.refcounts(sr)
    after = sm.fix_refcounts(sr)
    assert after == before, ("SM's own rebuild of the refcounts differs from what livesnap "
                             "left", before, after)
    return before


def _no_refcount_warnings(sm):
    bad = [ln for ln in sm.log().splitlines() if "refcount of 0" in ln
           or "AssertionError" in ln or "Traceback" in ln]
    assert not bad, "\n".join(bad)


def _images(world, sr):
    return {_uuid(p) for p in world.xapi.sr_images(sr).values()}


@pytest.mark.parametrize("online", [True, False], ids=["attached", "detached"])
def test_refcounts_after_create_delete_fold_are_sms(world, sm, lvhd, online):
    """s1, s2 taken, s1 deleted (its base merges with s2's), s2 deleted (its base folds into
    the leaf). Attached (SM's attach counted, the VM running on real tapdisks): the leaf
    keeps (0, 1), each hidden base copy under it has (1, 0), a snapshot's own VDI none;
    detached: no counts at all. Each time as SM rebuilds them, and SM's detach at the end
    takes back exactly its own."""
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    leaf = _uuid(disk)
    if online:
        assert sm.attach(lvhd, leaf) == {leaf: [0, 1]}
        vm.start()

    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    face1 = _uuid(r["disks"][0]["image"])
    counts = _as_sm_rebuilds(sm, lvhd)
    bases = set(counts) - {leaf}
    if online:
        assert counts[leaf] == [0, 1] and len(bases) == 1, counts
        assert [counts[b] for b in bases] == [[1, 0]] and face1 not in counts, counts
    else:
        assert counts == {}, counts

    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    counts = _as_sm_rebuilds(sm, lvhd)
    if online:
        assert counts[leaf] == [0, 1] and len(counts) == 3, counts
        assert all(c == [1, 0] for u, c in counts.items() if u != leaf), counts
    else:
        assert counts == {}, counts

    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    counts = _as_sm_rebuilds(sm, lvhd)
    if online:
        assert counts[leaf] == [0, 1] and len(counts) == 2, counts
        assert all(c == [1, 0] for u, c in counts.items() if u != leaf), counts
        assert set(counts) <= _images(world, lvhd)
    else:
        assert counts == {}, counts

    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    counts = _as_sm_rebuilds(sm, lvhd)
    assert counts == ({leaf: [0, 1]} if online else {}), (counts, r)
    assert _images(world, lvhd) == {leaf}
    if online:
        vm.stop()
        assert sm.detach(lvhd, leaf) == {}
    _no_refcount_warnings(sm)


def test_sms_live_leaf_coalesce_over_a_livesnap_chain(world, blktap, sm, lvhd):  # noqa: F811
    """The running VM's disk (SM's attach counted) snapshotted by livesnap, then the
    snapshot's own VDI destroyed behind livesnap's back as ``xe vdi-destroy`` does (SM's
    LVHDVDI.delete: the LV removed, the record forgotten): the base copy livesnap made is left
    with one child, the attached leaf, and SM's GC leaf-coalesces it online (pausing the real
    tapdisk through the tapdisk-pause plugin) with the counts livesnap left: no assertion, no
    count taken below 0, one LV left with the leaf's counts as SM rebuilds them, every
    acknowledged guest write kept, and SM's detach takes back exactly its own."""
    from livesnap.tools import lvm
    x = world.xapi
    master = sm_hosts.master(x, sm)                 # SM's own tapdisk-pause here
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    leaf = _uuid(disk)
    leaf_ref, = [r for r, rec in x.objects["VDI"].items() if rec["uuid"] == leaf]
    sm.attach(lvhd, leaf)
    master.plug(leaf_ref, disk)
    vm.start()
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    face = _uuid(r["disks"][0]["image"])
    base, = _images(world, lvhd) - {leaf, face}
    assert _as_sm_rebuilds(sm, lvhd) == {leaf: [0, 1], base: [1, 0]}

    vg, lv = lvm.split_path(r["disks"][0]["image"])
    lvm.lvremove(vg, lv)                                 # SM's LVHDVDI.delete of the face
    face_ref, = [r for r, rec in x.objects["VDI"].items() if rec["uuid"] == face]
    del x.objects["VDI"][face_ref]
    view = sm.classify(lvhd)
    assert view["leaf_coalesceable"] == [leaf], view

    after = sm.gc(lvhd)
    assert list(after["vdis"]) == [leaf], (after, sm.log()[-3000:])
    log = sm.log()
    assert "Calling tap-pause on host" in log and "Calling tap-unpause on host" in log
    _no_refcount_warnings(sm)
    assert _as_sm_rebuilds(sm, lvhd) == {leaf: [0, 1]}
    assert _images(world, lvhd) == {leaf}
    vm.stop()                                 # every acknowledged guest write is there
    master.unplug(leaf_ref)
    assert sm.detach(lvhd, leaf) == {}
    _no_refcount_warnings(sm)


@pytest.mark.parametrize("fault", ["tapdisk:renamed:0", "lvm:inflated:0", "tapdisk:folded:0",
                                   "lvm:replaced:0"])
def test_fold_killed_then_recovered_leaves_sms_counts(world, blktap, sm, lvhd,  # noqa: F811
                                                      fault):
    """The plugin killed inside the fold of an attached disk's base copy into its leaf (a
    round's freeze, the base inflated for a round, the last pause before the rename, between
    the LV rename and the counts): after ``recover`` the leaf has its attach's counts and
    nothing else is counted, as SM rebuilds them."""
    import subprocess
    import xmlrpc.client
    from conftest_paths import PLUGIN
    from test_sm_gc import _fold_vm
    vm, disk = _fold_vm(world, blktap, lvhd)          # s1 taken offline, data both sides
    leaf = _uuid(disk)
    sm.attach(lvhd, leaf)                             # then the VM started
    vm.start()
    assert len(_as_sm_rebuilds(sm, lvhd)) == 2
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid,
                                                                      "name": "s1"}),
                                                    methodname="snapshot_delete")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(LIVESNAP_FAULT=fault), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    world.ok("recover", vm_uuid=vm.uuid)
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    assert _as_sm_rebuilds(sm, lvhd) == {leaf: [0, 1]}
    assert _images(world, lvhd) == {leaf}
    vm.stop()
    assert sm.detach(lvhd, leaf) == {}
    _no_refcount_warnings(sm)


@pytest.mark.parametrize("written", [False, True], ids=["read", "written"])
def test_refcounts_with_a_snapshot_vdi_attached_too(world, blktap, sm, lvhd,  # noqa: F811
                                                    written):
    """A snapshot's own VDI attached as well (a backup tool reading it: SM's attach counts
    its base copy a second time): a later snapshot of the running VM, and a revert to that
    snapshot after the VM stopped, keeping the current state (the new leaf goes on s1's base
    copy beside its attached VDI; the old leaf becomes k1's VDI), leave the counts SM rebuilds,
    and SM's detach of the snapshot VDI at the end takes back exactly its own."""
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    leaf = _uuid(vm.paths["xvda"])
    sm.attach(lvhd, leaf)
    vm.start()
    face1 = _uuid(world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")["disks"][0]["image"])
    base1, = _images(world, lvhd) - {leaf, face1}
    sm.attach(lvhd, face1)
    if written:
        sr_uuid = world.xapi.record("SR", lvhd)["uuid"]
        blktap.write("/dev/VG_XenStorage-%s/VHD-%s" % (sr_uuid, face1), 0, MiB, 0x5a)
    assert _as_sm_rebuilds(sm, lvhd) == {leaf: [0, 1], face1: [0, 1], base1: [2, 0]}
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    counts = _as_sm_rebuilds(sm, lvhd)
    base2, = set(counts) - {leaf, face1, base1}
    assert counts == {leaf: [0, 1], face1: [0, 1], base1: [2, 0], base2: [1, 0]}
    vm.stop()
    assert sm.detach(lvhd, leaf) == {face1: [0, 1], base1: [1, 0]}
    before = _images(world, lvhd)
    world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1", keep_current="k1")
    counts = _as_sm_rebuilds(sm, lvhd)
    new = _images(world, lvhd) - before           # k1 (the old leaf, renamed), the clone's
    if written:
        frozen, = [u for u in new if counts.get(u)]
        assert counts == {face1: [0, 1], frozen: [1, 0], base1: [1, 0]}, counts
        assert len(new) == 2
    else:
        assert counts == {face1: [0, 1], base1: [1, 0]} and len(new) == 1, counts
    assert sm.detach(lvhd, face1) == {}
    _no_refcount_warnings(sm)
