"""Fixtures for the writer test guest: a built kernel+initrd, a live libvirtd, and a factory of
writer guests (domains named lsg-test-*) that are always destroyed and undefined afterwards."""
import os
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import testguest  # noqa: E402

URI = "qemu:///system"


@pytest.fixture(scope="session")
def guest_image():
    return testguest.ensure_guest()


@pytest.fixture(scope="session")
def lsg_conn():
    import libvirt
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    try:
        c = libvirt.open(URI)
    except libvirt.libvirtError:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "start-libvirtd.sh")], check=True)
        c = libvirt.open(URI)
    yield c
    c.close()


qcow2 = testguest.create_qcow2


@pytest.fixture(scope="module")
def make_guest(guest_image, lsg_conn, tmp_path_factory):
    """make_guest(disks=None, cls=WriterGuest, **kw) -> started guest; disks default to two
    fresh qcow2 images (vda, vdb) of ring_mib MiB each in a temporary directory."""
    made = []

    def make(disks=None, ring_mib=1, interval_ms=10, start=True, cls=testguest.WriterGuest,
             **kw):
        name = "lsg-test-" + uuid.uuid4().hex[:10]
        if disks is None:
            d = tmp_path_factory.mktemp(name)
            disks = [(t, qcow2(d / (t + ".qcow2"), ring_mib), "qcow2") for t in ("vda", "vdb")]
        g = cls(name, disks, ring_mib=ring_mib, interval_ms=interval_ms,
                                  conn=lsg_conn, **kw)
        made.append(g)
        if start:
            g.start()
        return g

    yield make
    for g in made:
        try:
            g.cleanup()
        except Exception as e:  # keep tearing down the others
            print("teardown of %s failed: %s" % (g.name, e))
