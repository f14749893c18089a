"""The test bed's handling of real tapdisks (testxen/blktap.py): what a killed tapdisk leaves
is removed, and only that.

A SIGKILLed tapdisk leaves its metrics in /dev/shm (``td3-<pid>/vdi-<minor>``...,
``metrics/tap-<pid>-<minor>``), which tapdisk creates with O_EXCL: a later tapdisk that gets
the same pid (pid_max 32768) and minor failed ``tap-ctl create`` with "File exists". And the
minor's ID file may be removed only while it is still the dead tapdisk's: once tap-ctl freed
the minor another tapdisk may hold it, and removing that one's ID file let a third tapdisk get
the same minor (``tap-ctl list -m N`` named two tapdisks; their creates failed with EINVAL when
the file went between tap-ctl's allocate and tapdisk's attach)."""
import os
import time

from testxen import blktap

MiB = 1 << 20


def _named_for(pid):
    return blktap._pid_files(pid)


def _plant(path, age=0.0, directory=False):
    if directory:
        os.makedirs(path)
        with open(os.path.join(path, "vdi-0"), "w"):
            pass
    else:
        with open(path, "w"):
            pass
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def _dead_pid():
    """A pid no process has (from the top of the pid range, well above the live ones)."""
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read()) - 1
    for pid in range(top, top - 1000, -1):
        if not os.path.exists("/proc/%d" % pid):
            return pid
    raise AssertionError("no free pid near %d" % top)


def test_a_killed_tapdisk_leaves_nothing_named_for_its_pid(tmp_path):
    path = str(tmp_path / "a.vhd")
    blktap.create(path, 16 * MiB)
    pid, minor = blktap.spawn(path)
    marker = blktap._marker_path(minor)
    assert os.path.exists(os.path.join(blktap.SHM, "td3-%d" % pid))
    # files of other pids whose names end in this pid's digits
    decoys = [_plant(os.path.join(blktap.RUN, "ctl9%d" % pid)),
              _plant(os.path.join(blktap.RUN, "nbd9%d.%d" % (pid, minor))),
              _plant(os.path.join(blktap.SHM, "metrics", "tap-9%d-%d" % (pid, minor))),
              _plant(os.path.join(blktap.SHM, "td3-9%d" % pid), directory=True)]
    try:
        blktap.kill(pid, minor)
        assert not blktap._alive(pid)
        assert _named_for(pid) == []
        assert not os.path.exists(marker)
        assert [d for d in decoys if not os.path.exists(d)] == []
    finally:
        for d in decoys:
            blktap._remove(d)


def test_a_late_clean_up_spares_the_minor_another_tapdisk_got(tmp_path):
    """tap-ctl destroyed the tapdisk (and freed its minor), and tap-ctl allocated that minor
    again before the test bed's clean-up ran: the new ID file stays."""
    path = str(tmp_path / "a.vhd")
    blktap.create(path, 16 * MiB)
    pid, minor = blktap.spawn(path)
    rc, out, err = blktap.tap_ctl("destroy", "-p", pid, "-m", minor)
    assert rc == 0, (out, err)
    marker = blktap._marker_path(minor)
    assert not os.path.exists(marker)               # tap-ctl freed it
    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)   # as tap-ctl allocate
    os.close(fd)
    try:
        blktap._forget(pid, minor)
        assert os.path.exists(marker)
    finally:
        os.unlink(marker)


def test_sweep_removes_what_dead_tapdisks_left_and_spares_the_living(tmp_path):
    path = str(tmp_path / "a.vhd")
    blktap.create(path, 16 * MiB)
    dead = _dead_pid()
    stale = [_plant(os.path.join(blktap.SHM, "td3-%d" % dead), age=60, directory=True),
             _plant(os.path.join(blktap.SHM, "metrics", "tap-%d-0" % dead), age=60),
             _plant(os.path.join(blktap.RUN, "ctl%d" % dead), age=60),
             _plant(os.path.join(blktap.RUN, "nbd%d.0" % dead), age=60)]
    young = _plant(os.path.join(blktap.RUN, "nbdclient%d" % dead))    # too recent to judge
    pid, minor = blktap.spawn(path)                 # sweeps
    try:
        assert [s for s in stale if os.path.exists(s)] == []
        assert os.path.exists(young)
        live = _named_for(pid)
        assert os.path.join(blktap.SHM, "td3-%d" % pid) in live
        assert os.path.join(blktap.RUN, "ctl%d" % pid) in live
        blktap.sweep(min_age=0)
        assert sorted(_named_for(pid)) == sorted(live)
        assert not os.path.exists(young)
        rc, out, _ = blktap.tap_ctl("list", "-m", minor)
        assert "pid=%d minor=%d" % (pid, minor) in out
    finally:
        blktap._remove(young)
        assert blktap.destroy(pid, minor) == 0
