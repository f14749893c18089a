"""The real storage manager (SM v3.2.12: its scan and its garbage collector, cleanup.py) run
over what livesnap leaves on an SR, with the real vhd-util and the real tapdisk
(testxen/sm.py): after each livesnap operation a full GC pass runs to its end with its XAPI
calls served by the XAPI stand-in, then every snapshot must read what it read when it was
taken and the VM's disk what was written to it (reads through the real tapdisk).

The VM is halted while SM works (its disks detached: SM's pause is then only the
``sm_config`` key, as on a host); livesnap runs offline; the data is written through the real
tapdisk. A control SR laid out as SM lays it out (vhd-util snapshot, hidden base copies,
XAPI records as SM writes them) shows the harness doing SM's documented work.

Expected failures are the defects of issue 13 ("XAPI: snapshots in SM's model"); each
xfail says what was observed."""
import os
import subprocess
import uuid

import pytest

from testxen import sm as smmod

MiB = 1 << 20
SIZE = 4 * MiB            # two 2 MiB VHD blocks


def _prefix():
    p = os.environ.get("LIVESNAP_BLKTAP_PREFIX")
    if p:
        return p
    script = os.path.join(smmod.ROOT, "scripts", "build-blktap.sh")
    if os.path.exists(script):
        out = subprocess.run(["bash", script], stdout=subprocess.PIPE, check=True,
                             universal_newlines=True).stdout.strip().splitlines()
        return out[-1]
    pytest.skip("no real blktap: set LIVESNAP_BLKTAP_PREFIX or add scripts/build-blktap.sh")


@pytest.fixture(scope="session")
def blktap():
    return smmod.Blktap(_prefix())


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
    made by ``vhd-util snapshot`` after data was written through the real tapdisk. Returns
    (leaf VDI ref, [base uuids, oldest first], what the leaf reads)."""
    x = world.xapi
    d = x.sr_dir(world.sr)
    leaf_uuid = str(uuid.uuid4())
    leaf = os.path.join(d, leaf_uuid + ".vhd")
    blktap.vhd("create", "-n", leaf, "-s", SIZE // MiB)
    bases = []
    for i in range(depth):
        blktap.write(leaf, i * MiB, MiB // 2, 0x11 * (i + 1))
        b = str(uuid.uuid4())
        # SM's FileSR._snapshot: link the leaf to the base's name, snapshot, rename over
        os.link(leaf, os.path.join(d, b + ".vhd"))
        blktap.vhd("snapshot", "-n", leaf + ".new", "-p", os.path.join(d, b + ".vhd"))
        os.rename(leaf + ".new", leaf)
        blktap.vhd("set", "-n", os.path.join(d, b + ".vhd"), "-f", "hidden", "-v", "1")
        bases.append(b)
    blktap.write(leaf, 3 * MiB, MiB, 0x77)
    parent = None
    for b in bases:
        sm_config = {"vdi_type": "vhd"}
        if parent:
            sm_config["vhd-parent"] = parent
        x.add_vdi(world.sr, SIZE, uuid=b, location=b, name_label="base copy",
                  read_only=True, managed=False, sm_config=sm_config)
        parent = b
    ref = x.add_vdi(world.sr, SIZE, uuid=leaf_uuid, location=leaf_uuid,
                    sm_config={"vdi_type": "vhd", "vhd-parent": parent})
    return ref, bases, blktap.read(leaf)


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
