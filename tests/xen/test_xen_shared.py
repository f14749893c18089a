"""On the VHD datapath too, an image another VHD of the SR backs onto is never merged into
or deleted (issue 16, class 1): a VDI cloned from a snapshot's image (its parent locator
names that image) keeps reading the snapshot's data after the snapshot is deleted."""
import hashlib
import uuid

from livesnap import vhd

from test_xen_datapath import SIZE, XenVm


def data(path):
    """What the image itself holds (its own blocks; the footer's hidden flag aside)."""
    return hashlib.sha256(vhd.read(path, 0, SIZE)).hexdigest(), vhd.query(path).physical_size


def test_clone_of_a_snapshot_image_in_the_sr_keeps_its_data(xen, tmp_path):
    vm = XenVm(xen, tmp_path)                   # shut off: the VHD engine works directly
    leaf = vm.paths["xvda"]
    vhd.write(leaf, 0, b"\x11" * (1 << 20))
    r = vm.json("snapshot-create", vm.name, "golden")
    frozen = [d["image"] for d in r["disks"] if d["target"] == "xvda"][0]
    vhd.write(leaf, 0, b"\x22" * (64 << 10))
    clone = str(tmp_path / "sr" / "clone.vhd")
    vhd.snapshot(clone, frozen)
    before = data(frozen)
    r = vm.json("snapshot-delete", vm.name, "golden")
    assert r["action"] == "hidden", r
    assert any(clone in u for k in r["in_use"] for u in k["users"]), r
    assert data(frozen) == before
    assert vhd.read(clone, 0, 1 << 20) == b"\x11" * (1 << 20)
    assert vhd.read(leaf, 0, 64 << 10) == b"\x22" * (64 << 10)
    assert vhd.read(leaf, 64 << 10, (1 << 20) - (64 << 10)) == b"\x11" * ((1 << 20) - (64 << 10))
    assert vhd.check(clone) == []
    chk = vm.json("check", vm.name)
    assert chk["ok"] and any(clone in n for n in chk["notes"]), chk


def test_clone_on_an_lv_of_the_volume_group_keeps_its_data(xen, lvm_vg, tmp_path):
    """LVHD: the clone is an (active) LV of the same volume group."""
    from livesnap.datapaths import vhd_storage
    vm = XenVm(xen, tmp_path, vg=lvm_vg.name)
    leaf = vm.paths["xvda"]
    vhd.write(leaf, 0, b"\x11" * (1 << 20))
    r = vm.json("snapshot-create", vm.name, "golden")
    frozen = [d["image"] for d in r["disks"] if d["target"] == "xvda"][0]
    vhd.write(leaf, 0, b"\x22" * (64 << 10))
    clone = "/dev/%s/VHD-%s" % (lvm_vg.name, uuid.uuid4())
    vhd_storage.LvmStorage(lvm_vg.name).create_child(clone, frozen)
    before = data(frozen)
    r = vm.json("snapshot-delete", vm.name, "golden")
    assert r["action"] == "hidden", r
    assert any(clone in u for k in r["in_use"] for u in k["users"]), r
    assert data(frozen) == before
    assert vhd.read(clone, 0, 1 << 20) == b"\x11" * (1 << 20)
    assert vhd.read(leaf, 0, 64 << 10) == b"\x22" * (64 << 10)
