"""The tap-ctl wrapper driving the real tapdisk (blktap, XEN-NOTES.md §8), with a guest writing
through it over NBD: pause drains and closes the chain, the leaf can be swapped while paused,
unpause -a reopens strictly, the guest's acknowledged writes all survive, and ``paused()``
always unpauses. Images are made and checked with the real vhd-util."""
import hashlib
import os
import signal
import threading
import time

import pytest

from livesnap.tools import tap_ctl
from testxen import blktap, verify

MiB = 1 << 20


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def vhd_fds(xen, pid):
    return [f for f in xen.open_files(pid) if f.endswith(".vhd")]


def test_pause_swap_leaf_unpause_keeps_every_acked_write(xen, tmp_path):
    leaf, base = str(tmp_path / "leaf.vhd"), str(tmp_path / "base.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    assert (disk.state, disk.type, disk.path) == (0, "vhd", leaf)
    assert tap_ctl.find(leaf) == disk
    assert tap_ctl.find(base) is None
    assert len(vhd_fds(xen, disk.pid)) == 1                 # the chain is open while running
    xen.wait_acks(disk, 30)
    ack = xen.ack_log(disk)

    with tap_ctl.paused(disk.pid, disk.minor) as win:
        t_in = time.monotonic_ns()
        assert tap_ctl.get(disk.pid, disk.minor).state & tap_ctl.PAUSED
        assert vhd_fds(xen, disk.pid) == []                  # pause closed the whole chain
        assert blktap.check(leaf) == []                      # footer + batmap flushed
        n_paused = xen.acked(disk)
        time.sleep(0.3)
        assert xen.acked(disk) == n_paused                   # no write completes while paused
        os.rename(leaf, base)
        rc, out, err = blktap.vhd_util("snapshot", "-n", leaf, "-p", base)
        assert rc == 0, err
        base_digest = sha(base)
    assert win.window_ms >= 300 and win.pause_ms < win.window_ms
    t_out = time.monotonic_ns()

    assert tap_ctl.get(disk.pid, disk.minor) == disk          # running, same path: the new leaf
    xen.wait_acks(disk, n_paused + 30)
    gap = verify.max_gap(ack, t_in, t_out)
    assert 300 <= gap < 30000                                # the guest saw the stall ...

    tap_ctl.pause(disk.pid, disk.minor)
    try:
        assert sha(base) == base_digest                       # writes went to the new leaf only
        assert blktap.check(base) == [] and blktap.check(leaf) == []
        assert blktap.query(leaf)["parent"] == base
        # the frozen image holds exactly the newest record per slot acked before the pause
        rep = verify.assert_intact(ack, base, until_ns=t_in, exact=True)
        assert rep.acked == n_paused
        # the chain holds every record acknowledged so far (nothing is in flight when paused)
        rep = verify.assert_intact(ack, leaf, exact=True)
        assert rep.acked > n_paused
    finally:
        tap_ctl.unpause(disk.pid, disk.minor, leaf)

    rc, out, err = xen.destroy(disk)
    assert rc == 0, err
    assert xen.mine(tap_ctl.list_()) == []
    verify.assert_intact(ack, leaf, exact=True)
    assert blktap.check(leaf) == []                           # close flushed the footer


def test_unpause_refuses_a_size_change(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    tap_ctl.pause(disk.pid, disk.minor)
    rc, out, err = blktap.vhd_util("resize", "-n", leaf, "-s", "32", "-j",
                                   str(tmp_path / "resize.journal"))
    assert rc == 0, (out, err)
    with pytest.raises(tap_ctl.MediumChanged) as ei:
        tap_ctl.unpause(disk.pid, disk.minor, leaf)
    assert ei.value.rc == 124 and (ei.value.pid, ei.value.minor) == (disk.pid, disk.minor)
    rc, _, _ = xen.tap_ctl("unpause", "-p", disk.pid, "-m", disk.minor)
    assert rc == 124                                          # also without -a
    assert tap_ctl.get(disk.pid, disk.minor).state & tap_ctl.PAUSED
    assert vhd_fds(xen, disk.pid) == []                       # refused: nothing left open
    assert tap_ctl.get(disk.pid, disk.minor).path == leaf


def test_unpause_retries_until_the_leaf_appears(xen, tmp_path):
    """tapdisk retries a failed reopen 10 times, 1 s apart (tapdisk-vbd.c; here 0.1 s apart:
    TESTXEN_TAPDISK_RETRY_MS)."""
    leaf, away = str(tmp_path / "leaf.vhd"), str(tmp_path / "away.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    tap_ctl.pause(disk.pid, disk.minor)
    os.rename(leaf, away)
    t = threading.Timer(0.25, os.rename, (away, leaf))
    t.start()
    try:
        tap_ctl.unpause(disk.pid, disk.minor, leaf)
    finally:
        t.join()
    xen.settle(disk)


def test_paused_unpauses_on_exception_and_redelivers_signals(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    with pytest.raises(RuntimeError):
        with tap_ctl.paused(disk.pid, disk.minor):
            assert tap_ctl.get(disk.pid, disk.minor).state & tap_ctl.PAUSED
            raise RuntimeError("boom")
    assert tap_ctl.get(disk.pid, disk.minor).state == 0
    xen.settle(disk)

    reached = []
    # Python's own SIGINT handler (a pytest-xdist worker may run with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with tap_ctl.paused(disk.pid, disk.minor) as win:
                os.kill(os.getpid(), signal.SIGINT)          # only recorded here ...
                time.sleep(0.05)
                reached.append(True)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert reached and win.signals == [signal.SIGINT]        # ... delivered after the unpause
    assert tap_ctl.get(disk.pid, disk.minor).state == 0


def test_pause_timeout_is_ours_and_leaves_the_guest_running(xen, tmp_path):
    """tapdisk stopped (SIGSTOP) cannot answer: livesnap's own timeout ends the pause command,
    and once tapdisk runs again the late pause is undone."""
    leaf = str(tmp_path / "leaf.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    rc, _, _ = xen.tap_ctl("pause", "-p", disk.pid, "-m", disk.minor, "-t", "5")
    assert rc != 0                                            # upstream's broken -t
    assert tap_ctl.get(disk.pid, disk.minor).state == 0
    os.kill(disk.pid, signal.SIGSTOP)
    t = threading.Timer(1.5, os.kill, (disk.pid, signal.SIGCONT))
    t.start()
    try:
        with pytest.raises(tap_ctl.PauseTimeout) as ei:
            tap_ctl.pause(disk.pid, disk.minor, timeout=1.0)
    finally:
        t.join()
        os.kill(disk.pid, signal.SIGCONT)
    assert (ei.value.pid, ei.value.minor) == (disk.pid, disk.minor)
    assert tap_ctl.get(disk.pid, disk.minor).state == 0      # the abandoned pause is undone
    xen.settle(disk)


def test_pause_and_unpause_errors_name_the_tapdisk(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    with pytest.raises(tap_ctl.PauseFailed) as ei:
        tap_ctl.pause(disk.pid, disk.minor + 7)
    assert "minor=%d" % (disk.minor + 7) in str(ei.value)
    with pytest.raises(tap_ctl.TapdiskNotFound):
        tap_ctl.get(disk.pid + 100000, disk.minor)
    # unpausing a running tapdisk on its own path is a no-op (idempotent), another path is not
    assert tap_ctl.unpause(disk.pid, disk.minor, leaf).state == 0
    with pytest.raises(tap_ctl.UnpauseFailed) as ei:
        tap_ctl.unpause(disk.pid, disk.minor, str(tmp_path / "other.vhd"))
    assert ei.value.rc == 22
    rc, _, err = xen.tap_ctl("create", "-a", "vhd:%s" % (tmp_path / "nope.vhd"))
    assert rc != 0, err


def test_two_tapdisks_get_their_own_minors(xen, tmp_path):
    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    blktap.create(a, 16 * MiB)
    blktap.create(b, 16 * MiB)
    da, db = xen.create(a), xen.create(b)
    assert da.minor != db.minor and da.pid != db.pid
    assert sorted(d.path for d in xen.mine(tap_ctl.list_())) == [a, b]
    assert tap_ctl.list_(pid=db.pid) == [db]
    tap_ctl.pause(da.pid, da.minor)
    states = {d.path: bool(d.state & tap_ctl.PAUSED) for d in xen.mine(tap_ctl.list_())}
    assert states == {a: True, b: False}
    rc, out, _ = xen.tap_ctl("list", "-f", a)
    assert out.startswith("pid=%d minor=%d state=0x" % (da.pid, da.minor))
    assert out.endswith(" args=vhd:%s\n" % a)
    tap_ctl.unpause(da.pid, da.minor)


def test_sigkill_loses_no_acknowledged_write(xen, tmp_path):
    """A crashed tapdisk leaves a stale footer/batmap; after ``vhd-util repair`` every acked
    record is there (the guest acks only after tapdisk answered the write)."""
    leaf = str(tmp_path / "leaf.vhd")
    blktap.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 40)
    os.kill(disk.pid, signal.SIGKILL)
    xen.kill_all()
    rc, out, err = blktap.vhd_util("repair", "-n", leaf)
    assert rc == 0, (out, err)
    assert blktap.check(leaf) == []
    verify.assert_intact(xen.ack_log(disk), leaf)


def test_a_tapdisk_is_found_under_either_spelling_of_its_path(xen):
    import shutil
    import uuid
    d = "lsx-%s" % uuid.uuid4().hex[:8]
    os.makedirs(os.path.join("/run", d))
    try:
        leaf = os.path.join("/var/run", d, "leaf.vhd")          # as SM spells it
        blktap.create(leaf, 16 * MiB)
        disk = xen.create(leaf, guest=False)
        assert tap_ctl.find(leaf) == disk
        assert tap_ctl.find(os.path.join("/run", d, "leaf.vhd")) == disk
    finally:
        xen.kill_all()
        shutil.rmtree(os.path.join("/run", d), ignore_errors=True)
