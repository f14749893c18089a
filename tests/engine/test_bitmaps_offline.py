"""Persistent dirty bitmaps across an offline merge (a shut-off domain, qemu-img): the image
that survives a snapshot-delete carries every bitmap of the two images it merges, and each
marks at least every cluster written since the bitmap was made, in either image (read back
through an NBD export of the bitmap, as backup tools read it): a bitmap found only in the
lower image covers all the upper image's clusters after a commit (qemu-img commit marks
them) and after a pull (livesnap marks them). What cannot be kept right is refused before
anything changes.

Variants: the bitmap in both images (livesnap carried it into the overlay at the snapshot),
only in the lower image, only in the upper one; merged by commit and by pull."""
import json
import os
import subprocess
import time

import pytest

from helpers import qemu_img, qemu_io_write

MIB = 1 << 20
K64 = 64 * 1024


def dirty(path, name, sock):
    """[(start, length)] of the clusters the bitmap ``name`` of ``path`` marks dirty."""
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", sock, "-B", name, path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        out = qemu_img("map", "--output=json", "--image-opts",
                       "driver=nbd,server.type=unix,server.path=%s,"
                       "x-dirty-bitmap=qemu:dirty-bitmap:%s" % (sock, name))
    finally:
        proc.terminate()
        proc.wait()
        if os.path.exists(sock):
            os.unlink(sock)
    # x-dirty-bitmap reports dirty areas as "data": false
    return [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]


def covered(ranges, offset, length):
    end = offset + length
    pos = offset
    for s, n in sorted(ranges):
        if s <= pos < s + n:
            pos = s + n
        if pos >= end:
            return True
    return pos >= end


def bitmap_info(path):
    data = json.loads(qemu_img("info", "-U", "--output=json", path))
    return {b["name"]: b for b in
            (data.get("format-specific") or {}).get("data", {}).get("bitmaps") or []}


def build(dom, where, op, disabled=False):
    """A one-disk shut-off domain: its image L, snapshot s1 (L frozen, an overlay U above),
    bitmap 'b' where asked, writes after it in both images; sizes chosen so that deleting
    s1 merges by ``op``. Returns (L, U, [(offset, length) written since 'b' was made])."""
    lower = dom.sources()["vda"]
    # before the bitmap: not to be marked (and the bulk that makes L the larger: commit)
    qemu_io_write(lower, 0x11, 4 * MIB, (8 if op == "commit" else 1) * K64)
    since = []
    if where in ("both", "lower"):
        flags = ["--disable"] if disabled else []
        qemu_img("bitmap", "--add", "-g", 131072, *(flags + [lower, "b"]))
        if not disabled:
            qemu_io_write(lower, 0x22, 1 * MIB, K64)
            since.append((1 * MIB, K64))
    dom.json("snapshot-create", dom.name, "s1")
    upper = dom.sources()["vda"]
    assert upper != lower
    if where == "lower" and not disabled:         # (a disabled one is not carried)
        qemu_img("bitmap", "--remove", upper, "b")
    if where == "upper":
        qemu_img("bitmap", "--add", "-g", 131072, upper, "b")
    qemu_io_write(upper, 0x33, 2 * MIB, K64)
    if op == "pull":
        qemu_io_write(upper, 0x44, 3 * MIB, 4 * K64)       # the larger: pull
    if not disabled or where != "lower":
        since.append((2 * MIB, K64))
        if op == "pull":
            since.append((3 * MIB, 4 * K64))
    return lower, upper, since


@pytest.mark.parametrize("op", ["commit", "pull"])
@pytest.mark.parametrize("where", ["both", "lower", "upper"])
def test_a_merge_keeps_every_bitmap_in_the_image_that_survives(make_dom, tmp_path, op, where):
    dom = make_dom(ndisks=1)
    lower, upper, since = build(dom, where, op)
    plan = dom.json("snapshot-delete", dom.name, "s1", "--dry-run")
    assert [s["op"] for s in plan["steps"] if s["op"] in ("commit", "pull")] == [op]
    data = dom.digests()
    r = dom.json("snapshot-delete", dom.name, "s1")
    assert r["action"] == "merged"
    survivor = dom.sources()["vda"]
    assert survivor == (lower if op == "commit" else upper)
    assert not os.path.exists(upper if op == "commit" else lower)
    assert dom.digests() == data
    info = bitmap_info(survivor)
    assert list(info) == ["b"] and info["b"]["granularity"] == 131072
    assert info["b"]["flags"] == ["auto"]
    ranges = dirty(survivor, "b", str(tmp_path / "nbd.sock"))
    for offset, length in since:
        assert covered(ranges, offset, length), (offset, length, ranges)
    if op == "commit":
        # what was written in the lower image before the bitmap is not marked (a pull marks
        # what it copies into the upper image: more than changed, never less)
        assert not covered(ranges, 4 * MIB, K64), ranges


def test_a_disabled_bitmap_of_the_lower_image_is_kept_by_a_pull(make_dom, tmp_path):
    """A disabled bitmap records a closed span of changes, before the overlay was made (it
    is not carried into it): a pull keeps it as it was, disabled."""
    dom = make_dom(ndisks=1)
    lower, upper, since = build(dom, "lower", "pull", disabled=True)
    sock = str(tmp_path / "nbd.sock")
    assert dirty(lower, "b", sock) == []
    dom.json("snapshot-delete", dom.name, "s1")
    assert dom.sources()["vda"] == upper
    info = bitmap_info(upper)
    assert info["b"]["flags"] == [] and info["b"]["granularity"] == 131072


def test_an_inconsistent_bitmap_refuses_an_offline_merge(make_dom):
    """A bitmap left 'in-use' by a QEMU that stopped without saving it cannot be merged."""
    dom = make_dom(ndisks=1)
    lower, upper, since = build(dom, "both", "commit")
    set_in_use(upper)
    assert bitmap_info(upper)["b"]["flags"] == ["in-use", "auto"]
    before = dom.fingerprint()
    proc = dom.cli("snapshot-delete", dom.name, "s1", expect=1)
    assert "dirty bitmap b in %s is inconsistent" % upper in proc.stderr, proc.stderr
    assert dom.fingerprint() == before


def set_in_use(path):
    """Set the in-use flag of every bitmap of a qcow2 image, as a QEMU killed while running
    on it leaves them (the bitmap directory entries' flags, docs/interop/qcow2.txt)."""
    import struct
    with open(path, "r+b") as f:
        head = f.read(1 << 16)
        hlen = struct.unpack(">I", head[100:104])[0]
        pos = hlen
        while True:
            ext, length = struct.unpack(">II", head[pos:pos + 8])
            if ext == 0:
                raise AssertionError("no bitmaps extension in %s" % path)
            if ext == 0x23852875:
                nb, _, _, dir_off = struct.unpack(">IIQQ", head[pos + 8:pos + 32])
                break
            pos += 8 + (length + 7) // 8 * 8
        f.seek(dir_off)
        d = f.read(1 << 16)
        off = 0
        for _ in range(nb):
            flags_at = off + 12
            flags = struct.unpack(">I", d[flags_at:flags_at + 4])[0]
            f.seek(dir_off + flags_at)
            f.write(struct.pack(">I", flags | 1))
            name_size = struct.unpack(">H", d[off + 18:off + 20])[0]
            extra = struct.unpack(">I", d[off + 20:off + 24])[0]
            entry = 24 + extra + name_size
            off += (entry + 7) // 8 * 8


def test_a_pull_marks_every_cluster_of_a_fragmented_upper_image(make_dom, tmp_path,
                                                                 monkeypatch):
    """A bitmap only in the lower image, an upper image of many separate clusters (marked
    in several qemu-io runs): after the pull the bitmap covers each of them."""
    from livesnap.tools import qemu_io
    monkeypatch.setattr(qemu_io, "BATCH", 3)
    dom = make_dom(ndisks=1)
    lower, upper, since = build(dom, "lower", "pull")
    for i in range(10):
        qemu_io_write(upper, 0x55, 5 * MIB + 4 * i * K64, 4096)
        since.append((5 * MIB + 4 * i * K64, 4096))
    dom.json("snapshot-delete", dom.name, "s1")
    assert dom.sources()["vda"] == upper
    ranges = dirty(upper, "b", str(tmp_path / "nbd.sock"))
    for offset, length in since:
        assert covered(ranges, offset, length), (offset, length, ranges)
    assert not covered(ranges, 5 * MIB + 2 * K64, 2 * K64), ranges


@pytest.mark.parametrize("op,where", [("commit", "upper"), ("pull", "lower"),
                                      ("pull", "both")])
def test_a_crash_after_the_bitmaps_were_merged_is_recovered(make_dom, tmp_path, op, where):
    """SIGKILL after the survivor got the bitmaps, before the data moved: recover finishes
    the merge (the union made again), the bitmap still marks every change since it."""
    dom = make_dom(ndisks=1)
    lower, upper, since = build(dom, where, op)
    data = dom.digests()
    proc = dom.cli("snapshot-delete", dom.name, "s1",
                   env_extra={"LIVESNAP_FAULT": "bitmaps:kept:0"}, expect=None)
    assert proc.returncode != 0
    dom.json("recover", dom.name)
    survivor = dom.sources()["vda"]
    assert survivor == (lower if op == "commit" else upper)
    assert dom.digests() == data
    assert dom.json("snapshot-list", dom.name)["snapshots"] == []
    info = bitmap_info(survivor)
    assert list(info) == ["b"] and info["b"]["flags"] == ["auto"]
    ranges = dirty(survivor, "b", str(tmp_path / "nbd.sock"))
    for offset, length in since:
        assert covered(ranges, offset, length), (offset, length, ranges)


@pytest.mark.parametrize("bigger", ["lower", "upper"])
def test_images_outside_the_running_chain_are_merged_with_their_bitmaps(make_dom, tmp_path,
                                                                        bigger):
    """On a running domain, a merge of two images of another branch (not open in QEMU) is
    an offline merge, under the offline rules: a bitmap of the lower image missing from the
    upper one is kept, covering the upper image's clusters (not refused as in the running
    chain)."""
    dom = make_dom(ndisks=1)
    first = dom.sources()["vda"]
    qemu_img("bitmap", "--add", first, "b")
    dom.json("snapshot-create", dom.name, "s1")
    lower = dom.sources()["vda"]
    dom.write("vda", 0x21, 1 * MIB, (8 if bigger == "lower" else 1) * K64)
    dom.json("snapshot-create", dom.name, "s2")
    upper = dom.sources()["vda"]
    qemu_img("bitmap", "--remove", upper, "b")
    dom.write("vda", 0x31, 3 * MIB, (8 if bigger == "upper" else 1) * K64)
    dom.json("snapshot-revert", dom.name, "s1", "--keep-current", "cur")
    assert dom.sources()["vda"] not in (lower, upper)
    dom.dom.create()
    try:
        op = "commit" if bigger == "lower" else "pull"
        plan = dom.json("snapshot-delete", dom.name, "s2", "--dry-run")
        assert [s["op"] for s in plan["steps"] if s["op"] in ("commit", "pull")] == [op]
        assert dom.json("snapshot-delete", dom.name, "s2")["action"] == "merged"
        survivor = lower if op == "commit" else upper
        assert not os.path.exists(upper if op == "commit" else lower)
        ranges = dirty(survivor, "b", str(tmp_path / "nbd.sock"))
        assert covered(ranges, 1 * MIB, K64) and covered(ranges, 3 * MIB, K64), ranges
        assert bitmap_info(survivor)["b"]["flags"] == ["auto"]
    finally:
        dom.dom.destroy()


class RunningStub(object):
    """What the preflight asks of a running libvirt domain, with the versions it reports."""
    kind = "libvirt"
    name = "stub"

    def __init__(self, chain, versions, checkpoints=()):
        self.chain, self._versions, self._checkpoints = chain, versions, list(checkpoints)

    def is_running(self):
        return True

    def live_chain(self, disk):
        return list(self.chain)

    def versions(self):
        return self._versions

    def checkpoints(self):
        return self._checkpoints


class Plan(object):
    def __init__(self, steps):
        self.steps = steps


@pytest.mark.parametrize("versions,refused", [((9000000, 7002000), None),
                                              ((6009000, 7002000), "libvirt 6.9.0"),
                                              ((9000000, 6000000), "QEMU 6.0.0")])
def test_a_live_merge_with_bitmaps_needs_a_libvirt_and_qemu_that_keep_them(
        tmp_path, versions, refused):
    from livesnap.engine import foreign
    from livesnap.errors import BitmapsPresent
    lower, upper = str(tmp_path / "lower.qcow2"), str(tmp_path / "upper.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", lower, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", lower, "-F", "qcow2", upper)
    plan = Plan([{"op": "commit", "disk": "vda", "path": lower, "child_path": upper}])
    # no bitmap, no checkpoint: nothing to keep, whatever the versions
    foreign.refuse_bitmaps(RunningStub([upper, lower], versions), plan)
    for maps, checkpoints in ((["lower"], ()), ([], ("cp1",))):
        for m in maps:
            qemu_img("bitmap", "--add", lower, "b")
        dom = RunningStub([upper, lower], versions, checkpoints)
        if refused is None:
            foreign.refuse_bitmaps(dom, plan)
            continue
        with pytest.raises(BitmapsPresent) as e:
            foreign.refuse_bitmaps(dom, plan)
        assert refused in str(e.value) and "does not keep" in str(e.value), str(e.value)
        if maps:
            assert lower in str(e.value)
            qemu_img("bitmap", "--remove", lower, "b")
