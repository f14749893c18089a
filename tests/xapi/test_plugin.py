"""The XAPI plugin end to end, run as xapi runs it (one argv: the methodCall; the reply on
stdout) against the XAPI stand-in, on a VM with two VHD disks on a file SR."""
import json
import os

import pytest

from testxen import blktap


def names(listing):
    return [s["name"] for s in listing["snapshots"]]


def test_life_cycle_running_then_halted(world):
    vm = world.add_vm()
    vm.start()
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    assert r["snapshot"] == "s1" and r["datapath"] == "tapdisk" and r["pause_ms"] is not None
    assert sorted(d["target"] for d in r["disks"]) == ["xvda", "xvdb"]
    for d in r["disks"]:
        # the frozen image sits in the SR beside the VDI, whose path stays the VM's leaf
        assert os.path.dirname(d["image"]) == os.path.dirname(vm.paths[d["target"]])
        assert d["image"] != vm.paths[d["target"]] and d["format"] == "vhd"
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2", description="before upgrade",
                 disks="xvdb")
    assert [d["target"] for d in r["disks"]] == ["xvdb"]
    listing = world.ok("snapshot_list", vm_uuid=vm.uuid)
    assert listing["domain"] == "vm1" and names(listing) == ["s1", "s2"]
    assert listing["snapshots"][1]["description"] == "before upgrade"
    assert listing == world.ok("snapshot_list", vm_uuid=vm.uuid, all="false")
    # revert needs the VM halted
    desc = world.fail("snapshot_revert", {"vm_uuid": vm.uuid, "name": "s1"},
                      "LIVESNAP_WRONG_STATE")
    assert "running" in desc[1] and "xe vm-shutdown uuid=%s" % vm.uuid in desc[1]
    dry = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2", dry_run="yes")
    assert dry["dry_run"] is True
    assert names(world.ok("snapshot_list", vm_uuid=vm.uuid)) == ["s1", "s2"]
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    assert r["snapshot"] == "s2" and r["action"] in ("merged", "deleted")
    assert names(world.ok("snapshot_list", vm_uuid=vm.uuid)) == ["s1"]
    vm.stop()                       # every acknowledged write is in the disks
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s3")
    assert r["datapath"] != "tapdisk"
    r = world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1", keep_current="k1")
    assert r["snapshot"] == "s1" and r["kept"] == "k1"
    listing = world.ok("snapshot_list", vm_uuid=vm.uuid, all="true")
    assert set(names(listing)) == {"s1", "s3", "k1"}
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["recovered"] is None and r["domain"] == "vm1"
    for p in vm.paths.values():
        assert blktap.check(p) == []


def test_changes_wait_for_sms_sr_lock(world):
    """While SM holds its SR lock (/var/lock/sm/<sr>/sr, POSIX write lock) a snapshot waits;
    it goes on when SM lets go."""
    import subprocess
    import time
    import xmlrpc.client
    from conftest_paths import PLUGIN
    from helpers import LockHolder
    vm = world.add_vm()
    sr_uuid = world.xapi.record("SR", world.sr)["uuid"]
    holder = LockHolder(os.path.join(world.sm_lock_dir, sr_uuid, "sr"))
    try:
        call = xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid, "name": "s1"}),
                                   methodname="snapshot_create")
        p = subprocess.Popen([PLUGIN, call], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, env=world.env())
        time.sleep(2.0)
        assert p.poll() is None                       # waiting for SM's lock
        holder.release()
        out, err = p.communicate(timeout=60)
    finally:
        holder.kill()
    (reply,), _ = xmlrpc.client.loads(out)
    assert reply["Status"] == "Success", (reply, err)
    assert json.loads(reply["Value"])["snapshot"] == "s1"


@pytest.fixture(params=["ext", "lvm"])
def sr_of(request, world):
    if request.param == "ext":
        return world.sr
    world.lvm_vg = request.getfixturevalue("lvm_vg")
    return world.add_lvm_sr(world.lvm_vg)


def test_xapi_records_follow_the_chains(world, sr_of):
    """New images get VDI uuids as names; after each operation livesnap has XAPI scan the SR,
    so every image is a VDI record whose sm_config.vhd-parent is its VHD parent, livesnap's
    snapshots are labelled, and merged-away images are forgotten. On LVHD the LVs follow SM:
    snapshot LVs deflated and read-only."""
    from livesnap.platforms.xapi import image_uuid
    from livesnap.vhd import paths as vhd_paths
    xapi = world.xapi
    vm = world.add_vm(sr=sr_of)
    vm.start()

    def vdis():
        return {rec["uuid"]: rec for ref, rec in xapi.objects["VDI"].items()
                if rec["SR"] == sr_of}

    def check_records():
        if xapi.record("SR", sr_of)["type"] == "lvm":
            # a halted VM's LVs are left inactive: vhd-util resolves a parent only when its
            # LV is active (as SM activates a chain before it reads it)
            from livesnap.tools import lvm
            vg = world.lvm_vg
            for name in vg.loops():
                if not os.path.exists(vg.link(name)):
                    lvm.activate(vg.name, name, True)
        images = xapi.sr_images(sr_of)
        recs = vdis()
        assert set(recs) == set(images)                 # no image unknown to XAPI, no ghost
        for u, path in images.items():
            parent = blktap.query(path)["parent"]
            # libvhd names an LV parent by its /dev/mapper name
            parent = parent and (vhd_paths.lv_path(parent) or parent)
            assert recs[u]["sm_config"].get("vhd-parent") == (image_uuid(parent) if parent
                                                               else None)
        return recs

    n_scans = len([c for c in xapi.calls if c[0] == "SR.scan"])
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    assert len([c for c in xapi.calls if c[0] == "SR.scan"]) > n_scans
    recs = check_records()
    frozen = {}
    by_ref = {rec["uuid"]: ref for ref, rec in xapi.objects["VDI"].items()}
    for d in r["disks"]:
        u = image_uuid(d["image"])
        assert u is not None, d["image"]                 # a VDI name, not <vdi>.s1.vhd
        leaf = image_uuid(vm.paths[d["target"]])
        # SM's layout: the snapshot's VDI and the VM's are leaves on one hidden base copy
        base = recs[leaf]["sm_config"]["vhd-parent"]
        frozen[d["target"]] = (u, base)
        assert recs[u]["sm_config"]["vhd-parent"] == base and base not in (u, leaf)
        assert recs[base]["managed"] is False and recs[base]["name_label"] == "base copy"
        assert recs[u]["name_label"] == "livesnap s1: vm1 %s" % d["target"]
        assert recs[u]["other_config"]["livesnap_snapshot"] == "s1"
        assert recs[u]["managed"] is True and recs[u]["is_a_snapshot"] is True
        assert recs[u]["snapshot_of"] == by_ref[leaf]
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    check_records()
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert r["action"] == "merged"
    recs = check_records()
    assert not {u for u, _ in frozen.values()} & set(recs)     # deleted: forgotten
    # s1's base copy merged with s2's: one per disk left
    assert len([u for u, rec in recs.items() if rec["managed"] is False]) == len(vm.paths)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    recs = check_records()
    # what is left below the leaves is internal (hidden, unmanaged) or nothing
    for u, rec in recs.items():
        if u not in {image_uuid(p) for p in vm.paths.values()}:
            assert rec["managed"] is False and "livesnap_snapshot" not in rec["other_config"], \
                (rec, world.ok("snapshot_list", vm_uuid=vm.uuid, all="true"))
    vm.stop()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s3")   # offline
    check_records()
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s3")
    recs = check_records()
    assert set(recs) == {image_uuid(p) for p in vm.paths.values()}


def test_suspended_vm_snapshots_offline_but_does_not_revert(world):
    """A suspended VM has no tapdisk: snapshots and deletes work offline (the disks read the
    same afterwards, which its saved memory expects); a revert would change what the disks
    read under that memory, so it is refused with the xe commands that make it safe."""
    vm = world.add_vm()
    blktap.write(vm.paths["xvda"], 0, b"\x5a" * 4096)
    world.xapi.record("VM", vm.ref)["power_state"] = "Suspended"
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    assert r["datapath"] == "vhd-offline"
    blktap.write(vm.paths["xvda"], 0, b"\xa5" * 4096)
    before = {t: blktap.read(p, 0, 8192) for t, p in vm.paths.items()}
    desc = world.fail("snapshot_revert", {"vm_uuid": vm.uuid, "name": "s1"},
                      "LIVESNAP_WRONG_STATE")
    assert "suspended" in desc[1] and "xe vm-resume uuid=%s" % vm.uuid in desc[1]
    assert {t: blktap.read(p, 0, 8192) for t, p in vm.paths.items()} == before
    r = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    assert r["action"] == "merged"
    assert {t: blktap.read(p, 0, 8192) for t, p in vm.paths.items()} == before
    world.xapi.record("VM", vm.ref)["power_state"] = "Halted"
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    blktap.write(vm.paths["xvda"], 0, b"\x00" * 4096)
    world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s2")
    assert blktap.read(vm.paths["xvda"], 0, 4096) == b"\xa5" * 4096


def test_lvhd_halted_vm_with_inactive_lvs(world, lvm_vg):
    """On LVHD SM keeps a detached VDI's LVs inactive (no device). livesnap activates the
    chain it needs for an offline operation and leaves every LV of the VM inactive again."""
    from livesnap.tools import lvm
    vg = lvm_vg.name
    sr = world.add_lvm_sr(lvm_vg)
    vm = world.add_vm(sr=sr)
    blktap.write(vm.paths["xvda"], 0, b"\x11" * 4096)

    def devices():
        return sorted(os.listdir(os.path.join("/dev", vg)))

    def deactivate_all():
        for name in lvm_vg.loops():
            lvm.activate(vg, name, False)
        assert devices() == []

    deactivate_all()
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    assert r["datapath"] == "vhd-offline"
    assert devices() == []
    for name in lvm_vg.loops():
        lvm.activate(vg, name)
    blktap.write(vm.paths["xvda"], 0, b"\x22" * 4096)
    deactivate_all()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    assert devices() == []
    r = world.ok("snapshot_revert", vm_uuid=vm.uuid, name="s1", keep_current="k")
    assert r["kept"] == "k" and devices() == []
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    assert devices() == []
    listing = world.ok("snapshot_list", vm_uuid=vm.uuid, all="true")
    assert sorted(s["name"] for s in listing["snapshots"]) == ["k", "s1"]
    for name in lvm_vg.loops():
        lvm.activate(vg, name)
    assert blktap.read(vm.paths["xvda"], 0, 4096) == b"\x11" * 4096       # reverted to s1
    k = [s for s in listing["snapshots"] if s["name"] == "k"][0]
    kimg = [d["image"] for d in k["disks"] if d["target"] == "xvda"][0]
    assert blktap.read(kimg, 0, 4096) == b"\x22" * 4096
    for p in set(lvm.lv_path(vg, n) for n in lvm_vg.loops()):
        assert blktap.check(p) == [], p
    # XAPI knows every image, inactive or not
    recs = {rec["uuid"] for rec in world.xapi.objects["VDI"].values() if rec["SR"] == sr}
    assert recs == set(world.xapi.sr_images(sr))
