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


def _active(world, sr):
    """The VDI uuids of the SR's LVs that are active (have a device)."""
    return {u for u, p in world.xapi.sr_images(sr).items() if os.path.exists(p)}


def _as_sm_leaves_them(world, sm, sr):
    """The refcounts as SM rebuilds them, and the LVs active exactly where SM counts a user
    (SM's snapshot, coalesce and detach deactivate an LV whose counts drop to 0: a new
    snapshot VDI's, a base copy's, a detached VDI's chain)."""
    counts = _as_sm_rebuilds(sm, sr)
    assert _active(world, sr) == set(counts), (counts, _active(world, sr))
    return counts


@pytest.mark.parametrize("online", [True, False], ids=["attached", "detached"])
def test_refcounts_after_create_delete_fold_are_sms(world, sm, lvhd, online):
    """s1, s2 taken, s1 deleted (its base merges with s2's), s2 deleted (its base folds into
    the leaf). Attached (SM's attach counted, the VM running on real tapdisks): the leaf
    keeps (0, 1), each hidden base copy under it has (1, 0), a snapshot's own VDI none;
    detached (its LV inactive, as SM leaves a detached VDI): no counts at all. Each time as
    SM rebuilds them, the LVs active exactly where they count (a snapshot's own VDI
    inactive, as SM leaves a new snapshot VDI; nothing active when detached), and SM's
    detach at the end takes back exactly its own."""
    from livesnap.tools import lvm
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    leaf = _uuid(disk)
    if online:
        assert sm.attach(lvhd, leaf) == {leaf: [0, 1]}
        vm.start()
    else:
        lvm.activate(*lvm.split_path(disk), active=False)

    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    face1 = _uuid(r["disks"][0]["image"])
    counts = _as_sm_leaves_them(world, sm, lvhd)
    bases = set(counts) - {leaf}
    if online:
        assert counts[leaf] == [0, 1] and len(bases) == 1, counts
        assert [counts[b] for b in bases] == [[1, 0]] and face1 not in counts, counts
    else:
        assert counts == {}, counts

    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    counts = _as_sm_leaves_them(world, sm, lvhd)
    if online:
        assert counts[leaf] == [0, 1] and len(counts) == 3, counts
        assert all(c == [1, 0] for u, c in counts.items() if u != leaf), counts
    else:
        assert counts == {}, counts

    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    counts = _as_sm_leaves_them(world, sm, lvhd)
    if online:
        assert counts[leaf] == [0, 1] and len(counts) == 2, counts
        assert all(c == [1, 0] for u, c in counts.items() if u != leaf), counts
        assert set(counts) <= _images(world, lvhd)
    else:
        assert counts == {}, counts

    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    counts = _as_sm_leaves_them(world, sm, lvhd)
    assert counts == ({leaf: [0, 1]} if online else {}), (counts, r)
    assert _images(world, lvhd) == {leaf}
    if online:
        vm.stop()
        assert sm.detach(lvhd, leaf) == {}
        assert _active(world, lvhd) == set()
    _no_refcount_warnings(sm)


def test_a_running_chain_nobody_counted_stays_active(world, sm, lvhd):
    """The VM running on real tapdisks without SM's attach having counted it (no counts at
    all): what the tapdisk holds -- the leaf and every base copy under it -- stays active
    through create, delete and fold, only the snapshots' own VDIs go inactive; the tapdisk
    reopens the chain at each unpause and every acknowledged write is kept."""
    from livesnap import vhd
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    vm.start()

    def check():
        assert _as_sm_rebuilds(sm, lvhd) == {}
        chain = {_uuid(p) for p in vhd.chain_paths(disk)}
        assert _active(world, lvhd) == chain, (chain, _images(world, lvhd))
        return chain
    faces = set()
    for name in ("s1", "s2"):
        r = world.ok("snapshot_create", vm_uuid=vm.uuid, name=name)
        faces.add(_uuid(r["disks"][0]["image"]))
        assert len(check()) == len(faces) + 1 and not faces & _active(world, lvhd)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert len(check()) == 2
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    assert check() == {_uuid(disk)} == _images(world, lvhd)
    vm.stop()


def test_a_fold_waits_for_sms_refcount_lock_before_its_pause(world, sm, sm_tree,  # noqa: F811
                                                             lvhd):
    """The fold's last step moves the base copy's count to the running leaf inside a
    tapdisk pause: SM holding its lock of the base copy's count (``RefCounter.checkLocked``
    stopped in its read) makes livesnap wait before that pause, the guest running
    meanwhile; once SM lets go the delete ends with SM's counts."""
    import subprocess
    import time
    import xmlrpc.client
    from conftest_paths import PLUGIN
    from livesnap.datapaths import holders, sm_refcount
    from livesnap.tools import tap_ctl
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    leaf = _uuid(vm.paths["xvda"])
    sm.attach(lvhd, leaf)
    vm.start()
    face = _uuid(world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")["disks"][0]["image"])
    base, = _images(world, lvhd) - {leaf, face}
    ns = sm_refcount.namespace(world.xapi.record("SR", lvhd)["uuid"])
    sm_count = SmCount(sm_tree, ns, base, False, op="check", lock_dir=world.sm_lock_dir)
    p = subprocess.Popen([PLUGIN, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid,
                                                                        "name": "s1"}),
                                                      methodname="snapshot_delete")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, env=world.env())
    try:
        while p.poll() is None and not [
                pid for pid in holders.open_by(sm_count.lock_path) if pid != sm_count.p.pid]:
            time.sleep(0.01)
        assert p.poll() is None, p.communicate()
        td = vm.tapdisks["xvda"]
        state = tap_ctl.parse_list(world.tap_ctl("list", "-m", str(td.minor))[1])[0].state
        assert not state & tap_ctl.PAUSED, "the guest paused while livesnap waits for SM"
        sm_count.write()
        out, err = p.communicate(timeout=120)
    finally:
        sm_count.kill()
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "<fault>" not in out, (out, err)
    assert _as_sm_leaves_them(world, sm, lvhd) == {leaf: [0, 1]}
    assert _images(world, lvhd) == {leaf}
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
    assert _as_sm_leaves_them(world, sm, lvhd) == {leaf: [0, 1]}
    assert _images(world, lvhd) == {leaf}
    vm.stop()
    assert sm.detach(lvhd, leaf) == {}
    _no_refcount_warnings(sm)


@pytest.mark.parametrize("fault", ["tapdisk:renamed:0", "create:after:0",
                                   "create:committed:0"])
def test_create_killed_then_recovered_leaves_sms_counts_and_activation(  # noqa: F811
        world, blktap, sm, lvhd, fault):
    """The plugin killed inside an online snapshot of the attached, running disk (inside the
    pause after the rename, after the step with the snapshot's own VDI made and active, after
    the catalog's commit): after ``recover`` the counts are SM's and the snapshot's own LV
    is inactive, as SM leaves a new snapshot VDI; a delete after that (its face read and
    removed while inactive) leaves the leaf alone active."""
    import subprocess
    import xmlrpc.client
    from conftest_paths import PLUGIN
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    leaf = _uuid(vm.paths["xvda"])
    sm.attach(lvhd, leaf)
    vm.start()
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid,
                                                                      "name": "s1"}),
                                                    methodname="snapshot_create")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(LIVESNAP_FAULT=fault), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    world.ok("recover", vm_uuid=vm.uuid)
    snaps = world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]
    counts = _as_sm_leaves_them(world, sm, lvhd)
    if snaps:
        face = _uuid(snaps[0]["disks"][0]["image"])
        base, = _images(world, lvhd) - {leaf, face}
        assert counts == {leaf: [0, 1], base: [1, 0]}
        world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert _as_sm_leaves_them(world, sm, lvhd) == {leaf: [0, 1]}
    vm.stop()
    assert sm.detach(lvhd, leaf) == {}
    assert _active(world, lvhd) == set()
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
    assert _as_sm_leaves_them(world, sm, lvhd) == {leaf: [0, 1], face1: [0, 1],
                                                   base1: [2, 0]}
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    counts = _as_sm_leaves_them(world, sm, lvhd)
    base2, = set(counts) - {leaf, face1, base1}
    assert counts == {leaf: [0, 1], face1: [0, 1], base1: [2, 0], base2: [1, 0]}
    vm.stop()
    assert sm.detach(lvhd, leaf) == {face1: [0, 1], base1: [1, 0]}
    assert _active(world, lvhd) == {face1, base1}
    before = _images(world, lvhd)
    world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1", keep_current="k1")
    counts = _as_sm_leaves_them(world, sm, lvhd)
    new = _images(world, lvhd) - before           # k1 (the old leaf, renamed), the clone's
    if written:
        frozen, = [u for u in new if counts.get(u)]
        assert counts == {face1: [0, 1], frozen: [1, 0], base1: [1, 0]}, counts
        assert len(new) == 2
    else:
        assert counts == {face1: [0, 1], base1: [1, 0]} and len(new) == 1, counts
    assert sm.detach(lvhd, face1) == {}
    assert _active(world, lvhd) == set()
    _no_refcount_warnings(sm)


# -- SM's per-object refcount lock (refcounter.py, lvmcache.LVMCache.activate/deactivate) ------

# SM's own count of an object, as lvmcache.LVMCache.activate makes it on the master (an attach:
# ``Lock(uuid, "lvm-<sr>")`` held, ``RefCounter.get``), with SM's own lock.py and
# refcounter.py; the one change: RefCounter's read of the file reports and waits for the test
# before ``_adjust`` writes its sum, so the test chooses the moment of the write.
SM_COUNT = r'''
import json, sys
cfg = json.loads(sys.argv[1])
sys.path[:0] = [cfg["drivers"], cfg["fairlock"]]
import util
util.SMlog = lambda *a, **k: None
import lock, refcounter
lock.Lock.BASE_DIR = cfg["lock_dir"]
refcounter.RefCounter.BASE_DIR = cfg["refcount_dir"]
RefCounter = refcounter.RefCounter
read = RefCounter._get

def paused(ns, obj):
    counts = read(ns, obj)
    print("read %d %d" % counts, flush=True)
    sys.stdin.readline()
    return counts
RefCounter._get = staticmethod(paused)
if cfg["op"] == "check":                  # RefCounter.checkLocked: the lock, a read
    RefCounter.checkLocked(cfg["obj"], cfg["ns"])
else:
    held = lock.Lock(cfg["obj"], cfg["ns"])
    held.acquire()
    try:
        RefCounter.get(cfg["obj"], cfg["binary"], cfg["ns"])
    finally:
        held.release()
print("written", flush=True)
'''


class SmCount(object):
    """SM counting ``obj`` (``binary``; ``op="check"``: only reading it, with its lock) in
    another process, stopped between its read and its write with its lock held."""

    def __init__(self, sm_tree, ns, obj, binary, op="get", lock_dir=None):  # noqa: F811
        import json
        import subprocess
        import sys
        from livesnap.datapaths import sm_refcount
        cfg = {"drivers": os.path.join(sm_tree, "drivers"),
               "fairlock": os.path.join(sm_tree, "misc", "fairlock"),
               "lock_dir": lock_dir or sm_refcount.lock_dir(),
               "refcount_dir": sm_refcount.base_dir(),
               "ns": ns, "obj": obj, "binary": binary, "op": op}
        self.lock_path = os.path.join(cfg["lock_dir"], ns, obj)
        self.p = subprocess.Popen([sys.executable, "-c", SM_COUNT, json.dumps(cfg)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  universal_newlines=True)
        line = self.p.stdout.readline()
        assert line.startswith("read "), line          # SM holds the lock, has read

    def write(self):
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        assert self.p.stdout.readline() == "written\n"
        assert self.p.wait(30) == 0

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _open_here(path):
    """This process has ``path`` open (livesnap opened SM's lock file to wait on it)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink("/proc/self/fd/" + fd) == path:
                return True
        except OSError:
            pass
    return False


@pytest.fixture
def lvhd_vg(lvm_vg, tmp_path, monkeypatch):
    """(LvmStorage of an SR's VG, SM's refcount namespace, path of VHD-<uuid>): SM's lock
    directory the test's."""
    from livesnap.datapaths import sm_refcount, vhd_storage
    monkeypatch.setenv("LIVESNAP_SM_LOCK_DIR", str(tmp_path / "sm-lock"))
    vg = lvm_vg.name
    ns = sm_refcount.namespace(vg[len(vhd_storage.SM_VG_PREFIX):])
    return vhd_storage.LvmStorage(vg), ns, lambda u: "/dev/%s/VHD-%s" % (vg, u)


def _state(st, ns, uuids):
    from livesnap.datapaths import sm_refcount
    from livesnap.tools import lvm
    return {u: (lvm.lv_exists(st.vg, "VHD-" + u), sm_refcount.check(ns, u)) for u in uuids}


@pytest.mark.parametrize("op", ["frozen_from", "replace", "remove"])
def test_sms_refcount_lock_held_past_the_wait_changes_nothing(lvhd_vg, sm_tree,  # noqa: F811
                                                              monkeypatch, op):
    """SM holds its lock of the leaf's count (an attach in flight on the master): livesnap's
    change that reads or writes that count -- a frozen image's counts, a fold's rename over
    the leaf, the leaf's removal -- waits for it and, when SM keeps it past the wait, gives
    up with SmRefcountBusy (the BUSY code) before touching any LV or count; SM's own write
    then goes through."""
    from livesnap.datapaths import sm_refcount
    from livesnap.errors import SmRefcountBusy
    from livesnap.tools import lvm
    st, ns, path = lvhd_vg
    leaf, base = "a" * 8 + "-leaf", "b" * 8 + "-base"
    for u in (leaf, base):
        lvm.lvcreate(st.vg, "VHD-" + u, 4 * MiB)
    sm_refcount.set_counts(ns, base, 1, 0)
    before = _state(st, ns, (leaf, base))
    monkeypatch.setattr(sm_refcount, "LOCK_TIMEOUT", 0.2)
    sm_count = SmCount(sm_tree, ns, leaf, True)
    try:
        with pytest.raises(SmRefcountBusy) as e:
            if op == "frozen_from":
                st.frozen_from(path(base), path(leaf))
            elif op == "replace":
                st.replace(path(base), path(leaf))
            else:
                st.remove(path(leaf))
        assert e.value.vdi == leaf and e.value.lock_path == sm_count.lock_path
        assert _state(st, ns, (leaf, base)) == before
        sm_count.write()
    finally:
        sm_count.kill()
    assert sm_refcount.check(ns, leaf) == (0, 1)


def test_an_sm_attach_in_flight_is_counted_by_a_snapshot(lvhd_vg, sm_tree):  # noqa: F811
    """SM's attach of the VM's VDI in flight (its lock held, the leaf's count read, not yet
    written) while livesnap's snapshot gives the new base copy the leaf's binary count: livesnap
    waits for SM's write and the base copy gets the attach's count, (1, 0), as SM's own
    snapshot would after the attach (read without the lock: (0, 0), a base copy under an
    attached leaf that SM's detach then takes below 0)."""
    import threading
    from livesnap.datapaths import sm_refcount
    st, ns, path = lvhd_vg
    leaf, base = "c" * 8 + "-leaf", "0" * 8 + "-base"     # the base's lock is taken first
    sm_count = SmCount(sm_tree, ns, leaf, True)
    done = []
    t = threading.Thread(target=lambda: done.append(st.frozen_from(path(base), path(leaf))))
    try:
        t.start()
        while t.is_alive() and not _open_here(sm_count.lock_path):
            t.join(0.01)
        sm_count.write()
    finally:
        sm_count.kill()
        t.join(30)
    assert done == [None]
    assert sm_refcount.check(ns, leaf) == (0, 1)
    assert sm_refcount.check(ns, base) == (1, 0)


def test_a_removed_lvs_lock_file_goes_with_it(lvhd_vg):
    """As SM's delete (``Lock.cleanup(uuid, "lvm-<sr>")``): no lock file is left for a VDI
    whose LV livesnap removed; the namespace's other lock files stay."""
    from livesnap.datapaths import sm_refcount
    from livesnap.tools import lvm
    st, ns, path = lvhd_vg
    for u in ("one", "two"):
        lvm.lvcreate(st.vg, "VHD-" + u, 4 * MiB)
    sm_refcount.set_counts(ns, "one", 0, 1)
    st.frozen_from(path("two"), path("one"))          # both lock files made
    d = os.path.join(sm_refcount.lock_dir(), ns)
    assert sorted(os.listdir(d)) == ["one", "two"]
    st.remove(path("one"))
    assert sorted(os.listdir(d)) == ["two"]
    assert sm_refcount.check(ns, "one") == (0, 0) and sm_refcount.check(ns, "two") == (1, 0)
    assert not lvm.lv_exists(st.vg, "VHD-one")


def _sm_can_lock(sm_tree, lock_dir, ns, obj):  # noqa: F811
    """SM's ``Lock(obj, ns).acquireNoblock()`` in another process."""
    import subprocess
    import sys
    code = ("import sys; sys.path[:0] = [%r, %r]\nimport util\nutil.SMlog = lambda *a, **k: None\n"
            "import lock\nlock.Lock.BASE_DIR = %r\nprint(lock.Lock(%r, %r).acquireNoblock())"
            % (os.path.join(sm_tree, "drivers"), os.path.join(sm_tree, "misc", "fairlock"),
               lock_dir, obj, ns))
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, check=True,
                         universal_newlines=True).stdout.split()
    return out[-1] == "True"


def test_sms_lock_stays_held_through_a_nested_change(lvhd_vg, sm_tree):  # noqa: F811
    """The locks a fold takes before its pause stay held through the change inside it that
    takes them again (the same process: a second POSIX lock on the file, closed, would let
    go of both): SM cannot take them until the outer hold ends."""
    from livesnap.datapaths import sm_refcount
    st, ns, path = lvhd_vg
    d = sm_refcount.lock_dir()
    with st.counts_locked(path("base"), path("leaf")):
        st.frozen_from(path("base"), path("leaf"))
        assert not _sm_can_lock(sm_tree, d, ns, "leaf")
        assert not _sm_can_lock(sm_tree, d, ns, "base")
    assert _sm_can_lock(sm_tree, d, ns, "leaf") and _sm_can_lock(sm_tree, d, ns, "base")
