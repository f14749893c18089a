"""Host-side checks of what the writer guest left in an image (read through the whole chain).

verify(): every slot of the ring must hold exactly what a writer that wrote seq 0..newest in
order would have left there (newest record per slot, slot = seq mod nslots), each record whole
and of this run and disk; the newest seq must be the last acknowledged one (or up to `inflight`
later writes that had reached the image but were not yet acknowledged). An acknowledged write
that is missing, torn, misplaced or replaced by an older record fails, naming the slot.
"""

import hashlib
import os
import subprocess
import tempfile

from . import records


class VerifyError(AssertionError):
    """verify() found problems; .result holds the facts."""

    def __init__(self, result):
        AssertionError.__init__(self, result.summary())
        self.result = result


class VerifyResult(object):
    """Facts of one verify(): ok, problems (list of str), bad_slots (sorted list of int),
    newest_seq (-1 when nothing written), last_acked_seq, nslots, written_slots, torn_slot."""

    def __init__(self, image_path, disk, run_id, nslots, last_acked_seq):
        self.image_path, self.disk, self.run_id = image_path, disk, run_id
        self.nslots, self.last_acked_seq = nslots, last_acked_seq
        self.newest_seq = -1
        self.written_slots = 0
        self.torn_slot = None
        self.problems = []
        self.bad_slots = set()

    @property
    def ok(self):
        return not self.problems

    def problem(self, slot, text):
        if slot is not None:
            self.bad_slots.add(slot)
            text = "slot %d (offset %d): %s" % (slot, records.slot_offset(slot), text)
        self.problems.append(text)

    def summary(self, limit=20):
        head = ("verify %s disk %s run %s: %s; newest seq %d, last acked %d, %d/%d slots written"
                % (self.image_path, self.disk, self.run_id, "OK" if self.ok else
                   "%d problem(s)" % len(self.problems), self.newest_seq, self.last_acked_seq,
                   self.written_slots, self.nslots))
        lines = [head] + ["  " + p for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append("  ... %d more" % (len(self.problems) - limit))
        return "\n".join(lines)

    __str__ = summary


def _qemu_img_raw(image_path, dest, image_format=None):
    cmd = ["qemu-img", "convert", "-U"]
    if image_format:
        cmd += ["-f", image_format]
    cmd += ["-O", "raw", image_path, dest]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if p.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(cmd), p.stderr.strip()))


def read_raw(image_path, length=None, image_format=None):
    """The guest-visible bytes of image_path, resolved through its backing chain
    (qemu-img convert -U: works while QEMU holds the image). length=None: whole disk."""
    fd, tmp = tempfile.mkstemp(prefix="lsg-raw-", suffix=".img")
    os.close(fd)
    try:
        _qemu_img_raw(image_path, tmp, image_format)
        with open(tmp, "rb") as f:
            return f.read() if length is None else f.read(length)
    finally:
        os.unlink(tmp)


def chain_digest(image_path, image_format=None):
    """sha256 hex of the whole guest-visible disk content through the chain: compare it before
    and after an operation to show that a snapshot still reads what it read when taken."""
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix="lsg-raw-", suffix=".img")
    os.close(fd)
    try:
        _qemu_img_raw(image_path, tmp, image_format)
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    finally:
        os.unlink(tmp)
    return h.hexdigest()


def read_records(image_path, ring_mib, image_format=None, raw=None):
    """Per slot: None (never written, all zero), the int seq of a whole well-formed record, or
    a string describing what is wrong there (torn, garbage, other run/disk...). Also usable to
    compare what a snapshot holds at two instants."""
    n = records.nslots(ring_mib)
    if raw is None:
        raw = read_raw(image_path, n * records.RECORD_SIZE, image_format)
    return [_parse_slot(raw, i, None, None)[0] for i in range(n)]


def _parse_slot(raw, slot, run_id, disk):
    """(state, sector_seqs): state is None (zero), an int seq (whole record), or a problem str."""
    base = records.slot_offset(slot)
    block = raw[base:base + records.RECORD_SIZE]
    if len(block) < records.RECORD_SIZE:
        return "beyond the end of the disk", []
    if block.count(0) == len(block):
        return None, []
    seqs, errors = [], []
    for k in range(records.SECTORS):
        sec = records.parse_sector(block[k * 512:(k + 1) * 512])
        if sec.zero:
            seqs.append(None)
            errors.append("sector %d is zero" % k)
            continue
        if sec.error:
            seqs.append("bad")
            errors.append("sector %d: %s" % (k, sec.error))
            continue
        seqs.append(sec.seq)
        if run_id is not None and sec.run_id != run_id:
            errors.append("sector %d is from run %s, not %s" % (k, sec.run_id, run_id))
        if disk is not None and sec.disk != disk:
            errors.append("sector %d is from disk %s, not %s" % (k, sec.disk, disk))
        if sec.slot != slot:
            errors.append("sector %d belongs to slot %d (misplaced)" % (k, sec.slot))
        if sec.k != k:
            errors.append("sector %d holds sector %d of its record (misplaced)" % (k, sec.k))
    distinct = set(seqs)
    if len(distinct) > 1:
        errors.insert(0, "torn record: sector seqs %s" % seqs)
    if errors:
        return "; ".join(errors), seqs
    return seqs[0], seqs


def verify(image_path, disk, last_acked_seq, ring_mib, run_id, inflight=0, image_format=None,
           raise_on_failure=True, raw=None):
    """Check the ring of `disk` (its target name, e.g. 'vda') in image_path (top of a chain).

    last_acked_seq: the highest seq the host saw ACKed for this disk (-1: none).
    inflight: how many writes after last_acked_seq may have reached the image unacknowledged
    (0 after WriterGuest.stop() with clean_stop; 1 after a hard destroy or for a snapshot
    taken while the guest wrote, where the record being written may also be torn).
    Returns a VerifyResult; raises VerifyError (an AssertionError) when not ok, unless
    raise_on_failure is False.
    """
    n = records.nslots(ring_mib)
    res = VerifyResult(image_path, disk, run_id, n, last_acked_seq)
    if raw is None:
        raw = read_raw(image_path, n * records.RECORD_SIZE, image_format)
    states = []
    for slot in range(n):
        state, seqs = _parse_slot(raw, slot, run_id, disk)
        states.append((state, seqs))
        if state is not None:
            res.written_slots += 1
        if isinstance(state, int) and state % n != slot:
            states[-1] = ("holds seq %d, which belongs to slot %d (misplaced)"
                          % (state, state % n), seqs)
    newest = max([s for s, _ in states if isinstance(s, int)] or [-1])
    res.newest_seq = newest

    # The one write that may have been cut short: the next after newest (if allowed).
    torn_ok_slot = (newest + 1) % n if inflight > 0 and newest + 1 <= last_acked_seq + inflight \
        else None
    for slot in range(n):
        state, seqs = states[slot]
        expect = newest - ((newest - slot) % n) if newest >= slot else None  # None: unwritten
        if state == expect:
            continue
        if slot == torn_ok_slot:
            nxt = newest + 1
            allowed = {expect, nxt}
            if isinstance(state, str) and seqs and all(s in allowed for s in seqs) \
                    and "misplaced" not in state and "run" not in state:
                res.torn_slot = slot
                continue
        if isinstance(state, str):
            res.problem(slot, state)
        elif state is None:
            res.problem(slot, "is empty, expected seq %d (lost write)" % expect)
        elif expect is None:
            res.problem(slot, "holds seq %d but the ring never reached this slot" % state)
        elif state < expect:
            res.problem(slot, "holds seq %d, expected seq %d (lost write: older record)"
                        % (state, expect))
        else:
            res.problem(slot, "holds seq %d, expected seq %d" % (state, expect))

    if newest < last_acked_seq:
        s = last_acked_seq % n
        res.problem(None, "last acknowledged seq %d (slot %d) missing: newest record in the "
                          "ring is seq %d" % (last_acked_seq, s, newest))
        res.bad_slots.add(s)
    elif newest > last_acked_seq + inflight:
        res.problem(None, "newest record seq %d is beyond last acknowledged seq %d + inflight %d"
                    % (newest, last_acked_seq, inflight))
    res.bad_slots = sorted(res.bad_slots)
    if raise_on_failure and not res.ok:
        raise VerifyError(res)
    return res
