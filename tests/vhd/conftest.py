"""Fixtures and helpers for the VHD engine tests: cross-readers (qemu-img, libvhdi)."""
import os
import subprocess

import pytest

import pyvhdi

from livesnap import vhd

MiB = 1 << 20


def pyvhdi_read_chain(paths):
    """Read the whole disk of chain ``paths`` (leaf first) through libvhdi."""
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(p)
        files.append(f)
    for child, parent in zip(files, files[1:]):
        child.set_parent(parent)
    try:
        leaf = files[0]
        return leaf.read_buffer_at_offset(leaf.get_media_size(), 0)
    finally:
        for f in files:
            f.close()


def pyvhdi_read(path):
    return pyvhdi_read_chain(vhd.chain_paths(path))


def qemu_read(path, tmp_path):
    """The disk of a dynamic VHD as qemu-img (-f vpc) converts it to raw."""
    out = str(tmp_path / ("qemu-%s.raw" % os.path.basename(path)))
    subprocess.check_call(["qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out])
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


class Cross(object):
    """The cross-readers as a fixture object (tests import nothing from conftest)."""
    chain = staticmethod(pyvhdi_read_chain)
    libvhdi = staticmethod(pyvhdi_read)

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path

    def qemu(self, path):
        return qemu_read(path, self.tmp_path)


@pytest.fixture
def cross(tmp_path):
    return Cross(tmp_path)


@pytest.fixture
def mk(tmp_path):
    """mk(name, size) -> path of a new dynamic VHD in tmp_path."""
    def make(name, size=8 * MiB, **kw):
        return vhd.create(str(tmp_path / name), size, **kw)
    return make
