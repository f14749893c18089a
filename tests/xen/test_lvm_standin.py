"""VHDs on logical volumes: the LVM stand-in (real LVM metadata, loop devices as the LVs'
block devices) under livesnap's LVM wrapper, and the VHD engine on a block device, whose
footer stays at the device's end and whose data cannot grow past it."""
import os
import stat

import pytest

from livesnap import vhd
from livesnap.errors import NoSpace
from livesnap.tools import lvm
from testxen import blktap as real_blktap

MiB = 1 << 20


def test_lvs_are_block_devices_that_follow_lvm(lvm_vg):
    vg = lvm_vg.name
    lvm.lvcreate(vg, "VHD-a", 6 * MiB)
    path = lvm.lv_path(vg, "VHD-a")
    assert stat.S_ISBLK(os.stat(path).st_mode)
    assert lvm.lv_size(vg, "VHD-a") == 8 * MiB              # LVM rounds up to its extent
    with open(path, "rb") as f:
        assert f.seek(0, os.SEEK_END) == 8 * MiB
    with open(path, "r+b") as f:
        f.write(b"keep me")
    lvm.lvrename(vg, "VHD-a", "VHD-b")
    assert not os.path.exists(path)
    with open(lvm.lv_path(vg, "VHD-b"), "rb") as f:
        assert f.read(7) == b"keep me"                       # a rename keeps the data
    lvm.lvresize(vg, "VHD-b", 16 * MiB)
    assert lvm.lv_size(vg, "VHD-b") == 16 * MiB
    with open(lvm.lv_path(vg, "VHD-b"), "rb") as f:
        assert f.seek(0, os.SEEK_END) == 16 * MiB
    lvm.set_readonly(vg, "VHD-b")
    fd = os.open(lvm.lv_path(vg, "VHD-b"), os.O_RDWR)
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"x" * 512, 0)
            os.fsync(fd)
    finally:
        os.close(fd)
    lvm.lvremove(vg, "VHD-b")
    assert os.listdir(os.path.join("/dev", vg)) == []


def test_real_lvm_refusals_are_typed(lvm_vg):
    vg = lvm_vg.name
    lvm.lvcreate(vg, "VHD-a", 4 * MiB)
    with pytest.raises(lvm.LvExists):
        lvm.lvcreate(vg, "VHD-a", 4 * MiB)
    with pytest.raises(lvm.LvNotFound):
        lvm.lvrename(vg, "VHD-none", "VHD-x")
    with pytest.raises(lvm.LvNotFound):
        lvm.lvremove(vg, "VHD-none")
    with pytest.raises(NoSpace):
        lvm.lvcreate(vg, "VHD-big", 64 << 30)
    assert not os.path.exists(lvm.lv_path(vg, "VHD-big"))
    free = lvm.vg_free(vg)
    lvm.lvcreate(vg, "VHD-c", 40 * MiB)
    assert lvm.vg_free(vg) == free - 40 * MiB


def test_split_path():
    assert lvm.split_path("/dev/VG_XenStorage-x/VHD-y") == ("VG_XenStorage-x", "VHD-y")
    assert lvm.split_path("/dev/mapper/foo") is None
    assert lvm.split_path("/dev/sda") is None
    assert lvm.split_path("/run/sr-mount/x/y.vhd") is None


def test_vhd_on_a_block_device_keeps_its_footer_at_the_end(lvm_vg):
    vg = lvm_vg.name
    lvm.lvcreate(vg, "VHD-base", 8 * MiB)
    base = lvm.lv_path(vg, "VHD-base")
    vhd.create(base, 32 * MiB)
    with open(base, "rb") as f:
        f.seek(-512, os.SEEK_END)
        assert f.read(8) == b"conectix"                      # footer at the device's end
    vhd.write(base, 0, b"\x11" * (2 * MiB))
    vhd.set_hidden(base, 1)
    assert vhd.query(base).hidden == 1 and vhd.check(base) == [] == real_blktap.check(base)
    # 8 MiB hold the metadata and 3 blocks: the 4th has no room before the footer
    vhd.write(base, 2 * MiB, b"\x22" * (4 * MiB))
    with pytest.raises(vhd.VhdNoSpace):
        vhd.write(base, 8 * MiB, b"\x33" * (2 * MiB))
    assert vhd.check(base) == [] == real_blktap.check(base)
    assert vhd.read(base, 8 * MiB, 512) == bytes(512)
    # inflate (grow the LV, move the footer), then the write fits
    lvm.inflate(vg, "VHD-base", base, size=16 * MiB)
    vhd.write(base, 8 * MiB, b"\x33" * (2 * MiB))
    assert vhd.check(base) == [] == real_blktap.check(base) and vhd.read(base, 8 * MiB, 2) == b"\x33\x33"
    # deflate to the physical size: footer first, then the LV shrinks; data stays
    phys = vhd.query(base).physical_size
    lvm.deflate(vg, "VHD-base", base)
    assert lvm.lv_size(vg, "VHD-base") == lvm.round_extent(phys)
    assert vhd.check(base) == [] == real_blktap.check(base) and vhd.read(base, 2 * MiB, 1) == b"\x22"
    # a child on its own LV, coalesced into the inflated parent
    lvm.lvcreate(vg, "VHD-leaf", 8 * MiB)
    leaf = lvm.lv_path(vg, "VHD-leaf")
    vhd.snapshot(leaf, base)
    vhd.write(leaf, 12 * MiB, b"\x44" * (4 * MiB))         # 2 blocks: more than the slack
    assert lvm.lv_size(vg, "VHD-base") - phys < 4 * MiB
    with pytest.raises(vhd.VhdNoSpace):
        vhd.coalesce(leaf)                                  # the deflated parent is full
    assert vhd.check(base) == [] == real_blktap.check(base)
    lvm.inflate(vg, "VHD-base", base, size=phys + 6 * MiB)
    vhd.coalesce(leaf)
    assert vhd.read(base, 15 * MiB, 1) == b"\x44" and vhd.check(base) == [] == real_blktap.check(base)


def test_activation_gives_and_takes_the_device(lvm_vg):
    vg = lvm_vg.name
    lvm.lvcreate(vg, "VHD-a", 4 * MiB)
    path = lvm.lv_path(vg, "VHD-a")
    with open(path, "r+b") as f:
        f.write(b"still here")
    lvm.activate(vg, "VHD-a", False)
    assert not os.path.exists(path)
    with pytest.raises(vhd.VhdMissing):
        vhd.query(path)
    lvm.activate(vg, "VHD-a")
    with open(path, "rb") as f:
        assert f.read(10) == b"still here"
    lvm.lvcreate(vg, "VHD-b", 4 * MiB, active=False)
    assert not os.path.exists(lvm.lv_path(vg, "VHD-b"))
    lvm.activate(vg, "VHD-b", False)                       # already inactive: fine
    lvm.lvrename(vg, "VHD-b", "VHD-c")
    assert not os.path.exists(lvm.lv_path(vg, "VHD-c"))
    lvm.activate(vg, "VHD-c")
    assert stat.S_ISBLK(os.stat(lvm.lv_path(vg, "VHD-c")).st_mode)
