"""New images are created 0600, whatever the mode of the image they replace: never wider
(issue 16, class 7). On the VHD datapaths the disk keeps its path and a new leaf is made
there (a snapshot, an internal snapshot, a revert): the guest's writes must not become
readable by others. The qcow2 datapaths (new overlays, revert's new leaf) are held to the
same rule (tests/engine/test_file_modes.py)."""
import os
import stat

import pytest

from helpers import listdir_images
from livesnap import vhd
from testxen import blktap as real_blktap

from test_xen_datapath import XenVm


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("old_mode", [0o600, 0o640, 0o644])
def test_vhd_offline_new_leaves_are_0600(xen, tmp_path, old_mode):
    """The reported case (a 0600 leaf replaced by a 0644 one) and variants: snapshot and
    revert on a shut-off VM."""
    vm = XenVm(xen, tmp_path)
    for p in vm.paths.values():
        os.chmod(p, old_mode)
    r = vm.json("snapshot-create", vm.name, "s1")
    assert r["datapath"] == "vhd-offline"
    for d in r["disks"]:
        assert _mode(d["image"]) == old_mode             # the frozen image: renamed, as it was
        assert _mode(vm.paths[d["target"]]) == 0o600      # the new leaf at the disk's path
    vm.json("snapshot-revert", vm.name, "s1")
    for p in vm.paths.values():
        assert _mode(p) == 0o600


@pytest.mark.parametrize("old_mode", [0o600, 0o640])
def test_tapdisk_new_leaves_and_internal_images_are_0600(xen, tmp_path, old_mode):
    vm = XenVm(xen, tmp_path)
    for p in vm.paths.values():
        os.chmod(p, old_mode)
    vm.start()
    r = vm.create("s1")
    assert r["datapath"] == "tapdisk"
    for p in vm.paths.values():
        assert _mode(p) == 0o600
    vm.create("s2")
    vm.delete("s2")                   # an internal snapshot first: a new leaf again
    for p in vm.paths.values():
        assert _mode(p) == 0o600
    for f in listdir_images(vm.dir):
        assert _mode(os.path.join(vm.dir, f)) & 0o077 in (0, old_mode & 0o077), f
    vm.stop_and_verify()


def test_vhd_leaf_mode_does_not_depend_on_the_umask(xen, tmp_path):
    old = os.umask(0)
    try:
        vm = XenVm(xen, tmp_path)
        r = vm.json("snapshot-create", vm.name, "s1")
    finally:
        os.umask(old)
    for d in r["disks"]:
        assert _mode(vm.paths[d["target"]]) == 0o600
        assert vhd.check(vm.paths[d["target"]]) == [] == real_blktap.check(vm.paths[d["target"]])
