"""A VHD whose primary footer is damaged (its checksum wrong) is refused before any change
(issue 16, class 10): libvhd's open would read the backup copy at offset 0 in silence, and the
image would be frozen into a snapshot that ``vhd-util check`` (and SM's GC) rejects. The
same for a damaged backup copy under a sound primary, and for both damaged."""
import hashlib
import os

import pytest

from helpers import listdir_images
from livesnap import vhd

from test_xen_datapath import XenVm


def _damage(path, where):
    """Change one byte of the footer copy at the end ("primary") or at 0 ("backup") without
    fixing its checksum (the timestamp's last byte)."""
    size = os.path.getsize(path)
    off = (size - 512 if where == "primary" else 0) + 27
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x5A]))


def _state(vm):
    out = {}
    for f in sorted(listdir_images(vm.dir)):
        with open(os.path.join(vm.dir, f), "rb") as fh:
            out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out, os.listdir(vm.state_dir) if os.path.isdir(vm.state_dir) else []


@pytest.mark.parametrize("where", [("primary",), ("backup",), ("primary", "backup")])
def test_a_leaf_with_a_damaged_footer_copy_is_refused_before_any_change(xen, tmp_path, where):
    vm = XenVm(xen, tmp_path)
    leaf = vm.paths["xvdb"]
    for w in where:
        _damage(leaf, w)
    before = _state(vm)
    p = vm.inproc("snapshot-create", vm.name, "s1", expect=None)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert p.stderr.startswith("error: ") and leaf in p.stderr
    assert ("%s footer" % where[0]) in p.stderr or "no valid footer" in p.stderr
    assert _state(vm)[0] == before[0]
    if len(where) == 1:                      # one sound copy: repaired, then accepted
        vhd.repair(leaf)
        assert vhd.check(leaf) == []
        vm.json("snapshot-create", vm.name, "s1")


def test_a_snapshot_image_damaged_later_is_refused_before_a_merge(xen, tmp_path):
    vm = XenVm(xen, tmp_path)
    r = vm.json("snapshot-create", vm.name, "s1")
    vm.json("snapshot-create", vm.name, "s2")
    frozen = [d["image"] for d in r["disks"] if d["target"] == "xvda"][0]
    _damage(frozen, "primary")
    before = _state(vm)[0]
    p = vm.inproc("snapshot-delete", vm.name, "s1", expect=None)
    assert p.returncode == 1 and "primary footer invalid" in p.stderr, p.stderr
    assert _state(vm)[0] == before
    vhd.repair(frozen)                       # what the message says to do
    vm.json("snapshot-delete", vm.name, "s1")


def test_sound_footers_and_a_short_primary_are_accepted(xen, tmp_path):
    vm = XenVm(xen, tmp_path)
    # a 511-byte primary footer (libvhd and vhd-util accept it)
    leaf = vm.paths["xvda"]
    with open(leaf, "r+b") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        f.seek(end - 512)
        footer = f.read(512)
        f.seek(end - 512)
        f.write(footer[:511])
        f.truncate(end - 1)
    assert vhd.query(leaf).virtual_size > 0
    vm.json("snapshot-create", vm.name, "s1")
