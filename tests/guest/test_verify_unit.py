"""verify() on synthetic rings (no guest): wrap-around, lost/torn/misplaced/foreign records."""
import pytest

from testguest import VerifyError, chain_digest, read_records, records, verify

RUN = "unit1"
RING_MIB = 1
N = records.nslots(RING_MIB)


def ring(newest, disk="vda", run=RUN):
    """The image a correct writer leaves after writing seq 0..newest."""
    img = bytearray(N * records.RECORD_SIZE)
    for seq in range(newest + 1):
        off = records.slot_offset(seq % N)
        img[off:off + records.RECORD_SIZE] = records.expected_record(run, disk, seq, N)
    return img


def put(img, seq, disk="vda", run=RUN, slot=None):
    slot = seq % N if slot is None else slot
    off = records.slot_offset(slot)
    img[off:off + records.RECORD_SIZE] = records.expected_record(run, disk, seq, N)


def check(tmp_path, img, last, **kw):
    p = tmp_path / "ring.raw"
    p.write_bytes(bytes(img))
    return verify(str(p), "vda", last, RING_MIB, RUN, image_format="raw", **kw)


def test_record_format_matches_init_sh_layout():
    rec = records.expected_record(RUN, "vda", 7, N)
    assert len(rec) == 4096
    sec = rec[512:1024]
    assert sec.startswith(b"LSNAP1 unit1 vda 7 7 1 7-7-7-") and sec.endswith(b"-\n")


@pytest.mark.parametrize("newest", [-1, 0, 5, N - 1, N, 3 * N + 17])
def test_correct_rings_pass(tmp_path, newest):
    res = check(tmp_path, ring(newest), newest)
    assert res.ok and res.newest_seq == newest
    assert res.written_slots == min(newest + 1, N)


def test_lost_write_after_wrap_names_slot(tmp_path):
    img = ring(2 * N + 40)
    put(img, N + 10)                      # slot 10 keeps the previous lap's record
    with pytest.raises(VerifyError) as e:
        check(tmp_path, img, 2 * N + 40)
    assert e.value.result.bad_slots == [10]
    assert "slot 10 " in str(e.value) and "expected seq %d" % (2 * N + 10) in str(e.value)


def test_missing_last_acked(tmp_path):
    img = ring(30)
    with pytest.raises(VerifyError) as e:
        check(tmp_path, img, 31)          # host saw ACK 31, image stops at 30
    assert e.value.result.bad_slots == [31] and "missing" in str(e.value)


def test_unacked_newer_write_needs_inflight(tmp_path):
    img = ring(31)
    with pytest.raises(VerifyError):
        check(tmp_path, img, 30)
    assert check(tmp_path, img, 30, inflight=1).newest_seq == 31


def test_torn_inflight_allowed_only_with_inflight(tmp_path):
    img = ring(N + 4)
    new = records.expected_record(RUN, "vda", N + 5, N)
    off = records.slot_offset(5)
    img[off:off + 1536] = new[:1536]      # 3 of 8 sectors of seq N+5 landed
    with pytest.raises(VerifyError) as e:
        check(tmp_path, img, N + 4)
    assert "torn" in str(e.value) and e.value.result.bad_slots == [5]
    res = check(tmp_path, img, N + 4, inflight=1)
    assert res.torn_slot == 5


def test_torn_acked_record_fails_even_with_inflight(tmp_path):
    img = ring(40)
    old = records.expected_record(RUN, "vda", 12, N)
    off = records.slot_offset(20)
    img[off + 512:off + 1024] = old[512:1024]
    with pytest.raises(VerifyError) as e:
        check(tmp_path, img, 40, inflight=1)
    assert e.value.result.bad_slots == [20]


@pytest.mark.parametrize("kind", ["disk", "run", "slot", "garbage"])
def test_foreign_or_misplaced_records(tmp_path, kind):
    img = ring(50)
    if kind == "disk":
        put(img, 9, disk="vdb")
    elif kind == "run":
        put(img, 9, run="other")
    elif kind == "slot":
        put(img, 8, slot=9)
    else:
        off = records.slot_offset(9)
        img[off:off + 4096] = b"\xa5" * 4096
    with pytest.raises(VerifyError) as e:
        check(tmp_path, img, 50)
    assert e.value.result.bad_slots == [9]


def test_read_records_and_digest(tmp_path):
    img = ring(N + 2)
    p = tmp_path / "r.raw"
    p.write_bytes(bytes(img))
    recs = read_records(str(p), RING_MIB, image_format="raw")
    assert recs[:4] == [N, N + 1, N + 2, 3] and recs[-1] == N - 1
    d1 = chain_digest(str(p), image_format="raw")
    img[100] ^= 1
    p.write_bytes(bytes(img))
    assert chain_digest(str(p), image_format="raw") != d1
