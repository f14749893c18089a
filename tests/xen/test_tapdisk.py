"""The tap-ctl wrapper driving the tapdisk stand-in (XEN-NOTES.md §8): pause drains and closes the
chain, the leaf can be swapped while paused, unpause -a reopens strictly, the guest's
acknowledged writes all survive, and ``paused()`` always unpauses."""
import hashlib
import os
import signal
import threading
import time

import pytest

from livesnap import vhd
from livesnap.tools import tap_ctl
from testxen import verify
from testxen.tapdisk import request

MiB = 1 << 20


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def vhd_fds(xen, pid):
    return [f for f in xen.open_files(pid) if f.endswith(".vhd")]


def test_pause_swap_leaf_unpause_keeps_every_acked_write(xen, tmp_path):
    leaf, base = str(tmp_path / "leaf.vhd"), str(tmp_path / "base.vhd")
    vhd.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    assert (disk.state, disk.type, disk.path) == (0, "vhd", leaf)
    assert tap_ctl.find(leaf) == disk
    assert tap_ctl.find(base) is None
    assert len(vhd_fds(xen, disk.pid)) == 1                 # the chain is open while running
    xen.wait_acks(disk, 30)
    ack = xen.ack_log(disk)

    with tap_ctl.paused(disk.pid, disk.minor) as win:
        t_in = time.monotonic_ns()
        assert tap_ctl.get(disk.pid, disk.minor).state == tap_ctl.PAUSED
        assert vhd_fds(xen, disk.pid) == []                  # pause closed the whole chain
        assert vhd.check(leaf) == []                         # footer + batmap flushed
        n_paused = xen.acked(disk)
        time.sleep(0.3)
        assert xen.acked(disk) == n_paused                   # no write completes while paused
        os.rename(leaf, base)
        vhd.snapshot(leaf, base)
        base_digest = sha(base)
    assert win.window_ms >= 300 and win.pause_ms < win.window_ms
    t_out = time.monotonic_ns()

    assert tap_ctl.get(disk.pid, disk.minor) == disk          # running, same path: the new leaf
    xen.wait_acks(disk, n_paused + 30)
    gap = verify.max_gap(ack, t_in, t_out)
    assert 300 <= gap < 30000                                # the guest saw the stall ...
    assert verify.max_gap(ack, t_out + 200 * 10**6) < 300     # ... and only then

    tap_ctl.pause(disk.pid, disk.minor)
    try:
        assert sha(base) == base_digest                       # writes went to the new leaf only
        assert vhd.check(base) == [] and vhd.check(leaf) == []
        info = vhd.query(leaf)
        assert info.parent == base and info.allocated_blocks > 0
        # the frozen image holds exactly the newest record per slot acked before the pause
        rep = verify.assert_intact(ack, base, until_ns=t_in, exact=True)
        assert rep.acked == n_paused
        # the chain holds every record acknowledged so far (nothing is in flight when paused)
        rep = verify.assert_intact(ack, leaf, exact=True)
        assert rep.acked > n_paused
    finally:
        tap_ctl.unpause(disk.pid, disk.minor, leaf)

    rc, out, err = xen.tap_ctl("destroy", "-p", disk.pid, "-m", disk.minor)
    assert rc == 0, err
    assert tap_ctl.list_() == []
    verify.assert_intact(ack, leaf, exact=True)
    assert vhd.check(leaf) == []                              # close flushed the footer


def test_unpause_refuses_a_size_change(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    vhd.create(leaf, 16 * MiB, max_size=64 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    tap_ctl.pause(disk.pid, disk.minor)
    vhd.grow(leaf, 32 * MiB)
    t0 = time.monotonic()
    with pytest.raises(tap_ctl.MediumChanged) as ei:
        tap_ctl.unpause(disk.pid, disk.minor, leaf)
    assert ei.value.rc == 124 and (ei.value.pid, ei.value.minor) == (disk.pid, disk.minor)
    assert time.monotonic() - t0 >= 9 * 0.05                 # retried 10 times, 0.05 s apart
    rc, _, _ = xen.tap_ctl("unpause", "-p", disk.pid, "-m", disk.minor)
    assert rc == 124                                          # also without -a
    assert tap_ctl.get(disk.pid, disk.minor).state == tap_ctl.PAUSED
    assert vhd_fds(xen, disk.pid) == []                       # refused: nothing left open
    with pytest.raises(tap_ctl.UnpauseFailed) as ei:
        tap_ctl.unpause(disk.pid, disk.minor, str(tmp_path / "missing.vhd"))
    assert ei.value.rc == 2 and not isinstance(ei.value, tap_ctl.MediumChanged)
    assert tap_ctl.get(disk.pid, disk.minor).path == leaf     # a failed unpause keeps the path


def test_unpause_retries_until_the_leaf_appears(xen, tmp_path):
    leaf, away = str(tmp_path / "leaf.vhd"), str(tmp_path / "away.vhd")
    vhd.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    tap_ctl.pause(disk.pid, disk.minor)
    os.rename(leaf, away)
    t = threading.Timer(0.15, os.rename, (away, leaf))
    t.start()
    try:
        tap_ctl.unpause(disk.pid, disk.minor, leaf)
    finally:
        t.join()
    n = xen.acked(disk)
    xen.wait_acks(disk, n + 5)


def test_paused_unpauses_on_exception_and_redelivers_signals(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    vhd.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    with pytest.raises(RuntimeError):
        with tap_ctl.paused(disk.pid, disk.minor):
            assert tap_ctl.get(disk.pid, disk.minor).state == tap_ctl.PAUSED
            raise RuntimeError("boom")
    assert tap_ctl.get(disk.pid, disk.minor).state == 0
    xen.wait_acks(disk, xen.acked(disk) + 5)

    reached = []
    with pytest.raises(KeyboardInterrupt):
        with tap_ctl.paused(disk.pid, disk.minor) as win:
            os.kill(os.getpid(), signal.SIGINT)              # only recorded here ...
            time.sleep(0.05)
            reached.append(True)
    assert reached and win.signals == [signal.SIGINT]        # ... delivered after the unpause
    assert tap_ctl.get(disk.pid, disk.minor).state == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_pause_timeout_is_ours_and_leaves_the_guest_running(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    vhd.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 5)
    rc, _, _ = xen.tap_ctl("pause", "-p", disk.pid, "-m", disk.minor, "-t", "5")
    assert rc == 22                                           # upstream's broken -t
    # a backend request that takes 3 s: the drain cannot finish within our 1 s timeout
    request(xen.entry(disk)["sock"], {"cmd": "stall", "seconds": 3})     # once in flight
    t0 = time.monotonic()
    with pytest.raises(tap_ctl.PauseTimeout) as ei:
        tap_ctl.pause(disk.pid, disk.minor, timeout=1.0)
    assert time.monotonic() - t0 < 2.5
    assert (ei.value.pid, ei.value.minor) == (disk.pid, disk.minor)
    assert tap_ctl.get(disk.pid, disk.minor).state == 0      # the abandoned pause is undone
    n = xen.acked(disk)
    xen.wait_acks(disk, n + 5)


def test_pause_and_unpause_errors_name_the_tapdisk(xen, tmp_path):
    leaf = str(tmp_path / "leaf.vhd")
    vhd.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    with pytest.raises(tap_ctl.PauseFailed) as ei:
        tap_ctl.pause(disk.pid, disk.minor + 7)
    assert ei.value.rc == 2 and "minor=%d" % (disk.minor + 7) in str(ei.value)
    with pytest.raises(tap_ctl.TapdiskNotFound):
        tap_ctl.get(disk.pid + 100000, disk.minor)
    # unpausing a running tapdisk on its own path is a no-op (idempotent), another path is not
    assert tap_ctl.unpause(disk.pid, disk.minor, leaf).state == 0
    with pytest.raises(tap_ctl.UnpauseFailed) as ei:
        tap_ctl.unpause(disk.pid, disk.minor, str(tmp_path / "other.vhd"))
    assert ei.value.rc == 22
    rc, _, err = xen.tap_ctl("create", "-a", "vhd:%s" % (tmp_path / "nope.vhd"))
    assert rc == 2, err


def test_two_tapdisks_get_their_own_minors(xen, tmp_path):
    a, b = str(tmp_path / "a.vhd"), str(tmp_path / "b.vhd")
    vhd.create(a, 16 * MiB)
    vhd.create(b, 16 * MiB)
    da, db = xen.create(a), xen.create(b)
    assert da.minor != db.minor and da.pid != db.pid
    assert sorted(d.path for d in tap_ctl.list_()) == [a, b]
    assert tap_ctl.list_(pid=db.pid) == [db]
    tap_ctl.pause(da.pid, da.minor)
    states = {d.path: d.state for d in tap_ctl.list_()}
    assert states == {a: 0x20, b: 0}
    rc, out, _ = xen.tap_ctl("list", "-f", a)
    assert out == "pid=%d minor=%d state=0x20 args=vhd:%s\n" % (da.pid, da.minor, a)
    tap_ctl.unpause(da.pid, da.minor)


def test_sigkill_loses_no_acknowledged_write(xen, tmp_path):
    """A crashed tapdisk leaves a stale footer/batmap; after repair every acked record is
    there (the writer acks only after its write returned)."""
    leaf = str(tmp_path / "leaf.vhd")
    vhd.create(leaf, 16 * MiB)
    disk = xen.create(leaf)
    xen.wait_acks(disk, 40)
    os.kill(disk.pid, signal.SIGKILL)
    xen.kill_all()
    assert vhd.check(leaf)                                    # stale primary footer
    vhd.repair(leaf)
    assert vhd.check(leaf) == []
    verify.assert_intact(xen.ack_log(disk), leaf)
