"""Check the guest's view against the disk: every acknowledged record is in the image, whole.

The ack log of a guest (``testxen.guest``) holds ``RUN <run id hex> slots=N stride=S size=B
path=P``, then ``ACK <seq> <monotonic ns>`` per acknowledged write (plus ``ERR`` and ``STOP``
lines). Slot = seq % slots, at byte slot * stride of the disk.

* ``verify(ack_log, path, until_ns=None, exact=False)`` reads the chain of ``path`` (a paused
  or closed leaf, or a frozen former leaf) through a fresh real tapdisk (read-only, over NBD:
  ``testxen.blktap.opened``), so the chain is resolved as blktap resolves it, and returns a
  ``Report``:
  for every slot, the newest acknowledged seq (acked at or before ``until_ns``) must be there,
  or a newer record of the same run (``exact``: exactly that one); no slot may hold a torn
  record (bad magic, CRC or fill).
* ``assert_intact(...)``: the same, raising ``AssertionError`` listing the problems.
* ``max_gap(ack_log, t0=None, t1=None)``: the largest gap, in ms, between consecutive acks of
  which at least one end lies in [t0, t1] (monotonic ns): the guest-visible IO stall.
"""
import collections

from testxen import blktap
from testxen.records import RECORD_SIZE, TornRecord, parse_record

Run = collections.namedtuple("Run", "run_id slots stride size path")
Report = collections.namedtuple("Report", "path acked slots_checked problems")


def read_log(ack_log):
    """(run, [(seq, ns)], [error lines]) for the last run in ``ack_log``."""
    run, acks, errors = None, [], []
    with open(ack_log) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "RUN":
                kv = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
                run = Run(bytes.fromhex(parts[1]), int(kv["slots"]), int(kv["stride"]),
                          int(kv["size"]), line.split(" path=", 1)[1].rstrip("\n"))
                acks, errors = [], []
            elif parts[0] == "ACK":
                acks.append((int(parts[1]), int(parts[2])))
            elif parts[0] == "ERR":
                errors.append(line.rstrip("\n"))
    if run is None:
        raise ValueError("%s has no RUN line" % ack_log)
    return run, acks, errors


def acks(ack_log):
    """[(seq, monotonic ns)] of the last run."""
    return read_log(ack_log)[1]


def verify(ack_log, path, until_ns=None, exact=False):
    run, acked, errors = read_log(ack_log)
    if until_ns is not None:
        acked = [(s, t) for s, t in acked if t <= until_ns]
    newest = {}
    for seq, _ in acked:
        slot = seq % run.slots
        newest[slot] = max(seq, newest.get(slot, 0))
    problems = ["write error acknowledged to the guest: %s" % e for e in errors]
    with blktap.opened(path) as img:
        if img.size != run.size:
            problems.append("virtual size %d, the guest had %d" % (img.size, run.size))
        for slot in range(run.slots):
            buf = img.read(slot * run.stride, RECORD_SIZE)
            want = newest.get(slot)
            try:
                rec = parse_record(buf)
            except TornRecord as e:
                problems.append("slot %d: torn record: %s" % (slot, e))
                continue
            if rec is None:
                if want is not None:
                    problems.append("slot %d: empty, acked seq %d lost" % (slot, want))
                continue
            run_id, seq, rslot = rec
            if run_id != run.run_id:
                if want is not None:
                    problems.append("slot %d: record of another run, acked seq %d lost"
                                    % (slot, want))
                continue
            if rslot != slot or seq % run.slots != slot:
                problems.append("slot %d: holds the record of slot %d (seq %d)" % (slot, rslot,
                                                                                     seq))
            elif want is None:
                if exact:
                    problems.append("slot %d: seq %d present but never acked" % (slot, seq))
            elif seq < want:
                problems.append("slot %d: has seq %d, acked seq %d lost" % (slot, seq, want))
            elif exact and seq != want:
                problems.append("slot %d: has seq %d, newest acked is %d" % (slot, seq, want))
    return Report(path, len(acked), run.slots, problems)


def assert_intact(ack_log, path, until_ns=None, exact=False):
    rep = verify(ack_log, path, until_ns=until_ns, exact=exact)
    assert not rep.problems, "%s: %d problems:\n%s" % (path, len(rep.problems),
                                                         "\n".join(rep.problems[:20]))
    return rep


def max_gap(ack_log, t0=None, t1=None):
    """The largest gap (ms) between consecutive acks touching the window [t0, t1]."""
    times = [t for _, t in acks(ack_log)]
    lo = float("-inf") if t0 is None else t0
    hi = float("inf") if t1 is None else t1
    gap = 0
    for a, b in zip(times, times[1:]):
        if b >= lo and a <= hi:
            gap = max(gap, b - a)
    return gap / 1e6
