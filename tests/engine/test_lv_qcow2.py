"""qcow2 images on logical volumes (a ``type='block'`` disk on ``/dev/<vg>/<lv>``), as
Proxmox VE 9 and oVirt keep them: each snapshot's overlay a new thick LV in the same VG,
merged-away LVs removed with lvremove, no space refused before any change, a raw LV still
named unsupported. Shut-off domains (qemu-img); the LVM stand-in (real LVM metadata, loop
devices as the LVs' block devices)."""
import hashlib
import os
import sqlite3
import subprocess
import sys
import uuid

import pytest

from helpers import Cli, chain_digest, qemu_img, qemu_io_write

MiB = 1 << 20
DISK = 8 * MiB


def lvm(vg, *args):
    """The stand-in's LVM, as livesnap runs it."""
    import subprocess
    return subprocess.run([os.environ["LVM"]] + [str(a) for a in args], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout


def lvs(vg):
    """{lv name: (size, [tags])} of the VG."""
    out = lvm(vg, "lvs", "--noheadings", "--units", "b", "--nosuffix", "--separator", "|",
              "-o", "lv_name,lv_size,lv_tags", vg)
    rows = {}
    for line in out.splitlines():
        if line.strip():
            name, size, tags = line.strip().split("|")
            rows[name] = (int(size), [t for t in tags.split(",") if t])
    return rows


def new_lv(vg, name, size=32 * MiB):
    lvm(vg, "lvcreate", "-n", name, "-L", "%db" % size, vg)
    return "/dev/%s/%s" % (vg, name)


def lv_digest(dev):
    """sha256 of an LV's bytes, read from the stand-in's sparse data file behind its loop
    device (the loop's backing_file): each 64 KiB block holding a non-zero byte, with its
    offset, found through the file's data extents (SEEK_DATA), so a filler LV of gigabytes
    costs nothing. Two LVs of equal bytes digest the same whatever their holes. The device
    is flushed first (a write still in its page cache is not yet in the file)."""
    fd = os.open(dev, os.O_RDONLY)       # the device's dirty pages go to the loop's file first
    try:
        os.fsync(fd)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    with open("/sys/dev/block/%d:%d/loop/backing_file"
              % (os.major(st.st_rdev), os.minor(st.st_rdev))) as f:
        backing = f.read().strip()
    block = 64 * 1024
    h = hashlib.sha256()
    with open(backing, "rb") as f:
        fd = f.fileno()
        end = os.fstat(fd).st_size
        off = 0
        while off < end:
            try:
                data = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:                 # ENXIO: no data past off
                break
            off = data - data % block
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            while off < hole:
                f.seek(off)
                chunk = f.read(block)
                if chunk.strip(b"\0"):
                    h.update(b"%d:" % off)
                    h.update(chunk)
                off += block
    return h.hexdigest()


class LvDom(Cli):
    """A shut-off domain whose disks are qcow2 images on LVs of ``vg`` (vda over a base
    LV, so its chain has two LVs; vdb a file beside them when ``file_disk``)."""

    def __init__(self, conn, tmp_path, vg, file_disk=False, extra_xml=""):
        self.conn, self.vg = conn, vg
        self.state_dir = str(tmp_path / "state")
        self.name = "lsl-" + uuid.uuid4().hex[:8]
        base = new_lv(vg, "%s-vda-base" % self.name)
        qemu_img("create", "-q", "-f", "qcow2", base, DISK)
        qemu_io_write(base, 0xB0, 0, 64 * 1024)
        top = new_lv(vg, "%s-vda" % self.name)
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
        disks = ("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/>"
                 "<source dev='%s'/><target dev='vda' bus='virtio'/></disk>" % top)
        if file_disk:
            os.makedirs(str(tmp_path / "images"))
            f = str(tmp_path / "images" / "vdb.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", f, DISK)
            disks += ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                      "<source file='%s'/><target dev='vdb' bus='virtio'/></disk>" % f)
        self.dom = conn.defineXML(
            "<domain type='qemu'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>%s%s</devices>"
            "</domain>" % (self.name, disks, extra_xml))

    def disks(self):
        """{target: (disk type, source path)} of the persistent definition."""
        from lxml import etree
        root = etree.fromstring(self.dom.XMLDesc(2))
        out = {}
        for d in root.findall("./devices/disk"):
            s = d.find("source")
            out[d.find("target").get("dev")] = (d.get("type"), s.get("dev") or s.get("file"))
        return out

    def source(self, target="vda"):
        return self.disks()[target][1]

    def write(self, pattern, offset, length=64 * 1024, target="vda"):
        qemu_io_write(self.source(target), pattern, offset, length)

    def digest(self, target="vda"):
        return chain_digest(self.source(target))

    def fingerprint(self):
        """What an operation could change: the VG's LVs with their bytes, the definition,
        the catalog's rows."""
        lv = {}
        for name, (size, tags) in sorted(lvs(self.vg).items()):
            lv[name] = (size, tags, lv_digest("/dev/%s/%s" % (self.vg, name)))
        catalog = {}
        if os.path.isdir(self.state_dir):
            for f in sorted(os.listdir(self.state_dir)):
                if f.endswith(".db"):
                    db = sqlite3.connect(os.path.join(self.state_dir, f))
                    rows = [line for line in db.iterdump()
                            if line.startswith("INSERT") and '"meta"' not in line]
                    db.close()
                    if rows:
                        catalog[f] = rows
        return {"lvs": lv, "xml": self.dom.XMLDesc(2), "catalog": catalog}

    def images(self, name):
        snaps = {s["name"]: s for s in self.json("snapshot-list", self.name)["snapshots"]}
        return {d["target"]: d["image"] for d in snaps[name]["disks"]}

    def destroy(self):
        try:
            import libvirt
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except Exception:
            pass


@pytest.fixture
def make_lv_dom(conn, tmp_path, kvm_lvm_vg):
    made = []

    def make(**kw):
        d = LvDom(conn, tmp_path / ("d%d" % len(made)), kvm_lvm_vg.name, **kw)
        made.append(d)
        return d
    yield make
    for d in made:
        d.destroy()


def full_lv_size(virtual):
    import json
    m = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "--size", virtual))
    return -(-m["fully-allocated"] // (4 * MiB)) * (4 * MiB)


def test_create_makes_a_thick_tagged_lv_per_snapshot_and_switches_the_disk(make_lv_dom):
    dom = make_lv_dom()
    dom.write(1, 0)
    before = dom.digest()
    dom.json("snapshot-list", dom.name)
    unchanged = dom.fingerprint()
    dry = dom.json("snapshot-create", dom.name, "s1", "--dry-run")          # changes nothing
    assert dry["steps"][0]["items"][0]["leaf_path"] == \
        "/dev/%s/%s-vda.s1.qcow2" % (dom.vg, dom.name)
    assert dom.fingerprint() == unchanged
    r = dom.json("snapshot-create", dom.name, "s1")
    leaf = "/dev/%s/%s-vda.s1.qcow2" % (dom.vg, dom.name)
    assert r["disks"] == [{"target": "vda", "image": "/dev/%s/%s-vda" % (dom.vg, dom.name),
                           "format": "qcow2"}]
    assert dom.disks()["vda"] == ("block", leaf)
    size, tags = lvs(dom.vg)["%s-vda.s1.qcow2" % dom.name]
    assert tags == ["livesnap"] and size == full_lv_size(DISK)
    info = qemu_img("info", "-U", "--output=json", leaf)
    assert '"backing-filename": "/dev/%s/%s-vda"' % (dom.vg, dom.name) in info
    assert dom.digest() == before                   # the new overlay reads the same
    dom.write(2, 65536)
    assert chain_digest(r["disks"][0]["image"]) == before       # the snapshot does not move
    chk = dom.json("check", dom.name, expect=None)
    assert chk["ok"], chk["problems"]


def test_a_snapshot_name_lvm_does_not_take_is_made_lvm_safe(make_lv_dom):
    dom = make_lv_dom()
    dom.json("snapshot-create", dom.name, "v1@night")             # '@': not in LV names
    assert dom.source() == "/dev/%s/%s-vda.v1_night.qcow2" % (dom.vg, dom.name)
    dom.json("snapshot-create", dom.name, "v1_night")             # the same LV name: -2
    assert dom.source() == "/dev/%s/%s-vda.v1_night-2.qcow2" % (dom.vg, dom.name)
    assert dom.json("check", dom.name, expect=None)["ok"]


def _chain(dom, n):
    """Snapshots s1..sn, each over writes of its own; {name: digest of its image}."""
    seen = {}
    for i in range(1, n + 1):
        dom.write(i, (i % 4) * 65536)
        dom.json("snapshot-create", dom.name, "s%d" % i)
        seen["s%d" % i] = chain_digest(dom.images("s%d" % i)["vda"])
    dom.write(0x77, 5 * 65536)
    return seen


def _assert_snapshots_read(dom, seen):
    for name, digest in seen.items():
        assert chain_digest(dom.images(name)["vda"]) == digest, name
    chk = dom.json("check", dom.name, expect=None)
    assert chk["ok"], chk["problems"]


@pytest.mark.parametrize("big", ["child", "snapshot"])
def test_delete_with_one_child_merges_and_lvremoves_the_lv_merged_away(make_lv_dom, big):
    """One child: commit (small child) or pull (big child); the LV merged away is gone, the
    other snapshots and the disk read as before."""
    dom = make_lv_dom()
    seen = _chain(dom, 2)
    if big == "child":                  # the active image over s2 holds much: pull
        for i in range(8):
            dom.write(0x40 + i, i * 65536)
    else:
        pass                            # a small active child: commit
    live = dom.digest()
    s1 = dom.images("s1")["vda"]
    leaf = dom.source()
    r = dom.json("snapshot-delete", dom.name, "s2")
    assert r["merges"] and r["merges"][0]["method"] == ("pull" if big == "child" else "commit")
    # pull: the snapshot's image goes, the leaf stays; commit: the leaf goes into it
    gone = r["merges"][0]["snapshot_image"] if big == "child" else leaf
    assert dom.source() == (leaf if big == "child" else r["merges"][0]["snapshot_image"])
    assert dom.disks()["vda"][0] == "block"
    del seen["s2"]
    assert dom.digest() == live
    assert chain_digest(s1) == seen["s1"]
    names = lvs(dom.vg)
    assert os.path.basename(gone) not in names and not os.path.exists(gone)
    assert os.path.basename(dom.source()) in names
    _assert_snapshots_read(dom, seen)


def _hold(paths, seconds):
    """A process that opens ``paths`` read-only for ``seconds`` (as an LVM scan or blkid
    does, briefly); returns once they are open."""
    code = ("import sys, time\nfs = [open(p, 'rb') for p in sys.argv[2:]]\n"
            "print('open', flush=True)\ntime.sleep(float(sys.argv[1]))\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(seconds)] + list(paths),
                         stdout=subprocess.PIPE, universal_newlines=True)
    assert p.stdout.readline().strip() == "open"
    return p


def test_an_lv_opened_briefly_by_another_process_is_removed_once_it_is_closed(make_lv_dom):
    """Any LVM command on the host opens every block device for a moment (its PV label
    scan), as blkid does: a delete whose LV is held so, offline, waits for it instead of
    failing; one held for longer is refused, the LV kept, and recover removes it later."""
    dom = make_lv_dom()
    _chain(dom, 2)
    before = set(lvs(dom.vg))
    holder = _hold(["/dev/%s/%s" % (dom.vg, lv) for lv in before], 1.0)
    try:
        r = dom.json("snapshot-delete", dom.name, "s2")
    finally:
        holder.wait()
    gone = before - set(lvs(dom.vg))
    assert len(gone) == 1 and r["action"] in ("deleted", "merged"), (r, gone)
    before = set(lvs(dom.vg))
    holder = _hold(["/dev/%s/%s" % (dom.vg, lv) for lv in before], 60)
    try:
        proc = dom.cli("snapshot-delete", dom.name, "s1", expect=None)
        assert proc.returncode != 0 and "still open in process %d" % holder.pid \
            in proc.stderr, proc.stderr
        assert set(lvs(dom.vg)) == before
    finally:
        holder.kill()
        holder.wait()
    dom.json("recover", dom.name)
    assert len(before - set(lvs(dom.vg))) == 1
    assert [s["name"] for s in dom.json("snapshot-list", dom.name)["snapshots"]] == []


def test_delete_with_no_child_and_two_children_then_revert(make_lv_dom):
    """Revert makes a new LV leaf; a snapshot without children loses its LV at once; one
    with two children is hidden, its LV kept until one child is left, then merged."""
    dom = make_lv_dom()
    seen = _chain(dom, 2)
    old_leaf = dom.source()
    r = dom.json("snapshot-revert", dom.name, "s1")
    leaf = dom.source()
    assert leaf == "/dev/%s/%s-vda.revert-s1.qcow2" % (dom.vg, dom.name)
    assert dom.disks()["vda"][0] == "block"
    assert lvs(dom.vg)[os.path.basename(leaf)][1] == ["livesnap"]
    assert not os.path.exists(old_leaf)             # the old leaf discarded: lvremoved
    assert dom.digest() == seen["s1"]
    s2 = dom.images("s2")["vda"]
    dom.json("snapshot-delete", dom.name, "s2")     # no child: removed now
    assert os.path.basename(s2) not in lvs(dom.vg)
    del seen["s2"]
    dom.write(0x55, 0)
    seen["s3"] = None
    dom.json("snapshot-create", dom.name, "s3")
    seen["s3"] = chain_digest(dom.images("s3")["vda"])
    dom.json("snapshot-revert", dom.name, "s1")     # s1 has two children now
    s1 = dom.images("s1")["vda"]
    r = dom.json("snapshot-delete", dom.name, "s1")
    assert r["merges"] == [] and os.path.exists(s1)          # hidden: its LV kept
    del seen["s1"]
    _assert_snapshots_read(dom, seen)
    live = dom.digest()
    dom.json("snapshot-delete", dom.name, "s3")     # s1's image down to one child: merged
    del seen["s3"]
    assert dom.digest() == live
    tree_lvs = set(lvs(dom.vg))
    listing = dom.json("snapshot-list", dom.name, "--all")
    assert listing["snapshots"] == []
    # every LV left is one the disk's chain reads
    chain = qemu_img("info", "--backing-chain", "-U", "--output=json", dom.source())
    for name in tree_lvs:
        assert name in chain, (name, tree_lvs)
    _assert_snapshots_read(dom, seen)


def test_the_lv_digest_sees_every_byte_and_no_hole(kvm_lvm_vg):
    """The fingerprint's LV digest (read through the sparse file behind the loop device):
    one byte changed anywhere (still in the device's page cache) changes it; the byte put
    back, or zeros written over a hole, do not."""
    dev = new_lv(kvm_lvm_vg.name, "digest", 16 * MiB)
    empty = lv_digest(dev)
    fd = os.open(dev, os.O_RDWR)
    try:
        seen = {empty}
        for off in (0, 5 * MiB + 12345, 16 * MiB - 1):
            os.pwrite(fd, b"\x01", off)               # in the page cache: the digest flushes
            d = lv_digest(dev)
            assert d not in seen, off
            seen.add(d)
            os.pwrite(fd, b"\0", off)
            assert lv_digest(dev) == empty, off
        os.pwrite(fd, b"\0" * MiB, 9 * MiB)             # zeros over a hole: same bytes
        assert lv_digest(dev) == empty
    finally:
        os.close(fd)


def test_no_space_in_the_vg_is_refused_before_any_change(make_lv_dom):
    dom = make_lv_dom()
    from livesnap.tools import lvm as lvm_tool
    free = lvm_tool.vg_free(dom.vg)
    # leave less than one thick overlay's worth (about 12 MiB for an 8 MiB disk)
    new_lv(dom.vg, "filler", free - 4 * MiB)
    dom.json("snapshot-list", dom.name)             # the catalog exists before
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "s1", expect=1)
    assert "not enough space" in proc.stderr and "/dev/%s" % dom.vg in proc.stderr, proc.stderr
    assert dom.fingerprint() == before


def test_a_merge_that_would_overflow_a_small_lv_grows_it_or_is_refused(make_lv_dom):
    """A user's LV smaller than its qcow2's full size (thin, as oVirt makes them): a merge
    into it grows it to its full size first (offline), and one that cannot be grown for lack
    of space in the VG is refused with nothing changed."""
    dom = make_lv_dom()
    from livesnap.tools import lvm as lvm_tool
    base = "/dev/%s/%s-vda-base" % (dom.vg, dom.name)
    top = dom.source()
    # a thin LV: the vda image on an LV of 4 MiB, holding a qcow2 of 8 MiB virtual
    small = new_lv(dom.vg, "%s-vda-thin" % dom.name, 4 * MiB)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", small)
    xml = dom.dom.XMLDesc(2).replace(top, small)
    dom.dom = dom.conn.defineXML(xml)
    for i in range(3):                                  # 3 MiB in the 4 MiB LV
        dom.write(0x10 + i, i * MiB, MiB)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write(0x20, 4 * MiB, MiB)                       # 1.5 MiB over it: commit, which
    dom.write(0x21, 5 * MiB, MiB // 2)                  # would overflow the LV
    live = dom.digest()
    filler = new_lv(dom.vg, "filler", lvm_tool.vg_free(dom.vg) - 4 * MiB)
    before = dom.fingerprint()
    proc = dom.cli("snapshot-delete", dom.name, "s1", expect=1)
    assert "not enough space" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before
    lvm(dom.vg, "lvremove", "-f", filler)
    # the domain running (the LV open in QEMU, which would not see it grow): refused even
    # with room in the VG
    import types
    from livesnap.datapaths.lv_images import LvTooSmall
    from livesnap.engine import space
    plan = types.SimpleNamespace(steps=dom.json("snapshot-delete", dom.name, "s1",
                                                "--dry-run")["steps"])
    with pytest.raises(LvTooSmall) as e:
        space.preflight(plan, live=True)
    assert small in str(e.value) and "shut the domain down" in str(e.value)
    space.preflight(plan, live=False)
    r = dom.json("snapshot-delete", dom.name, "s1")
    assert r["merges"][0]["method"] == "commit"
    assert dom.source() == small and dom.digest() == live
    assert lvs(dom.vg)[os.path.basename(small)][0] == full_lv_size(DISK)
    assert dom.json("check", dom.name, expect=None)["ok"]


def test_a_killed_create_leaves_no_lv_unaccounted(make_lv_dom):
    """Killed right after the overlay's LV was made: the journal names it, so recover
    finishes the create on it (or takes it back and removes the LV); every LV is then one
    the catalog knows, and ``check`` finds nothing left over."""
    dom = make_lv_dom()
    dom.json("snapshot-list", dom.name)
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "s1",
                   env_extra={"LIVESNAP_FAULT": "lvm:created:0"}, expect=None)
    assert proc.returncode != 0
    assert "%s-vda.s1.qcow2" % dom.name in lvs(dom.vg)         # made, then killed
    chk = dom.json("check", dom.name, expect=None)
    assert not chk["ok"] and "recover" in " ".join(chk["problems"])
    dom.json("recover", dom.name)
    after = dom.fingerprint()
    snaps = dom.json("snapshot-list", dom.name)["snapshots"]
    if after["xml"] == before["xml"]:                    # "before"
        assert after["lvs"] == before["lvs"] and snaps == []
    else:                                                # "after"
        assert [s["name"] for s in snaps] == ["s1"]
        assert dom.source() == "/dev/%s/%s-vda.s1.qcow2" % (dom.vg, dom.name)
        assert set(after["lvs"]) == set(before["lvs"]) | {os.path.basename(dom.source())}
    chk = dom.json("check", dom.name, expect=None)
    assert chk["ok"], chk["problems"]
    dom.json("snapshot-create", dom.name, "s2")
    assert dom.source().endswith("-vda.s2.qcow2")


def test_an_lv_named_as_livesnap_names_its_images_is_found_by_check(make_lv_dom):
    dom = make_lv_dom()
    dom.json("snapshot-create", dom.name, "s1")
    stray = new_lv(dom.vg, "%s-vda.stray.qcow2" % dom.name, 4 * MiB)
    chk = dom.json("check", dom.name, expect=None)
    assert any(stray in p and "does not know it" in p for p in chk["problems"]), chk


def test_a_foreign_lv_at_a_new_image_name_is_neither_reused_nor_removed(make_lv_dom,
                                                                        tmp_path):
    """An LV without livesnap's tag made at the new overlay's name between the plan and the
    step (the create waits at its first step while another tool makes it): the create is
    refused and rolled back, the LV left as it was, with its data."""
    import subprocess
    import sys
    import time
    from helpers import ROOT
    dom = make_lv_dom()
    dom.json("snapshot-list", dom.name)
    xml = dom.dom.XMLDesc(2)
    reached, release = str(tmp_path / "reached"), str(tmp_path / "release")
    env = dict(dom.env(), LIVESNAP_FAULT="create:before:0:wait",
               LIVESNAP_FAULT_REACHED=reached, LIVESNAP_FAULT_RELEASE=release)
    proc = subprocess.Popen([sys.executable, "-m", "livesnap", "snapshot-create", dom.name,
                             "s1"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(reached):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        planted = new_lv(dom.vg, "%s-vda.s1.qcow2" % dom.name, 16 * MiB)
        with open(planted, "r+b") as f:
            f.write(b"user data")
    finally:
        open(release, "w").close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "not a file livesnap made" in err, (out, err)
    assert "without livesnap's tag" in err
    with open(planted, "rb") as f:
        assert f.read(9) == b"user data"
    assert lvs(dom.vg)[os.path.basename(planted)] == (16 * MiB, [])
    assert dom.dom.XMLDesc(2) == xml
    assert dom.json("snapshot-list", dom.name)["snapshots"] == []


def test_a_raw_lv_is_still_named_unsupported(make_lv_dom, kvm_lvm_vg):
    raw = new_lv(kvm_lvm_vg.name, "rawdisk", 8 * MiB)
    dom = make_lv_dom(extra_xml="<disk type='block' device='disk'><driver name='qemu' "
                                "type='raw'/><source dev='%s'/><target dev='vdc' "
                                "bus='virtio'/></disk>" % raw)
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "s1", expect=1)
    assert "vdc (raw block device" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before
    r = dom.json("snapshot-create", dom.name, "s1", "--skip-unsupported")
    assert [d["target"] for d in r["disks"]] == ["vda"]
    assert r["skipped"] == [{"target": "vdc", "reason": "raw block device (livesnap "
                                                        "snapshots qcow2 images only)"}]


def test_qcow2_on_a_block_device_that_is_not_an_lv_is_named(make_lv_dom, kvm_lvm_vg):
    """A qcow2 on a block device outside /dev/<vg>/ (a /dev/mapper node, a loop device) is
    not taken for an LV: named, with the reason."""
    loop = os.path.realpath(new_lv(kvm_lvm_vg.name, "other", 8 * MiB))
    dom = make_lv_dom(extra_xml="<disk type='block' device='disk'><driver name='qemu' "
                                "type='qcow2'/><source dev='%s'/><target dev='vdc' "
                                "bus='virtio'/></disk>" % loop)
    proc = dom.cli("snapshot-create", dom.name, "s1", expect=1)
    assert "vdc (qcow2 on a block device that is not a logical volume" in proc.stderr, \
        proc.stderr


def test_storage_dir_bounds_the_vgs_livesnap_may_use(make_lv_dom, tmp_path):
    dom = make_lv_dom(file_disk=True)
    images = str(tmp_path / "d0" / "images")
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "s1", "--storage-dir", images, expect=1)
    assert "outside" in proc.stderr and "/dev/%s/" % dom.vg in proc.stderr, proc.stderr
    assert dom.fingerprint() == before
    r = dom.json("snapshot-create", dom.name, "s1", "--storage-dir", images,
                 "--storage-dir", "/dev/%s" % dom.vg)
    assert sorted(d["target"] for d in r["disks"]) == ["vda", "vdb"]
    assert dom.disks()["vda"] == ("block", "/dev/%s/%s-vda.s1.qcow2" % (dom.vg, dom.name))
    assert dom.disks()["vdb"][0] == "file"


def test_an_lv_name_lvm_keeps_for_itself_is_refused_before_any_change(make_lv_dom):
    """A snapshot name that would put a part LVM reserves (``_tmeta``, ``_rimage``...) in
    the new LV's name: refused before anything is journaled, with the reason."""
    dom = make_lv_dom()
    dom.json("snapshot-list", dom.name)
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "pool_tmeta", expect=1)
    assert "_tmeta" in proc.stderr and "LVM keeps" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before


def test_libvirt_metadata_names_the_lvs_and_virsh_lists_livesnaps_tree(make_lv_dom):
    """libvirt's snapshot metadata of snapshots on LVs: ``type='block'`` disks naming the
    LVs (the overlay each made in <disks>, its own image in the embedded domain), which
    ``virsh snapshot-delete`` acts on; livesnap follows what it did."""
    from xml.etree import ElementTree
    from test_virsh_adopt import livesnap_tree, virsh, virsh_tree
    dom = make_lv_dom()
    dom.json("snapshot-create", dom.name, "s1")
    dom.write(3, 0)
    dom.json("snapshot-create", dom.name, "s2")
    assert virsh_tree(dom) == livesnap_tree(dom) == {"s1": None, "s2": "s1"}
    xml = ElementTree.fromstring(virsh("snapshot-dumpxml", dom.name, "s1").stdout)
    disks = xml.findall("disks/disk")
    assert [(d.get("type"), d.find("source").get("dev")) for d in disks] == \
        [("block", dom.images("s2")["vda"])]
    inner = xml.findall("domain/devices/disk")
    assert [(d.get("type"), d.find("source").get("dev")) for d in inner] == \
        [("block", dom.images("s1")["vda"])]

    # virsh snapshot-delete of the current snapshot merges its overlay (commit) and, unlike
    # a file, leaves the LV: livesnap follows the merge and names the LV left behind
    live, s1 = dom.digest(), chain_digest(dom.images("s1")["vda"])
    leaf, s2_image = dom.source(), dom.images("s2")["vda"]
    virsh("snapshot-delete", dom.name, "s2")
    assert dom.source() == s2_image and os.path.exists(leaf)
    chk = dom.json("check", dom.name, expect=None)
    # named, and as what reads the disk's image (its backing file)
    assert chk["problems"] and all(leaf in p for p in chk["problems"]), chk
    assert any("lvremove %s/%s" % (dom.vg, os.path.basename(leaf)) in p
               for p in chk["problems"]), chk
    assert virsh_tree(dom) == livesnap_tree(dom) == {"s1": None}
    assert dom.digest() == live and chain_digest(dom.images("s1")["vda"]) == s1
    lvm(dom.vg, "lvremove", "-f", leaf)
    assert dom.json("check", dom.name)["ok"]
    assert dom.json("snapshot-delete", dom.name, "s1")["action"] == "merged"
    assert dom.digest() == live and dom.json("check", dom.name)["ok"]


def active_lvs(vg, prefix):
    return sorted(n for n in os.listdir("/dev/%s" % vg) if n.startswith(prefix))


def test_inactive_lvs_of_a_stopped_domain_are_activated_for_the_command_and_put_back(
        make_lv_dom):
    """A stopped domain's LVs inactive (Proxmox VE deactivates them on shared LVM): each
    command activates the chain it reads and leaves every LV of the domain inactive again,
    the new ones too; an LV active before stays active."""
    dom = make_lv_dom()
    dom.write(1, 0)
    live = dom.digest()
    names = sorted(lvs(dom.vg))
    for n in names:
        lvm(dom.vg, "lvchange", "-an", "%s/%s" % (dom.vg, n))
    assert active_lvs(dom.vg, dom.name) == []
    r = dom.json("snapshot-create", dom.name, "s1")
    assert active_lvs(dom.vg, dom.name) == []
    assert "%s-vda.s1.qcow2" % dom.name in lvs(dom.vg)
    dom.json("snapshot-create", dom.name, "s2")
    assert dom.json("check", dom.name)["ok"]
    assert active_lvs(dom.vg, dom.name) == []
    r = dom.json("snapshot-delete", dom.name, "s1")
    assert r["action"] == "merged" and active_lvs(dom.vg, dom.name) == []
    for n in lvs(dom.vg):
        lvm(dom.vg, "lvchange", "-ay", "%s/%s" % (dom.vg, n))
    assert dom.digest() == live
    # the disk's LVs active before the command: left active
    before = active_lvs(dom.vg, dom.name)
    dom.json("snapshot-delete", dom.name, "s2")
    assert set(active_lvs(dom.vg, dom.name)) <= set(before)
    assert dom.source() in ["/dev/%s/%s" % (dom.vg, n) for n in active_lvs(dom.vg, dom.name)]
    assert dom.digest() == live and dom.json("check", dom.name)["ok"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("big", ["child", "snapshot"])
def test_a_killed_delete_is_finished_by_recover_and_its_lv_removed(make_lv_dom, big, when):
    """SIGKILL before or after the merge step (commit or pull) of a delete on LVs: recover
    finishes it; the disk and the other snapshot read as before, the LV merged away is
    gone and every LV left is one the catalog knows."""
    dom = make_lv_dom()
    seen = _chain(dom, 2)
    if big == "child":
        for i in range(8):
            dom.write(0x40 + i, i * 65536)
    live = dom.digest()
    plan = dom.json("snapshot-delete", dom.name, "s2", "--dry-run")
    merge = [s for s in plan["steps"] if s["op"] in ("commit", "pull")][0]
    assert merge["op"] == ("pull" if big == "child" else "commit")
    index = plan["steps"].index(merge)
    gone = merge["path"] if merge["op"] == "pull" else merge["child_path"]
    proc = dom.cli("snapshot-delete", dom.name, "s2", expect=None,
                   env_extra={"LIVESNAP_FAULT": "delete:%s:%d" % (when, index)})
    assert proc.returncode != 0
    dom.json("recover", dom.name)
    del seen["s2"]
    assert dom.digest() == live and os.path.basename(gone) not in lvs(dom.vg)
    known = {dom.source()} | {d["image"] for s in dom.json("snapshot-list", dom.name)
                               ["snapshots"] for d in s["disks"]}
    chain = qemu_img("info", "--backing-chain", "-U", "--output=json", dom.source())
    for name in lvs(dom.vg):
        path = "/dev/%s/%s" % (dom.vg, name)
        assert path in known or path in chain, name
    _assert_snapshots_read(dom, seen)


@pytest.fixture
def vg_16m(monkeypatch):
    """A VG of the LVM stand-in with 16 MiB extents (its PV a whole number of them)."""
    import tempfile
    from helpers import ROOT
    from testxen import lvm as standin
    root = tempfile.mkdtemp(prefix="lvm", dir="/tmp")
    monkeypatch.setenv("TESTXEN_LVM_ROOT", root)
    monkeypatch.setenv("LVM", os.path.join(ROOT, "testxen", "lvm"))
    v = standin.make_vg(root, "vg16-%s" % uuid.uuid4().hex[:8], (1 << 30) + MiB)
    try:
        v.lvm("vgchange", ["-s", "16m", v.name], check=True)
        yield v
    finally:
        standin.destroy_vg(root)


def test_the_space_preflight_rounds_to_the_vgs_own_extent(conn, tmp_path, vg_16m):
    """A VG of 16 MiB extents: each new LV of a four-disk snapshot takes 16 MiB, not the
    12 MiB its qcow2 needs rounded to LVM's default 4 MiB; with 48 MiB free the create is
    refused by the preflight (nothing changed), not by the fourth lvcreate."""
    vg = vg_16m.name
    extra = ""
    for t in ("vdb", "vdc", "vdd"):
        p = new_lv(vg, "x-%s" % t, 16 * MiB)
        qemu_img("create", "-q", "-f", "qcow2", p, DISK)
        extra += ("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/>"
                  "<source dev='%s'/><target dev='%s' bus='virtio'/></disk>" % (p, t))
    dom = LvDom(conn, tmp_path, vg, extra_xml=extra)
    try:
        from livesnap.tools import lvm as lvm_tool
        new_lv(vg, "filler", lvm_tool.vg_free(vg) - 48 * MiB)
        assert lvm_tool.vg_free(vg) == 48 * MiB
        dom.json("snapshot-list", dom.name)
        before = dom.fingerprint()
        proc = dom.cli("snapshot-create", dom.name, "s1", expect=1)
        assert "%d bytes needed, %d available" % (64 * MiB, 48 * MiB) in proc.stderr, \
            proc.stderr
        assert dom.fingerprint() == before
        lvm(vg, "lvresize", "-f", "-L", "%db" % (lvm_tool.lv_size(vg, "filler") - 16 * MiB),
            "%s/filler" % vg)
        r = dom.json("snapshot-create", dom.name, "s1")
        assert len(r["disks"]) == 4
        assert {size for name, (size, tags) in lvs(vg).items() if "livesnap" in tags} == \
            {16 * MiB}
    finally:
        dom.destroy()


@pytest.mark.parametrize("extent", [16, 1])
def test_a_vg_made_again_under_its_name_is_sized_by_its_new_extent(kvm_lvm_vg, extent):
    """One process (the service lives for days): after livesnap sized an LV in a VG of
    4 MiB extents, the VG is removed and made again under the same name with 16 MiB (or
    1 MiB) extents: the next size is the new extent's, the size LVM itself gives an LV made
    for the qcow2 (rounded to the old extent, the space preflight would count too little,
    or a 1 MiB-extent VG would be asked for 3 MiB more than needed)."""
    from livesnap.datapaths import lv_images
    from livesnap.tools import qemu_img as qi
    from testxen import lvm as standin
    vg = kvm_lvm_vg.name
    assert lv_images.full_size(DISK, vg) == 12 * MiB
    root = os.environ["TESTXEN_LVM_ROOT"]
    standin.destroy_vg(root)
    v = standin.make_vg(root, vg, (1 << 30) + MiB)       # a whole number of 16 MiB extents
    v.lvm("vgchange", ["-s", "%dm" % extent, vg], check=True)
    need = int(qi.measure(size=DISK)["fully-allocated"])
    new_lv(vg, "x", need)
    assert lv_images.full_size(DISK, vg) == lvs(vg)["x"][0] == \
        (16 * MiB if extent == 16 else 9 * MiB)
