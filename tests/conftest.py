"""Shared fixtures: a libvirt connection to the real libvirtd, shut-off domains in tmp_path;
a volume group of the LVM stand-in."""
import os
import tempfile
import uuid

import pytest

from helpers import URI, Dom


@pytest.fixture(scope="session")
def conn():
    import libvirt
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    c = libvirt.open(URI)
    yield c
    c.close()


@pytest.fixture
def make_dom(conn, tmp_path):
    made = []

    def make(ndisks=2, base=True, sub=None):
        d = Dom(conn, tmp_path / (sub or "d%d" % len(made)), ndisks, base)
        made.append(d)
        return d
    yield make
    for d in made:
        d.destroy()


LVM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testxen", "lvm")


@pytest.fixture
def lvm_vg(monkeypatch):
    """A volume group ``VG_XenStorage-<uuid>`` of the LVM stand-in (real LVM metadata on a
    loop-device PV, loop devices for LVs at /dev/<vg>/<lv>), the ``LVM`` variable pointing
    livesnap at it; everything removed in teardown."""
    from testxen import lvm as standin
    root = tempfile.mkdtemp(prefix="lvm", dir="/tmp")
    vg = "VG_XenStorage-%s" % uuid.uuid4()
    monkeypatch.setenv("TESTXEN_LVM_ROOT", root)
    monkeypatch.setenv("LVM", LVM)
    v = standin.make_vg(root, vg, 8 << 30)
    try:
        yield v
    finally:
        standin.destroy_vg(root)
