"""The checker itself must catch lost and torn writes; tap-ctl list parsing."""
import pytest

from livesnap import vhd
from livesnap.tools import tap_ctl
from testxen import verify
from testxen.records import RECORD_SIZE, TornRecord, make_record, parse_record

MiB = 1 << 20
RUN = bytes(range(16))


def fake_run(tmp_path, seqs, slots=4, stride=RECORD_SIZE):
    """A VHD holding records of ``seqs`` (in order) and an ack log acknowledging them."""
    path = str(tmp_path / "d.vhd")
    vhd.create(path, 4 * MiB)
    ack = str(tmp_path / "ack")
    with open(ack, "w") as f:
        f.write("RUN %s slots=%d stride=%d size=%d path=%s\n" % (RUN.hex(), slots, stride,
                                                                4 * MiB, path))
        for i, seq in enumerate(seqs):
            vhd.write(path, (seq % slots) * stride, make_record(RUN, seq, seq % slots))
            f.write("ACK %d %d\n" % (seq, 1000 + i * 10**6))
    return path, ack


def test_verify_accepts_intact_and_flags_lost_or_torn(tmp_path):
    path, ack = fake_run(tmp_path, range(1, 11))
    rep = verify.assert_intact(ack, path, exact=True)
    assert rep.acked == 10 and rep.problems == []
    # an older record in slot 2: the ack of seq 10 is lost
    vhd.write(path, 2 * RECORD_SIZE, make_record(RUN, 6, 2))
    problems = verify.verify(ack, path).problems
    assert problems == ["slot 2: has seq 6, acked seq 10 lost"]
    # only the acks up to seq 6 are expected in an image frozen then
    assert verify.verify(ack, path, until_ns=1000 + 5 * 10**6).problems == []
    # a torn record: half new, half old
    rec = bytearray(make_record(RUN, 10, 2))
    rec[2048:] = make_record(RUN, 6, 2)[2048:]
    vhd.write(path, 2 * RECORD_SIZE, bytes(rec))
    problems = verify.verify(ack, path).problems
    assert len(problems) == 1 and "torn" in problems[0]
    with pytest.raises(AssertionError):
        verify.assert_intact(ack, path)
    # a zeroed slot that was acked
    vhd.write(path, 2 * RECORD_SIZE, bytes(RECORD_SIZE))
    assert verify.verify(ack, path).problems == ["slot 2: empty, acked seq 10 lost"]


def test_record_roundtrip_and_tearing():
    rec = make_record(RUN, 77, 5)
    assert len(rec) == RECORD_SIZE and parse_record(rec) == (RUN, 77, 5)
    assert parse_record(bytes(RECORD_SIZE)) is None
    bad = bytearray(rec)
    bad[100] ^= 1
    with pytest.raises(TornRecord):
        parse_record(bytes(bad))


def test_max_gap(tmp_path):
    ack = tmp_path / "ack"
    ack.write_text("RUN %s slots=1 stride=4096 size=1 path=/x\n" % RUN.hex() +
                   "".join("ACK %d %d\n" % (i, t) for i, t in enumerate(
                       [0, 10**6, 2 * 10**6, 52 * 10**6, 53 * 10**6, 60 * 10**6], 1)))
    assert verify.max_gap(str(ack)) == 50.0
    assert verify.max_gap(str(ack), 53 * 10**6, 70 * 10**6) == 7.0
    assert verify.max_gap(str(ack), 0, 1.5 * 10**6) == 1.0


def test_parse_tap_ctl_list():
    out = ("pid=2612 minor=0 state=0 args=vhd:/run/sr-mount/8c0a/a b.vhd\n"
           "pid=2700 minor=3 state=0x20 args=vhd:/dev/VG_XenStorage-8c0a/VHD-1f2e\n"
           "pid=2800\n"
           "minor=5\n\n")
    assert tap_ctl.parse_list(out) == [
        tap_ctl.TapDisk(2612, 0, 0, "vhd", "/run/sr-mount/8c0a/a b.vhd"),
        tap_ctl.TapDisk(2700, 3, 0x20, "vhd", "/dev/VG_XenStorage-8c0a/VHD-1f2e"),
        tap_ctl.TapDisk(2800, None, None, None, None),
        tap_ctl.TapDisk(None, 5, None, None, None)]
    for bad in ("  2612    0    0        vhd /x\n", "pid=1 args=nocolon\n"):
        with pytest.raises(ValueError):
            tap_ctl.parse_list(bad)
