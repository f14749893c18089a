"""The tapdisk of a disk is found whatever spelling of the image's path it was opened with.

On a host SM opens tapdisk on ``/var/run/sr-mount/<sr>/<vdi>.vhd`` while ``/var/run`` is a
link to ``/run`` (as here), and ``tap-ctl list -f`` compares strings. These tests open the
real tapdisk with the real tap-ctl (the blktap build of scripts/build-blktap.sh, through its
testbed wrapper that preloads the memlock shim; a missing build fails) on one spelling and
look it up with livesnap under another.
"""
import collections
import glob
import os
import re
import shutil
import subprocess
import uuid

import pytest

from livesnap.datapaths.vhd_files import TapdiskDatapath
from livesnap.platforms.xen_domain import XenDomainBase
from livesnap.tools import tap_ctl

from testxen import blktap as txblktap

MiB = 1 << 20
Disk = collections.namedtuple("Disk", "target path fmt device source_type readonly")


class RealTapdisks(object):
    def __init__(self, prefix):
        self.tap_ctl_bin = os.path.join(prefix, "testbed", "tap-ctl")
        self.vhd_util = os.path.join(prefix, "bin", "vhd-util")
        assert os.access(self.tap_ctl_bin, os.X_OK), self.tap_ctl_bin
        self.opened = []

    def run(self, *args):
        p = subprocess.run([self.tap_ctl_bin] + [str(a) for a in args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert p.returncode == 0, "tap-ctl %s: %s %s" % (args, p.stdout, p.stderr)
        return p.stdout

    def create_vhd(self, path, size_mb=16):
        subprocess.check_call([self.vhd_util, "create", "-n", path, "-s", str(size_mb)])

    def open(self, path):
        """``tap-ctl create -a vhd:PATH``: the new tapdisk, as tap-ctl lists it."""
        self.opened.append(os.path.realpath(path))        # found by its open file in close()
        out = self.run("create", "-a", "vhd:%s" % path)
        minor = int(re.search(r"(\d+)\s*$", out).group(1))     # .../tapdisk-<minor>
        new = [d for d in tap_ctl.list_(minor=minor) if d.path == path]
        assert len(new) == 1, new
        return new[0]

    def close(self):
        """Destroy (then kill) every tapdisk that holds a file this test opened."""
        for pid, fd_target in _tapdisk_fds():
            if fd_target not in self.opened:
                continue
            for d in [d for d in tap_ctl.list_(pid=pid)]:
                subprocess.run([self.tap_ctl_bin, "destroy", "-p", str(pid), "-m",
                                str(d.minor)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=60)
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def _tapdisk_fds():
    """[(pid, file)] of the open files of every tapdisk process."""
    out = []
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            pid = int(fd.split("/")[2])
            with open("/proc/%d/comm" % pid) as f:
                if f.read().strip() != "tapdisk":
                    continue
            target = os.readlink(fd)
            if target.endswith(" (deleted)"):          # run_dir is removed first
                target = target[:-len(" (deleted)")]
            out.append((pid, target))
        except (OSError, ValueError):
            pass
    return out


@pytest.fixture
def tapdisks(monkeypatch):
    t = RealTapdisks(txblktap.prefix())
    monkeypatch.setenv("TAP_CTL", t.tap_ctl_bin)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def run_dir():
    """A directory under /run, reached also as /var/run (a link to /run here, as on a host)."""
    assert os.path.realpath("/var/run") == "/run", "the test needs /var/run -> /run"
    d = "/run/livesnap-test-%s" % uuid.uuid4()
    os.makedirs(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Domain(XenDomainBase):
    name = "vm"
    uuid = "00000000-0000-0000-0000-000000000001"

    def __init__(self, paths):
        self.paths = paths

    def disks(self):
        return [Disk("xvd%s" % chr(ord("a") + i), p, "vhd", "disk", "file", False)
                for i, p in enumerate(self.paths)]


def test_tapdisk_opened_under_var_run_is_found_under_run(tapdisks, run_dir):
    leaf = os.path.join(run_dir, "leaf.vhd")
    other = os.path.join(run_dir, "other.vhd")
    tapdisks.create_vhd(leaf)
    tapdisks.create_vhd(other)
    sm_path = "/var/run" + leaf[len("/run"):]                  # how SM opens it
    td = tapdisks.open(sm_path)
    assert td.path == sm_path
    for spelling in (leaf, sm_path, run_dir + "//leaf.vhd", run_dir + "/./leaf.vhd",
                     "/var/run/../run" + leaf[len("/run"):]):
        assert tap_ctl.find(spelling) == td, spelling
        assert tap_ctl.list_(path=spelling) == [td], spelling
    assert tap_ctl.find(other) is None                         # another file is not it
    assert tap_ctl.find(os.path.join(run_dir, "gone.vhd")) is None
    assert Domain([leaf]).tapdisks() == {"xvda": td}


def test_tapdisk_opened_under_run_is_found_through_a_linked_directory(tapdisks, run_dir,
                                                                       tmp_path):
    leaf = os.path.join(run_dir, "leaf.vhd")
    tapdisks.create_vhd(leaf)
    td = tapdisks.open(leaf)
    link = str(tmp_path / "sr")
    os.symlink(run_dir, link)
    assert tap_ctl.find(os.path.join(link, "leaf.vhd")) == td
    assert Domain([os.path.join(link, "leaf.vhd")]).tapdisks() == {"xvda": td}


def test_heal_unpauses_under_the_name_tapdisk_was_opened_by(tapdisks, run_dir):
    """A tapdisk left paused is found and unpaused; it is reopened on the path it was opened
    with (SM looks its tapdisks up by that string), not on livesnap's spelling."""
    leaf = os.path.join(run_dir, "leaf.vhd")
    tapdisks.create_vhd(leaf)
    sm_path = "/var/run" + leaf[len("/run"):]
    td = tapdisks.open(sm_path)
    tap_ctl.pause(td.pid, td.minor)
    assert tap_ctl.get(td.pid, td.minor).state & tap_ctl.PAUSED
    healed = TapdiskDatapath(Domain([leaf])).heal()
    assert healed == ["xvda"]
    now = tap_ctl.get(td.pid, td.minor)
    assert now.state == 0 and now.path == sm_path


def test_a_freeze_makes_both_names_durable_with_one_fsync_before_the_unpause(
        tapdisks, run_dir, monkeypatch):
    """Inside the pause the leaf is renamed to the frozen name and a new leaf made at its
    path; both names must be durable before tapdisk writes the guest's data into the new
    leaf (the unpause), and one fsync of their directory does it (each is a journal commit
    while the guest waits)."""
    from livesnap.datapaths import vhd_storage
    leaf = os.path.join(run_dir, "leaf.vhd")
    frozen = os.path.join(run_dir, "leaf.internal.vhd")
    tapdisks.create_vhd(leaf)
    td = tapdisks.open(leaf)
    events = []
    real_sync, real_pause, real_unpause = (vhd_storage._fsync_directory, tap_ctl.pause,
                                           tap_ctl.unpause)

    def dir_sync(d):
        events.append(("fsync", d, os.path.exists(frozen) and vhd_is_child(leaf, frozen)))
        return real_sync(d)

    def pause(*a, **kw):
        events.append(("pause",))
        return real_pause(*a, **kw)

    def unpause(*a, **kw):
        events.append(("unpause",))
        return real_unpause(*a, **kw)

    monkeypatch.setattr(vhd_storage, "_fsync_directory", dir_sync)
    monkeypatch.setattr(tap_ctl, "pause", pause)
    monkeypatch.setattr(tap_ctl, "unpause", unpause)
    r = TapdiskDatapath(Domain([leaf])).do_internal_snapshot(
        {"disk": "xvda", "frozen_path": frozen, "leaf_path": leaf})
    assert r["pause_ms"] is not None
    window = events[events.index(("pause",)) + 1:events.index(("unpause",))]
    assert window == [("fsync", run_dir, True)]
    now = tap_ctl.get(td.pid, td.minor)
    assert now.state == 0 and now.path == leaf
    assert vhd_is_child(leaf, frozen)


def vhd_is_child(path, parent):
    from livesnap import vhd
    try:
        return os.path.abspath(vhd.parent_of(path) or "") == parent
    except vhd.VhdError:
        return False
