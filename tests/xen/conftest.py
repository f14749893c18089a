"""Fixtures for the Xen tool layer: the tapdisk stand-in behind a ``tap-ctl``-compatible command
(``testxen/tap-ctl``), one private run directory per test, every stand-in killed in teardown."""
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest

from livesnap.tools import tap_ctl
from testxen import tapctl


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAP_CTL = os.path.join(ROOT, "testxen", "tap-ctl")


class Xen(object):
    """The stand-in world of one test."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.pids = set()

    def tap_ctl(self, *args):
        """Run the stand-in tap-ctl: (rc, stdout, stderr)."""
        p = subprocess.run([TAP_CTL] + [str(a) for a in args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    def create(self, path):
        """``tap-ctl create -a vhd:PATH``; the new ``TapDisk``."""
        rc, out, err = self.tap_ctl("create", "-a", "vhd:%s" % path)
        assert rc == 0, err
        assert out.startswith("/dev/xen/blktap-2/tapdev")
        minor = int(out.strip()[len("/dev/xen/blktap-2/tapdev"):])
        disk, = tap_ctl.list_(minor=minor)
        self.pids.add(disk.pid)
        return disk

    def entry(self, disk):
        with open(os.path.join(self.run_dir, "tapdisk%d.%d.json" % (disk.pid, disk.minor))) as f:
            return json.load(f)

    def ack_log(self, disk):
        return os.path.join(self.run_dir, "tapdisk%d.%d.ack" % (disk.pid, disk.minor))

    def acked(self, disk):
        with open(self.ack_log(disk)) as f:
            return sum(1 for line in f if line.startswith("ACK "))

    def wait_acks(self, disk, n, timeout=10.0):
        """Wait until at least ``n`` acks are in the log; the count."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.acked(disk)
            if c >= n:
                return c
            assert time.monotonic() < deadline, "only %d of %d acks" % (c, n)
            time.sleep(0.01)

    def open_files(self, pid):
        out = []
        for fd in glob.glob("/proc/%d/fd/*" % pid):
            try:
                out.append(os.readlink(fd))
            except OSError:
                pass
        return out

    def kill_all(self):
        survivors = tapctl.kill_all(self.run_dir, self.pids)
        assert not survivors, "stand-in tapdisks survived SIGKILL: %s" % survivors


@pytest.fixture
def xen(monkeypatch):
    run_dir = tempfile.mkdtemp(prefix="tx", dir="/tmp")      # short: unix socket paths
    monkeypatch.setenv("TAP_CTL", TAP_CTL)
    monkeypatch.setenv("TESTXEN_RUN_DIR", run_dir)
    monkeypatch.setenv("TESTXEN_WRITER_INTERVAL", "0.003")
    monkeypatch.setenv("TESTXEN_SLOTS", "8")
    monkeypatch.setenv("TESTXEN_STRIDE", str(1 << 20))      # 8 slots over 4 VHD blocks
    monkeypatch.setenv("TESTXEN_RETRY_INTERVAL", "0.05")
    monkeypatch.setenv("TESTXEN_MAX_LIFETIME", "600")        # a safety net if teardown is skipped
    x = Xen(run_dir)
    try:
        yield x
    finally:
        x.kill_all()
        shutil.rmtree(run_dir, ignore_errors=True)

