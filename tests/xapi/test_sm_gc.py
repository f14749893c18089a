"""The real storage manager (SM v3.2.12: its scan and its garbage collector, cleanup.py) run
over what livesnap leaves on an SR, with the real vhd-util and the real tapdisk
(testxen/sm.py): after each livesnap operation a full GC pass runs to its end with its XAPI
calls served by the XAPI stand-in, then every snapshot must read what it read when it was
taken and the VM's disk what was written to it (reads through the real tapdisk).

``SR.scan``, which livesnap's plugin calls after each operation, runs SM's own driver scan
(FileSR/LVHDSR ``_loadvdis``) for the XAPI records. The VM is halted while SM works (its
disks detached: SM's pause is then only the ``sm_config`` key, as on a host); livesnap runs
offline, or online with the VM started between GC passes; offline data is written through
the real tapdisk. After a delete SM must find nothing to coalesce. Control SRs laid out as
SM lays them out (vhd-util snapshot, hidden base copies, XAPI records as SM writes them;
file and LVHD; an attached leaf served by a real tapdisk) show the harness doing SM's
documented work.

No expected failure is left."""
import os
import uuid

import pytest

from testxen import blktap as txblktap
from testxen import sm as smmod
from testxen import sm_hosts

MiB = 1 << 20
SIZE = 4 * MiB            # two 2 MiB VHD blocks


@pytest.fixture(scope="session")
def blktap():
    return smmod.Blktap(txblktap.prefix())


@pytest.fixture(scope="session")
def sm_tree(tmp_path_factory):
    return smmod.unpack()


@pytest.fixture
def sm(world, blktap, sm_tree):
    return smmod.Sm(sm_tree, blktap.vhd_util, world.xapi, world.socket,
                    os.path.join(world.base, "sm"), lock_dir=world.sm_lock_dir)


# -- a control SR laid out as SM lays it out ---------------------------------------------------

def _sm_layout(world, blktap, depth):
    """A chain as SM's FileSR snapshots leave it once the snapshot VDIs are deleted:
    ``depth`` hidden base copies (read-only, unmanaged records) under the VDI's leaf, each
    made by ``vhd-util snapshot`` after data was written through the real tapdisk
    (testxen.sm.file_layout). Returns (leaf VDI ref, [base uuids, oldest first], what the
    leaf reads)."""
    ref, bases = smmod.file_layout(
        world.xapi, world.sr, blktap, SIZE,
        [[(i * MiB, MiB // 2, 0x11 * (i + 1))] for i in range(depth)], [(3 * MiB, MiB, 0x77)])
    return ref, bases, blktap.read(world.xapi.vdi_path(ref))


def test_control_sm_layout_gc_coalesces_base_copies(world, blktap, sm):
    """SM's own layout: a leaf over two hidden base copies. The GC coalesces the inner base
    copy into the outer one (isCoalesceable: hidden, only child, has a child), relinks the
    leaf, then leaf-coalesces the leaf into the remaining base (isLeafCoalesceable) and
    renames it to the leaf's uuid: one VHD left, the leaf's record kept, the base copies'
    records forgotten, the disk reading the same."""
    x = world.xapi
    ref, bases, before = _sm_layout(world, blktap, 2)
    leaf_uuid = x.record("VDI", ref)["uuid"]
    view = sm.classify(world.sr)
    assert view["coalesceable"] == [bases[1]], view
    # the leaf, only child of a hidden base, is leaf-coalesceable too: the GC does the
    # coalesce first (one per pass, then rescans)
    assert view["leaf_coalesceable"] == [leaf_uuid] and view["garbage"] == [], view
    scan = sm.scan(world.sr)
    assert scan[leaf_uuid]["hidden"] is False and scan[bases[0]]["hidden"] is True
    assert scan[bases[0]]["read_only"] is True

    after = sm.gc(world.sr)
    assert after["vdis"] == {leaf_uuid: {"parent": None, "hidden": False, "children": [],
                                         "scan_error": False}}, (after, sm.log()[-3000:])
    assert after["coalesceable"] == after["leaf_coalesceable"] == after["garbage"] == []
    path = x.vdi_path(ref)
    assert sorted(os.listdir(os.path.dirname(path))) == [leaf_uuid + ".vhd"]
    assert blktap.check(path) is None
    assert blktap.read(path) == before
    assert {rec["uuid"] for rec in x.objects["VDI"].values()} == {leaf_uuid}
    assert "vhd-parent" not in x.record("VDI", ref)["sm_config"]
    assert "paused" not in x.record("VDI", ref)["sm_config"]


def test_control_sm_layout_online_leaf_coalesce_through_real_tapdisk(world, blktap, sm):
    """The leaf of SM's layout attached (``sm_config host_<ref>=RW``) and served by a real
    tapdisk: SM's GC pauses it through the tapdisk-pause plugin (here: the real tap-ctl),
    leaf-coalesces, renames the merged base to the leaf's name and unpauses, and the same
    tapdisk, reopened on the new chain, serves what it served before, and takes writes."""
    x = world.xapi
    ref, bases, before = _sm_layout(world, blktap, 1)
    path = x.vdi_path(ref)
    sm_hosts.master(x, sm).plug(ref, path)          # attached here: SM's own plugin pauses
    pid, minor = blktap._served(path, False)
    try:
        after = sm.gc(world.sr)
        assert list(after["vdis"]) == [x.record("VDI", ref)["uuid"]], after
        log = sm.log()
        assert "Calling tap-pause on host" in log and "Calling tap-unpause on host" in log
        # SM's own plugin found the tapdisk (its minor) through the attach's tap device
        assert "Calling tap pause with minor %d" % minor in log
        assert "Calling tap unpause with minor %d" % minor in log
        sock = "nbd+unix:///?socket=/run/blktap-control/nbd%d.%d" % (pid, minor)
        out = os.path.join(world.base, "served.raw")
        blktap._run(["qemu-img", "dd", "-f", "raw", "-O", "raw", "if=" + sock, "of=" + out,
                     "bs=1M"])
        with open(out, "rb") as f:
            assert f.read() == before
        blktap._run(["qemu-io", "-f", "raw", "-c", "write -P 171 0 65536", sock])
    finally:
        blktap._close(pid, minor)
    assert blktap.read(path)[:65536] == b"\xab" * 65536
    assert blktap.read(path)[65536:] == before[65536:]
    assert "paused" not in x.record("VDI", ref)["sm_config"]


# -- livesnap's operations, each followed by a real GC pass ------------------------------------

def activate_lvs(world, sr):
    """LVHD: every LV of the SR active (a device at /dev/VG/LV), as SM activates a chain to
    read or attach it; livesnap leaves an LV nobody counts inactive (a halted VM's, a
    snapshot's own VDI), as SM does."""
    if world.xapi.record("SR", sr)["type"] != "lvm":
        return
    from livesnap.tools import lvm
    from testxen import lvm as standin
    vg = standin.Vg(os.environ["TESTXEN_LVM_ROOT"])
    for name in vg.loops():
        if not os.path.exists(vg.link(name)):
            lvm.activate(vg.name, name, True)


class Scenario(object):
    """A halted VM with one disk on ``sr``; what each snapshot and the disk must read."""

    def __init__(self, world, blktap, sm, sr):
        self.world, self.blktap, self.sm, self.sr = world, blktap, sm, sr
        self.vm = world.add_vm(ndisks=1, sr=sr)
        self.disk = self.vm.paths["xvda"]
        self.expected = {}                 # snapshot name -> what its disk read when taken
        self.pattern = 0x20

    online = False

    def start(self):
        """Run the VM (the tapdisk stand-in and its guest writer, tests/xapi/conftest.py):
        livesnap's operations go online from here; ``gc`` stops it for SM's pass."""
        self.online = True
        self.vm.start()

    def activate(self):
        activate_lvs(self.world, self.sr)

    def write(self):
        """Guest data through the real tapdisk: 1 MiB of a new pattern, a new place each
        time (both VHD blocks get written over the scenario). Online the guest writer
        writes all the time instead."""
        if self.online:
            return
        self.activate()
        self.pattern += 1
        self.blktap.write(self.disk, (self.pattern % 6) * MiB, MiB, self.pattern)

    def ok(self, fn, **args):
        return self.world.ok(fn, vm_uuid=self.vm.uuid, **args)

    def create(self, name):
        r = self.ok("snapshot_create", name=name)
        self.activate()
        self.expected[name] = self.blktap.read(r["disks"][0]["image"])

    def images(self):
        """{snapshot name: its image} as livesnap lists them now."""
        listing = self.ok("snapshot_list")
        return {s["name"]: s["disks"][0]["image"] for s in listing["snapshots"]}

    def gc_and_check(self, after_delete=False):
        """SM's GC to its end, then: every snapshot reads what it read when taken, the disk
        what was written, every image livesnap lists is sound to the real vhd-util. After a
        delete SM must find nothing to coalesce: livesnap's delete leaves the state SM's own
        GC would reach (issue 13)."""
        if self.online:
            self.vm.stop()                  # every acknowledged guest write is in the disk
        self.activate()
        problem = self.blktap.check(self.disk)
        assert problem is None, "the real vhd-util cannot open the disk's chain: %s" % problem
        disk_before = self.blktap.read(self.disk)
        view = self.sm.classify(self.sr)          # what the GC is about to act on
        if after_delete:
            assert view["coalesceable"] == view["leaf_coalesceable"] == [], (
                "after a delete SM still finds work: coalesceable %s, leaf-coalesceable %s; "
                "SM's view of the SR: %s" % (view["coalesceable"], view["leaf_coalesceable"],
                                             view.get("vdis")))
        self.sm.gc(self.sr)
        images = self.images()
        self.activate()
        assert sorted(images) == sorted(self.expected), (images, self.sm.log()[-4000:])
        for name, data in sorted(self.expected.items()):
            img = images[name]
            assert os.path.exists(img), (
                "snapshot %s: image %s is gone after SM's GC; SM saw coalesceable %s, "
                "leaf-coalesceable %s, garbage %s" % (name, img, view["coalesceable"],
                                                       view["leaf_coalesceable"],
                                                       view["garbage"]))
            assert self.blktap.check(img) is None, (name, self.blktap.check(img))
            assert self.blktap.read(img) == data, "snapshot %s reads differently" % name
        assert self.blktap.check(self.disk) is None
        assert self.blktap.read(self.disk) == disk_before, "the disk lost guest writes"
        if self.online:
            self.vm.start()
        return images


@pytest.fixture
def scenario(world, blktap, sm):
    world.xapi.scanner = sm.scan         # SR.scan (livesnap calls it) runs SM's own scan
    return Scenario(world, blktap, sm, world.sr)


def _delete_one_child(sc, gc):
    """s1 then s2; delete s1 (one child: s2's image)."""
    sc.write(); sc.create("s1"); gc()
    sc.write(); sc.create("s2"); gc()
    sc.write(); sc.ok("snapshot_delete", name="s1"); del sc.expected["s1"]; gc(after_delete=True)


def _delete_newest(sc, gc):
    """s1, s2; delete s2 (its child is the VM's leaf; online livesnap leaves an internal
    image between s1 and the leaf until the next snapshot)."""
    sc.write(); sc.create("s1"); gc()
    sc.write(); sc.create("s2"); gc()
    sc.write(); sc.ok("snapshot_delete", name="s2"); del sc.expected["s2"]; gc(after_delete=True)
    sc.write(); sc.create("s3"); gc()


def _delete_two_children(sc, gc):
    """s1; revert to s1 keeping the current state as k1: s1 has two children (k1's image and
    the new leaf); delete s1 (stays, hidden), then k1 (s1's image down to one child)."""
    sc.write(); sc.create("s1"); gc()
    sc.write()
    sc.ok("snapshot_revert", name="s1", keep_current="k1")
    sc.activate()                          # LVHD: k1's VDI inactive, as SM leaves it
    sc.expected["k1"] = sc.blktap.read(sc.images()["k1"])
    gc()
    sc.write(); sc.ok("snapshot_delete", name="s1"); del sc.expected["s1"]; gc(after_delete=True)
    sc.write(); sc.ok("snapshot_delete", name="k1"); del sc.expected["k1"]; gc(after_delete=True)


def _delete_no_child(sc, gc):
    """s1; revert to s1 keeping k1; delete k1 (a leaf image: no child)."""
    sc.write(); sc.create("s1"); gc()
    sc.write()
    sc.ok("snapshot_revert", name="s1", keep_current="k1")
    sc.activate()                          # LVHD: k1's VDI inactive, as SM leaves it
    sc.expected["k1"] = sc.blktap.read(sc.images()["k1"])
    gc()
    sc.ok("snapshot_delete", name="k1"); del sc.expected["k1"]; gc(after_delete=True)


def _revert(sc, gc):
    """s1, s2; revert to s1 (no state kept); write; revert to s2."""
    sc.write(); sc.create("s1"); gc()
    sc.write(); sc.create("s2"); gc()
    sc.write(); sc.ok("snapshot_revert", name="s1"); gc()
    sc.write(); sc.ok("snapshot_revert", name="s2"); gc()


def _create_two(sc, gc):
    """s1, then s2."""
    sc.write(); sc.create("s1"); gc()
    sc.write(); sc.create("s2"); gc()


@pytest.mark.parametrize("sr_kind", ["file", "lvhd"])
@pytest.mark.parametrize("ops", [_create_two, _delete_one_child, _delete_two_children,
                                 _delete_no_child, _revert], ids=lambda f: f.__name__[1:])
def test_every_operation_then_sms_gc(request, sr_kind, ops):
    """Each operation sequence on a file SR and on LVHD, SM's full GC pass after every
    operation (``Scenario.gc_and_check``)."""
    sc = request.getfixturevalue("scenario" if sr_kind == "file" else "lvhd_scenario")
    ops(sc, sc.gc_and_check)


def test_file_sr_online_delete_newest_without_leaf_coalesce(scenario):
    scenario.world.xapi.record("SR", scenario.sr)["other_config"]["leaf-coalesce"] = "false"
    scenario.start()
    _delete_newest(scenario, scenario.gc_and_check)


def test_file_sr_without_leaf_coalesce_offline_results_survive(scenario):
    """With SM's leaf-coalesce switched off on the SR (``other-config:leaf-coalesce=false``,
    SM's own switch), what livesnap leaves after offline operations (a revert that keeps the
    current state, deletes with two children and then one) survives SM's GC: each snapshot
    reads as taken, the disk as written. This is the harness passing on livesnap's layout."""
    scenario.world.xapi.record("SR", scenario.sr)["other_config"]["leaf-coalesce"] = "false"
    _delete_two_children(scenario, scenario.gc_and_check)


@pytest.fixture
def lvhd_scenario(world, blktap, sm, lvm_vg):
    sr = world.add_lvm_sr(lvm_vg)
    sc = Scenario(world, blktap, sm, sr)
    sm.lvhd_init(sr)
    world.xapi.scanner = sm.scan
    return sc


def _sm_layout_lvhd(world, blktap, sr, vg, depth):
    """As ``_sm_layout`` on an LVHD SR, the steps of SM's LVHDSR._snapshot: the leaf's LV
    renamed to the base copy's name, a new full-size LV for the leaf, ``vhd-util snapshot
    -S 2097152`` (the 2 TiB metadata reserve), the base hidden and its LV read-only. Parent
    locators are what libvhd writes: relative to the /dev/mapper names."""
    from livesnap.tools import lvm
    x = world.xapi
    leaf_uuid = str(uuid.uuid4())
    full = lvm.full_size(SIZE)

    def path(u):
        return "/dev/%s/VHD-%s" % (vg.name, u)
    lvm.lvcreate(vg.name, "VHD-" + leaf_uuid, full)
    blktap.vhd("create", "-n", path(leaf_uuid), "-s", SIZE // MiB, "-S", 2097152)
    bases = []
    for i in range(depth):
        blktap.write(path(leaf_uuid), i * MiB, MiB // 2, 0x11 * (i + 1))
        b = str(uuid.uuid4())
        lvm.lvrename(vg.name, "VHD-" + leaf_uuid, "VHD-" + b)
        lvm.lvcreate(vg.name, "VHD-" + leaf_uuid, full)
        blktap.vhd("snapshot", "-n", path(leaf_uuid), "-p", path(b), "-S", 2097152)
        blktap.vhd("set", "-n", path(b), "-f", "hidden", "-v", "1")
        lvm.set_readonly(vg.name, "VHD-" + b)
        bases.append(b)
    blktap.write(path(leaf_uuid), 3 * MiB, MiB, 0x77)
    ref = smmod.records_as_sm(x, sr, SIZE, leaf_uuid, bases)
    return ref, bases, blktap.read(path(leaf_uuid))


def test_control_lvhd_sm_layout_gc_coalesces_base_copies(world, blktap, sm, lvm_vg):
    """SM's own LVHD layout (leaf over two hidden base copies on LVs, locators relative to
    the /dev/mapper names): SM's GC on LVHD (activation with refcounts, inflate/deflate
    with its journal LV, vhd-util coalesce, relink, leaf-coalesce with LV renames, MGT
    update) leaves one LV, the leaf's, reading the same through the real tapdisk."""
    from testxen import lvm as standin
    x = world.xapi
    sr = world.add_lvm_sr(lvm_vg)
    ref, bases, before = _sm_layout_lvhd(world, blktap, sr, lvm_vg, 2)
    sm.lvhd_init(sr)
    leaf_uuid = x.record("VDI", ref)["uuid"]
    scan = sm.scan(sr)                      # LVHDSR._loadvdis
    assert scan[leaf_uuid]["parent"] == bases[1] and scan[leaf_uuid]["hidden"] is False
    assert scan[bases[0]]["hidden"] is True and scan[bases[0]]["read_only"] is True
    view = sm.classify(sr)
    assert view["coalesceable"] == [bases[1]], view
    assert view["leaf_coalesceable"] == [leaf_uuid] and view["garbage"] == [], view

    after = sm.gc(sr)
    assert after["vdis"] == {leaf_uuid: {"parent": None, "hidden": False, "children": [],
                                         "scan_error": False}}, (after, sm.log()[-3000:])
    assert after["coalesceable"] == after["leaf_coalesceable"] == after["garbage"] == []
    assert sorted(standin.Vg(os.environ["TESTXEN_LVM_ROOT"]).loops()) == \
        sorted(["MGT", "VHD-" + leaf_uuid])            # no journal LV, no base copy left
    sc = Scenario.__new__(Scenario)
    sc.world, sc.sr = world, sr
    sc.activate()
    path = x.vdi_path(ref)
    assert blktap.check(path) is None
    assert blktap.read(path) == before
    assert {rec["uuid"] for rec in x.objects["VDI"].values()} == {leaf_uuid}
    assert "vhd-parent" not in x.record("VDI", ref)["sm_config"]


def test_lvhd_devices_as_on_a_host(blktap, lvm_vg):
    """The LVM stand-in's layout is the dom0 one libvhd expects: /dev/VG/LV links to the
    /dev/mapper node (dm's name), a child made by the real vhd-util carries the locator SM's
    children carry (./VG_XenStorage--<sr>-VHD--<uuid>) and resolves, and vhd-util scan -l
    (SM's LVHD scan) reads LVs without a device too, as it reads them from the PV on a host."""
    from livesnap.tools import lvm
    vg = lvm_vg.name
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    for u in (a, b):
        lvm.lvcreate(vg, "VHD-" + u, lvm.full_size(SIZE))
    pa, pb = "/dev/%s/VHD-%s" % (vg, a), "/dev/%s/VHD-%s" % (vg, b)
    node = "/dev/mapper/%s-VHD--%s" % (vg.replace("-", "--"), a.replace("-", "--"))
    assert os.readlink(pa) == node
    assert os.stat(node).st_rdev == os.stat(lvm_vg.loops()["VHD-" + a]).st_rdev
    blktap.vhd("create", "-n", pa, "-s", SIZE // MiB)
    blktap.vhd("snapshot", "-n", pb, "-p", pa)
    assert blktap.parent(pb) == node
    assert "./" + os.path.basename(node) in blktap.vhd("read", "-p", "-n", pb).stdout
    assert blktap.check(pb) is None
    for u in (a, b):
        lvm.activate(vg, "VHD-" + u, False)
    assert not os.path.exists(pa) and not os.path.exists(node)
    out = blktap.vhd("scan", "-f", "-m", "VHD-*", "-l", vg).stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines()}
    assert "parent=VHD-%s" % a in lines["vhd=VHD-%s" % b], out
    lvm.lvrename(vg, "VHD-" + a, "VHD-x")
    assert not os.path.exists(node)


def test_file_sr_snapshot_vdis_in_xapis_model(scenario):
    """What XenCenter and ``xe snapshot-list`` read of the disks: the snapshot's VDI has
    is_a_snapshot and snapshot_of the VM's VDI, and in SM's own scan every visible VDI is a
    leaf, every parent a hidden base copy."""
    sc = scenario
    x = sc.world.xapi
    sc.write()
    r = sc.ok("snapshot_create", name="s1")
    image_uuid = os.path.basename(r["disks"][0]["image"])[:-len(".vhd")]
    disk_ref, = [ref for ref, rec in x.objects["VDI"].items()
                 if rec["uuid"] == os.path.basename(sc.disk)[:-len(".vhd")]]
    scan = sc.sm.scan(sc.sr)
    visible_parents = {v["parent"] for v in scan.values() if v["parent"]}
    assert visible_parents and not [u for u in visible_parents if not scan[u]["hidden"]], scan
    snap_vdi, = [rec for rec in x.objects["VDI"].values() if rec["uuid"] == image_uuid]
    assert snap_vdi["is_a_snapshot"] is True and snap_vdi["snapshot_of"] == disk_ref
    assert snap_vdi["snapshot_time"] != "19700101T00:00:00Z"
    assert snap_vdi["uuid"] in {x.record("VDI", ref)["uuid"]
                                for ref in x.record("VDI", disk_ref)["snapshots"]}


def test_file_sr_vm_snapshot_record(scenario):
    """What XenCenter's Snapshots tab and ``xe snapshot-list`` read: a VM snapshot record
    (is_a_snapshot, snapshot_of the VM, Halted) whose one disk VBD names the snapshot's VDI,
    the VDI XAPI marks a snapshot of the VM's; SM's GC pass leaves both."""
    sc = scenario
    x = sc.world.xapi
    sc.write()
    sc.create("s1")
    image_uuid = os.path.basename(sc.images()["s1"])[:-len(".vhd")]
    vms = [(ref, rec) for ref, rec in x.objects["VM"].items()
           if rec["is_a_snapshot"] and rec["snapshot_of"] == sc.vm.ref]
    assert len(vms) == 1, "no VM snapshot record"
    ref, rec = vms[0]
    assert rec["name_label"] == "s1" and rec["power_state"] == "Halted"
    assert rec["other_config"]["livesnap_snapshot"] == "s1"
    assert x.record("VM", sc.vm.ref)["snapshots"] == [ref]
    vbds = [x.record("VBD", v) for v in rec["VBDs"]]
    assert [(v["type"], v["userdevice"], x.record("VDI", v["VDI"])["uuid"]) for v in vbds] \
        == [("Disk", "0", image_uuid)]
    snap_vdi = x.record("VDI", vbds[0]["VDI"])
    assert snap_vdi["is_a_snapshot"] and snap_vdi["snapshot_of"] in [
        x.record("VBD", v)["VDI"] for v in x.record("VM", sc.vm.ref)["VBDs"]]
    listed, = sc.ok("snapshot_list")["snapshots"]
    assert listed["xapi_snapshot"] == rec["uuid"]
    sc.gc_and_check()
    assert x.record("VM", ref)["VBDs"] == rec["VBDs"]
    assert x.record("VBD", rec["VBDs"][0])["VDI"] in x.objects["VDI"]

# -- the fold: a base copy merged into the running leaf at once ---------------------------------

BIG = 32 * MiB


def _fold_vm(world, blktap, sr):
    """A halted VM with one 32 MiB disk on ``sr``; s1 taken offline over 8 MiB of data, then
    12 MiB more written into the leaf (more than the fold's 4 MiB for its last pause), all
    past the guest writer's ring (its records sit in the first 8 MiB)."""
    vm = world.add_vm(ndisks=1, sr=sr, size=BIG)
    disk = vm.paths["xvda"]
    blktap.write(disk, 8 * MiB, 8 * MiB, 0x31)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    blktap.write(disk, 12 * MiB, 12 * MiB, 0x32)
    return vm, disk


def _fold_sr(request, world, sm, kind):
    """An SR of ``kind`` whose SR.scan is SM's own."""
    world.xapi.scanner = sm.scan
    if kind == "ext":
        return world.sr
    sr = world.add_lvm_sr(request.getfixturevalue("lvm_vg"))
    sm.lvhd_init(sr)
    return sr


def _only_image(world, sr, disk):
    sc = Scenario.__new__(Scenario)
    sc.world, sc.sr = world, sr
    sc.activate()
    images = world.xapi.sr_images(sr)
    assert list(images.values()) == [disk], images
    q = txblktap.query(disk)
    assert q["parent"] is None and q["hidden"] == 0, q


@pytest.mark.parametrize("kind", ["ext", "lvm"])
def test_online_delete_folds_the_base_into_the_running_leaf(request, world, blktap, sm, kind):
    """Deleting the only snapshot of a running VM (its base copy's one child: the leaf the
    guest writes): the base is merged into the leaf at once, in rounds of short pauses and
    one last pause for the leaf's few blocks, leaving one image at the VM's path (SM's end
    state: nothing to coalesce); every acknowledged guest write and every byte written
    before is there."""
    sr = _fold_sr(request, world, sm, kind)
    vm, disk = _fold_vm(world, blktap, sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    assert len(world.xapi.sr_images(sr)) == 3              # base, face, leaf
    vm.start()
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert r["action"] == "merged" and r["datapath"] == "tapdisk"
    merge, = r["merges"]
    assert merge["method"] == "fold" and merge["rounds"] >= 1, r
    # each round: a pause to freeze the leaf, one to point it at the base; then the last
    assert len(r["pauses"]) == 2 * merge["rounds"] + 1, r
    assert r["pause_ms"] == max(p["ms"] for p in r["pauses"])
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    vm.stop()                                   # every acknowledged write is in the disk
    _only_image(world, sr, disk)
    assert txblktap.read(disk, 8 * MiB, 24 * MiB) == expected
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view


@pytest.mark.parametrize("kind,fault", [
    ("ext", "tapdisk:renamed:0"), ("ext", "tapdisk:folded:0"),
    ("lvm", "tapdisk:renamed:0"), ("lvm", "tapdisk:folded:0"), ("lvm", "lvm:inflated:0"),
    ("ext", "merge:reparented:0"), ("lvm", "merge:reparented:0")])
def test_fold_killed_anywhere_then_recover(request, world, blktap, sm, kind, fault):
    """The plugin killed inside a fold (in a round's freeze pause, in the last pause before
    the rename, while the base is inflated for a round's merge): ``recover`` finishes the
    fold: one image at the VM's path holding the guest's acknowledged writes and the earlier
    data, the tapdisk unpaused and serving."""
    import subprocess
    import xmlrpc.client
    from conftest_paths import PLUGIN
    from livesnap.tools import tap_ctl
    sr = _fold_sr(request, world, sm, kind)
    vm, disk = _fold_vm(world, blktap, sr)
    expected = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid,
                                                                      "name": "s1"}),
                                                    methodname="snapshot_delete")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(LIVESNAP_FAULT=fault), timeout=120)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["op"] == "delete", r
    td = tap_ctl.find(disk)
    assert td is not None and not (td.state or 0) & tap_ctl.PAUSED
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    vm.stop()
    _only_image(world, sr, disk)
    assert txblktap.read(disk, 8 * MiB, 24 * MiB) == expected
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == [], view
