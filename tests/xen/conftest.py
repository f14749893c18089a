"""Fixtures for the Xen tool layer on the real blktap (scripts/build-blktap.sh; a missing build
fails the tests): livesnap's TAP_CTL and VHD_UTIL point at the real tap-ctl and vhd-util, each
disk is served by a real tapdisk whose guest (testxen/guest.py) writes through it over NBD, and
every tapdisk and guest a test started is stopped in teardown."""
import shutil
import tempfile

import pytest

from livesnap.tools import tap_ctl
from testxen import blktap


class Xen(object):
    """The real tapdisks of one test (``testxen.blktap.Tapdisks``), by livesnap's ``TapDisk``."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.tapdisks = blktap.Tapdisks(run_dir)

    def tap_ctl(self, *args):
        """Run the real tap-ctl: (rc, stdout, stderr)."""
        return blktap.tap_ctl(*args)

    def create(self, path, guest=True):
        """``tap-ctl create -a vhd:PATH`` and (``guest``) the guest writing through it; the new
        ``TapDisk`` as livesnap's wrapper lists it."""
        pid, minor = self.tapdisks.create(path, guest=guest)
        disk = tap_ctl.get(pid, minor)
        return disk

    def destroy(self, disk):
        """Stop the guest, then ``tap-ctl destroy``: (rc, out, err)."""
        return self.tapdisks.destroy(disk.pid, disk.minor)

    def ack_log(self, disk):
        return self.tapdisks.ack_log(disk.pid, disk.minor)

    def acked(self, disk):
        return self.tapdisks.acked(disk.pid, disk.minor)

    def wait_acks(self, disk, n, timeout=30.0):
        return self.tapdisks.wait_acks(disk.pid, disk.minor, n, timeout)

    def settle(self, disk, n=5):
        """Wait for ``n`` more acks: the guest's IO goes through again."""
        return self.wait_acks(disk, self.acked(disk) + n)

    def open_files(self, pid):
        return blktap.open_files(pid)

    def mine(self, disks):
        """Only the tapdisks this test started (other tests may run tapdisks too)."""
        return [d for d in disks if (d.pid, d.minor) in self.tapdisks.disks]

    def kill_all(self):
        self.tapdisks.close()


@pytest.fixture(scope="session")
def blktap_prefix():
    try:
        return blktap.prefix()
    except blktap.MissingBuild as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def xen(monkeypatch, blktap_prefix):
    run_dir = tempfile.mkdtemp(prefix="tx", dir="/tmp")
    for k, v in blktap.env().items():
        monkeypatch.setenv(k, v)
    x = Xen(run_dir)
    try:
        yield x
    finally:
        x.kill_all()
        shutil.rmtree(run_dir, ignore_errors=True)


