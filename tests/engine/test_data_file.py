"""A qcow2 image with an external data file (issue 16, class 10): its data lives outside
the image, so a merge that deletes the image would leave the data file behind, and the data
file escapes ``--storage-dir``. livesnap refuses such images before any change: a data
file outside the storage directories is ``PathOutsideStorage``, any other ``DataFileImage``.
"""
import os

import pytest

from livesnap import qcow2

from helpers import DISK_MIB, qemu_img
from test_bad_input import refused


def _with_data_file(dom, which, data):
    """Re-make the disk's leaf ("leaf") or its backing image ("base") with ``data`` as its
    external data file (the leaf keeps its backing file)."""
    leaf = dom.sources()["vda"]
    base = os.path.join(dom.dir, "vda-base.qcow2")
    if which == "base":
        os.unlink(base)
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=%s" % data, base,
                 "%dM" % DISK_MIB)
    else:
        os.unlink(leaf)
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=%s" % data, "-b", base,
                 "-F", "qcow2", leaf)
    assert qcow2.data_file(leaf if which == "leaf" else base) == data
    return leaf if which == "leaf" else base


@pytest.mark.parametrize("which", ["leaf", "base"])
def test_a_data_file_outside_the_storage_directory_is_refused(make_dom, tmp_path, which):
    dom = make_dom(ndisks=1)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    data = str(outside / "data.raw")
    _with_data_file(dom, which, data)
    refused(dom, ["snapshot-create", dom.name, "s1", "--storage-dir", dom.dir],
            [data, "outside the storage directory"])
    # without --storage-dir: still no image with a data file
    refused(dom, ["snapshot-create", dom.name, "s1"], ["external data file", data])
    assert os.path.exists(data)


@pytest.mark.parametrize("which", ["leaf", "base"])
def test_a_data_file_inside_the_storage_directory_is_refused_too(make_dom, which):
    dom = make_dom(ndisks=1)
    data = os.path.join(dom.dir, "vda-data.raw")
    image = _with_data_file(dom, which, data)
    err = refused(dom, ["snapshot-create", dom.name, "s1", "--storage-dir", dom.dir],
                  ["external data file", data, image])
    assert "refused before any change" in err
    refused(dom, ["snapshot-create", dom.name, "s1", "--dry-run"], ["external data file"])
    assert os.path.exists(data)


def test_a_relative_data_file_name_is_not_held_to_any_directory(make_dom):
    """QEMU opens a relative data file name relative to its own working directory."""
    dom = make_dom(ndisks=1)
    base = os.path.join(dom.dir, "vda-base.qcow2")
    os.unlink(base)
    cwd = os.getcwd()
    os.chdir(dom.dir)
    try:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=rel.raw", base,
                 "%dM" % DISK_MIB)
    finally:
        os.chdir(cwd)
    assert qcow2.data_file(base) == "rel.raw"
    refused(dom, ["snapshot-create", dom.name, "s1", "--storage-dir", dom.dir],
            ["rel.raw", "outside the storage directory"])


def test_images_without_a_data_file_read_none(make_dom, tmp_path):
    dom = make_dom(ndisks=1)
    for f in dom.files():
        assert qcow2.data_file(os.path.join(dom.dir, f)) is None
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    assert qcow2.data_file(str(raw)) is None
    assert qcow2.data_file(str(tmp_path / "missing")) is None
    dom.json("snapshot-create", dom.name, "s1", "--storage-dir", dom.dir)
