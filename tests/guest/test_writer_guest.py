"""The writer guest under a real libvirtd/QEMU (TCG here): it boots, writes every disk, its ACKs
are all found by verify() through the chain, a live snapshot reads what it read when taken,
tampering is caught by slot, and max_gap measures a stall."""
import os
import subprocess
import threading
import time

import pytest

import testguest
from testguest import VerifyError, chain_digest, read_records, records, verify
from testguest import create_qcow2 as qcow2

RING_MIB = 1
PAUSE = 1.0
N = records.nslots(RING_MIB)


def qemu_io(image, cmd):
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, image], check=True,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def run(make_guest, tmp_path_factory):
    """One guest, two disks (vdb already on a 2-image chain), a live disk-only snapshot while it
    writes, a PAUSE s writer pause, a live verify, then a clean stop. Returns the facts."""
    import libvirt
    d = tmp_path_factory.mktemp("chain")
    vda = qcow2(d / "vda.qcow2", RING_MIB)
    vdb_base = qcow2(d / "vdb-base.qcow2", RING_MIB)
    vdb = qcow2(d / "vdb.qcow2", RING_MIB, backing=vdb_base)
    f = {"images": {"vda": vda, "vdb": vdb}, "dir": d}
    t0 = time.monotonic()
    g = make_guest([("vda", vda, "qcow2"), ("vdb", vdb, "qcow2")], ring_mib=RING_MIB)
    f["boot_s"] = time.monotonic() - t0
    f["guest"] = g
    g.wait_acks(10, timeout=60)

    # Live external disk-only snapshot: the disks' sources change under the guest.
    f["before_snap"] = {t: g.last_acked(t) for t in g.targets}
    over = {t: str(d / ("%s.s1.qcow2" % t)) for t in g.targets}
    xml = ("<domainsnapshot><name>s1</name><disks>%s</disks></domainsnapshot>"
           % "".join("<disk name='%s' snapshot='external'><source file='%s'/></disk>" % (t, p)
                     for t, p in over.items()))
    ts = time.monotonic()
    g.dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    f["snap_window"] = (ts, time.monotonic())
    f["after_snap"] = g.sync_acks()        # every ACK printed before now (console lag)
    f["overlays"] = over
    f["frozen_digest"] = {t: chain_digest(f["images"][t]) for t in g.targets}
    f["frozen_records"] = {t: read_records(f["images"][t], RING_MIB) for t in g.targets}
    f["sources"] = g.disk_sources()
    f["chains"] = g.disk_chains()
    g.wait_acks(10, timeout=60)

    # A writer pause of PAUSE s that max_gap must see.
    last = g.pause_writes()
    f["live_verify"] = {t: verify(over[t], t, last[t], RING_MIB, g.run_id) for t in g.targets}
    p0 = time.monotonic()
    time.sleep(PAUSE)
    g.resume_writes()
    f["pause_window"] = (p0, time.monotonic())
    g.wait_acks(5, timeout=60)
    f["last"] = g.stop()
    f["clean"] = g.clean_stop
    return f


def test_boots_and_writes_every_disk_in_order(run):
    g = run["guest"]
    assert run["boot_s"] < 60
    for t in ("vda", "vdb"):
        acks = g.acks(t)
        assert len(acks) >= 25
        assert [a.seq for a in acks] == list(range(len(acks)))   # no ACK line lost
        assert all(b.guest_ts > a.guest_ts for a, b in zip(acks, acks[1:]))
        assert all(b.host_ts >= a.host_ts for a, b in zip(acks, acks[1:]))
        assert run["last"][t] == acks[-1].seq
    assert run["clean"] is True
    assert "jiffies" not in (g.clocksource or "jiffies")


def test_verify_finds_every_acked_write_after_snapshot(run):
    g = run["guest"]
    for t in g.targets:
        res = verify(run["overlays"][t], t, run["last"][t], RING_MIB, g.run_id)
        assert res.ok and res.newest_seq == run["last"][t]
        assert res.written_slots == run["last"][t] + 1


def test_live_verify_while_paused(run):
    for t, res in run["live_verify"].items():
        assert res.ok and res.newest_seq == res.last_acked_seq


def test_disk_sources_follow_the_snapshot(run):
    for t in ("vda", "vdb"):
        assert run["sources"][t] == run["overlays"][t]
        assert run["chains"][t][:2] == [run["overlays"][t], run["images"][t]]
    assert run["chains"]["vdb"][2:] == [str(run["dir"] / "vdb-base.qcow2")]
    # The persistent definition (read after the stop) follows too.
    assert run["guest"].disk_sources() == run["overlays"]


def test_snapshot_reads_what_it_read_when_taken(run):
    g = run["guest"]
    for t in g.targets:
        frozen = run["images"][t]
        assert chain_digest(frozen) == run["frozen_digest"][t]
        assert read_records(frozen, RING_MIB) == run["frozen_records"][t]
        # Every write ACKed before the snapshot started is in it; one racing write may be too.
        b, a = run["before_snap"][t], run["after_snap"][t]
        res = verify(frozen, t, b, RING_MIB, g.run_id, inflight=a - b + 1)
        assert b <= res.newest_seq < run["last"][t]


def test_max_gap_sees_the_pause_and_is_sane(run):
    g = run["guest"]
    p0, p1 = run["pause_window"]
    assert PAUSE <= g.max_gap(None, p0, p1, clock="host") < PAUSE + 5
    assert abs(g.max_gap(None, p0, p1, clock="guest") - g.max_gap(None, p0, p1, clock="host")) < 0.25
    # Away from the pause, gaps are those of a throttled writer: well under the pause.
    stats = g.gap_stats(None, None, p0 - 0.5)
    assert stats["n"] >= 20 and 0 < stats["median"] < 0.2 and stats["max"] < PAUSE
    assert g.max_gap("vda", None, p0 - 0.5) >= stats["median"]
    s0, s1 = run["snap_window"]
    assert 0 < g.max_gap(None, s0, s1) < 5
    assert g.max_gap(None, 0, g.started_at) == 0.0        # window before any ACK


def flat_copy(run, tmp_path, disk):
    p = str(tmp_path / (disk + "-flat.qcow2"))
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", run["overlays"][disk], p], check=True)
    return p


def test_tampered_last_acked_record_is_caught(run, tmp_path):
    g, t = run["guest"], "vda"
    img = flat_copy(run, tmp_path, t)
    last = run["last"][t]
    verify(img, t, last, RING_MIB, g.run_id)
    qemu_io(img, "write -P 0x5a %d 4096" % records.slot_offset(last % N))
    with pytest.raises(VerifyError) as e:
        verify(img, t, last, RING_MIB, g.run_id)
    assert e.value.result.bad_slots == [last % N]
    assert "slot %d " % (last % N) in str(e.value)


def test_lost_middle_write_through_an_overlay_is_caught(run, tmp_path):
    """Zero one acked record in a new overlay on top of the guest's chain: the overlay fails,
    the chain below still verifies."""
    g, t = run["guest"], "vdb"
    top = qcow2(tmp_path / "top.qcow2", RING_MIB, backing=run["overlays"][t])
    qemu_io(top, "write -z %d 4096" % records.slot_offset(3))
    with pytest.raises(VerifyError) as e:
        verify(top, t, run["last"][t], RING_MIB, g.run_id)
    assert e.value.result.bad_slots == [3] and "lost write" in str(e.value)
    verify(run["overlays"][t], t, run["last"][t], RING_MIB, g.run_id)


def test_torn_acked_record_and_wrong_disk_are_caught(run, tmp_path):
    g, t = run["guest"], "vda"
    img = flat_copy(run, tmp_path, t)
    qemu_io(img, "write -P 0 %d 512" % (records.slot_offset(7) + 1024))
    with pytest.raises(VerifyError) as e:
        verify(img, t, run["last"][t], RING_MIB, g.run_id, inflight=1)
    assert e.value.result.bad_slots == [7] and "torn" in str(e.value)
    with pytest.raises(VerifyError):
        verify(run["overlays"]["vdb"], "vda", run["last"]["vda"], RING_MIB, g.run_id)


class _HeldConsole(object):
    """The guest's console socket as a loaded host reads it: while held, what arrives is kept
    from the reader (the guest writes on, its ACK lines wait); sending STOP (a STOP/GO round
    trip) lets everything through again, in order."""

    def __init__(self, sock):
        self.sock = sock
        self.cv = threading.Condition()
        self.holding = False
        self.kept = b""

    def hold(self):
        with self.cv:
            self.holding = True

    def acks_kept(self, disk):
        with self.cv:
            return self.kept.count(("ACK %s " % disk).encode())

    def recv(self, n):
        while True:
            data = self.sock.recv(n)
            with self.cv:
                self.kept += data
                if not self.holding or not data:
                    out, self.kept = self.kept, b""
                    return out
                self.cv.notify_all()

    def sendall(self, data):
        if data.startswith(b"STOP"):
            with self.cv:
                self.holding = False
        return self.sock.sendall(data)

    def close(self):
        self.sock.close()


class _LaggingGuest(testguest.WriterGuest):
    """A writer guest whose console the test can hold back (``console.hold()``)."""
    console = None

    def _connect(self, timeout):
        self.console = _HeldConsole(super(_LaggingGuest, self)._connect(timeout))
        return self.console


def test_acks_the_host_has_not_read_yet_are_counted_by_sync_acks(make_guest, tmp_path):
    """The online tests bound what a snapshot's frozen image may hold by the guest's last
    ACK after the snapshot; the host reads the console behind the guest, so that bound is
    ``sync_acks()``, not ``last_acked()`` (a CI run saw a frozen image hold seq 503 while
    the host had read ACKs up to 501 when the snapshot call returned). Here the console is
    held back while the guest writes, and the snapshot is taken then."""
    import libvirt
    g = make_guest(cls=_LaggingGuest)
    g.wait_acks(5, timeout=60)
    g.console.hold()
    with g.console.cv:
        assert g.console.cv.wait_for(
            lambda: all(g.console.acks_kept(t) >= 3 for t in g.targets), timeout=60)
    before = {t: g.last_acked(t) for t in g.targets}
    over = {t: str(tmp_path / ("%s.s1.qcow2" % t)) for t in g.targets}
    xml = ("<domainsnapshot><name>s1</name><disks>%s</disks></domainsnapshot>"
           % "".join("<disk name='%s' snapshot='external'><source file='%s'/></disk>" % (t, p)
                     for t, p in over.items()))
    frozen = dict(g.disk_sources())
    g.dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    read_so_far = {t: g.last_acked(t) for t in g.targets}
    synced = g.sync_acks()
    for t in g.targets:
        assert read_so_far[t] == before[t]            # the console was held: nothing new read
        # the frozen image holds writes the host had not read the ACKs of ...
        with pytest.raises(VerifyError, match="beyond last acknowledged"):
            verify(frozen[t], t, before[t], RING_MIB, g.run_id,
                   inflight=read_so_far[t] - before[t] + 1)
        # ... and sync_acks() counts them
        assert synced[t] >= before[t] + 3
        res = verify(frozen[t], t, before[t], RING_MIB, g.run_id,
                     inflight=synced[t] - before[t] + 1)
        assert before[t] + 3 <= res.newest_seq <= synced[t] + 1
    g.wait_acks(3, timeout=60)                        # writing again after the round trip
    assert g.sync_acks() == {t: g.last_acked(t) for t in g.targets}
