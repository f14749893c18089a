"""The on-disk record format the guest's /init writes (keep in step with init.sh)."""

import re

MAGIC = "LSNAP1"
RECORD_SIZE = 4096
SECTOR_SIZE = 512
SECTORS = RECORD_SIZE // SECTOR_SIZE
SLOTS_PER_MIB = (1 << 20) // RECORD_SIZE

RUN_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def nslots(ring_mib):
    return int(ring_mib) * SLOTS_PER_MIB


def slot_offset(slot):
    return slot * RECORD_SIZE


def padding(seq):
    """The seq-dependent filler: "<seq>-" doubled 8 times (as init.sh builds it)."""
    return ("%d-" % seq) * 256


def expected_sector(run_id, disk, seq, slot, k):
    text = "%s %s %s %d %d %d %s" % (MAGIC, run_id, disk, seq, slot, k, padding(seq))
    return (text[:511].ljust(511) + "\n").encode("ascii")


def expected_record(run_id, disk, seq, nslots_):
    slot = seq % nslots_
    return b"".join(expected_sector(run_id, disk, seq, slot, k) for k in range(SECTORS))


class Sector(object):
    """One parsed 512-byte sector: fields, or why it is not a valid sector."""

    __slots__ = ("run_id", "disk", "seq", "slot", "k", "error", "zero")

    def __init__(self, run_id=None, disk=None, seq=None, slot=None, k=None, error=None,
                 zero=False):
        self.run_id, self.disk, self.seq, self.slot, self.k = run_id, disk, seq, slot, k
        self.error, self.zero = error, zero


def parse_sector(data):
    if data.count(0) == len(data):
        return Sector(zero=True)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return Sector(error="not ASCII (garbage)")
    parts = text.split(" ", 6)
    if len(parts) < 7 or parts[0] != MAGIC:
        return Sector(error="no %s header (garbage: %r)" % (MAGIC, text[:24]))
    try:
        seq, slot, k = int(parts[3]), int(parts[4]), int(parts[5])
    except ValueError:
        return Sector(error="bad numbers in header %r" % text[:60])
    s = Sector(parts[1], parts[2], seq, slot, k)
    if data != expected_sector(s.run_id, s.disk, seq, slot, k):
        s.error = "header seq %d but body/padding does not match it" % seq
    return s
