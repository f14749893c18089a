"""Shared fixtures: a libvirt connection to the real libvirtd, shut-off domains in tmp_path;
a volume group of the LVM stand-in."""
import os
import subprocess
import sys
import tempfile
import uuid

import pytest

from helpers import ROOT, URI, Dom
from livesnap import service


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: one of the suite's longest tests (about a minute "
                            "alone); run first, so that pytest-xdist's workers do not end "
                            "waiting for one started last")


def pytest_collection_modifyitems(config, items):
    """The ``slow`` tests first (otherwise in collection order): xdist hands tests out in this
    order, and the longest ones bound the run when they start last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def livesnap_service(tmp_path_factory):
    """The tests' ``livesnap`` processes run through one livesnap service, as on a host with
    ``livesnap install-service`` (``LIVESNAP_SERVICE=off``: each in its own process;
    tests/engine/test_service.py compares the two)."""
    if os.environ.get("LIVESNAP_SERVICE") == "off":
        yield None
        return
    sock = str(tmp_path_factory.mktemp("service") / "livesnap.sock")
    proc = subprocess.Popen([sys.executable, "-m", "livesnap", "service", "--socket", sock],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if not service.wait_listening(sock, proc):
        proc.kill()
        raise AssertionError("the livesnap service did not listen: %s" % (proc.communicate(),))
    os.environ["LIVESNAP_SERVICE"] = sock
    try:
        yield sock
    finally:
        os.environ.pop("LIVESNAP_SERVICE", None)
        proc.terminate()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err


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
    livesnap at it; everything removed in teardown. LVM is configured as in dom0: the
    default configuration (``LVM_SYSTEM_DIR``, dom0's /etc/lvm) refuses metadata writes,
    ``$LIVESNAP_LVM_MASTER_DIR`` (/etc/lvm/master) allows them (testxen.lvm.dom0_conf); SM's
    refcount files (/var/run/sm/refcount) live in ``$LIVESNAP_SM_REFCOUNT_DIR``."""
    from testxen import lvm as standin
    root = tempfile.mkdtemp(prefix="lvm", dir="/tmp")
    vg = "VG_XenStorage-%s" % uuid.uuid4()
    monkeypatch.setenv("TESTXEN_LVM_ROOT", root)
    monkeypatch.setenv("LVM", LVM)
    default, master = standin.dom0_conf(os.path.join(root, "etc-lvm"))
    monkeypatch.setenv("LVM_SYSTEM_DIR", default)
    monkeypatch.setenv("LIVESNAP_LVM_MASTER_DIR", master)
    monkeypatch.setenv("LIVESNAP_SM_REFCOUNT_DIR", os.path.join(root, "refcount"))
    v = standin.make_vg(root, vg, 8 << 30)
    try:
        yield v
    finally:
        standin.destroy_vg(root)


@pytest.fixture
def kvm_lvm_vg(lvm_vg, tmp_path, monkeypatch):
    """``lvm_vg`` with LVM configured as on a KVM host (Proxmox, oVirt): one writable
    configuration, no dom0 read-only default and no SM master directory, so livesnap's
    wrapper runs LVM with the caller's environment."""
    conf = tmp_path / "kvm-etc-lvm"
    conf.mkdir()
    (conf / "lvm.conf").write_text("global {\n\tmetadata_read_only = 0\n}\nbackup {\n\tbackup = 0\n"
                                     "\tarchive = 0\n}\n")
    monkeypatch.setenv("LVM_SYSTEM_DIR", str(conf))
    monkeypatch.delenv("LIVESNAP_LVM_MASTER_DIR")
    return lvm_vg
