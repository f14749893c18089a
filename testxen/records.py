"""The guest's records (shared by the test guest, ``testxen.guest``, and ``testxen.verify``;
also the former tapdisk stand-in's).

Record (4096 bytes): ``>4s16sQIQ`` magic ``TXWR``, run id, seq, slot, write time (ns), then a
fill derived from (run id, seq), then a CRC-32 of everything before it in the last 4 bytes.
Slot = seq % slots, at byte offset slot * stride.
"""
import struct
import time
import zlib

MAGIC = b"TXWR"
RECORD_SIZE = 4096
HEADER = struct.Struct(">4s16sQIQ")


class TornRecord(ValueError):
    pass


def make_record(run_id, seq, slot, now_ns=None):
    if now_ns is None:
        now_ns = time.monotonic_ns()
    head = HEADER.pack(MAGIC, run_id, seq, slot, now_ns)
    fill_unit = struct.pack(">Q", seq) + run_id[:8]
    n = RECORD_SIZE - len(head) - 4
    fill = (fill_unit * (n // len(fill_unit) + 1))[:n]
    body = head + fill
    return body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def parse_record(buf):
    """(run_id, seq, slot) of a record, None for an all-zero (never written) slot; a record
    that is neither raises ``TornRecord``."""
    if len(buf) != RECORD_SIZE:
        raise TornRecord("short record (%d bytes)" % len(buf))
    if not any(buf):
        return None
    magic, run_id, seq, slot, _ = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise TornRecord("bad magic %r" % magic)
    (crc,) = struct.unpack_from(">I", buf, RECORD_SIZE - 4)
    if zlib.crc32(buf[:-4]) & 0xFFFFFFFF != crc:
        raise TornRecord("bad CRC (seq %d slot %d)" % (seq, slot))
    if make_record(run_id, seq, slot, HEADER.unpack_from(buf)[4]) != bytes(buf):
        raise TornRecord("fill does not match seq %d" % seq)
    return run_id, seq, slot
