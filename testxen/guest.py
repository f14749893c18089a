"""The guest of the Xen tests: a process that writes through the real tapdisk over NBD.

It connects to a tapdisk's NBD socket (``/run/blktap-control/nbd<pid>.<minor>``, blktap
drivers/tapdisk-nbdserver.c) and writes 4 KiB records (testxen/records.py) continuously into a
ring of ``--slots`` slots ``--stride`` bytes apart, acknowledging each one after the NBD write
returned, by appending ``ACK <seq> <monotonic ns>`` to the ack log. While tapdisk is paused its
NBD server holds the request, so the write stays in flight and the guest waits, as a Xen guest's
ring requests do. The ack log is what testxen.verify reads:
``RUN <run id hex> slots=N stride=S size=B path=<socket>``, ``ACK`` lines, ``ERR <seq> <ns>
<error>`` when tapdisk answered a write with an error, ``STOP <ns> <reason>`` at the end (the
connection closed: tapdisk closed or died; or SIGTERM).
"""
import argparse
import os
import signal
import sys
import time
import uuid

from testxen import nbd
from testxen.records import RECORD_SIZE, make_record


def main(argv=None):
    p = argparse.ArgumentParser(prog="testxen.guest")
    p.add_argument("--socket", required=True)
    p.add_argument("--ack-log", required=True)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--stride", type=int, default=1 << 20)
    p.add_argument("--interval", type=float, default=0.003, help="seconds between writes")
    a = p.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda signo, frame: stop.append(signo))
    fd = os.open(a.ack_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def line(text):
        os.write(fd, (text + "\n").encode())

    client = nbd.Client(a.socket)
    if a.slots * a.stride > client.size or a.stride < RECORD_SIZE:
        line("STOP %d ring of %d x %d bytes does not fit %d bytes"
             % (time.monotonic_ns(), a.slots, a.stride, client.size))
        return 1
    run_id = uuid.uuid4().bytes
    line("RUN %s slots=%d stride=%d size=%d path=%s" % (run_id.hex(), a.slots, a.stride,
                                                       client.size, a.socket))
    seq = 0
    reason = "SIGTERM"
    while not stop:
        seq += 1
        slot = seq % a.slots
        try:
            client.write(slot * a.stride, make_record(run_id, seq, slot))
        except nbd.NbdError as e:
            if e.errno:                       # tapdisk answered the write with an error
                line("ERR %d %d %s" % (seq, time.monotonic_ns(), e))
                continue
            reason = str(e)
            break
        except OSError as e:
            reason = str(e)
            break
        line("ACK %d %d" % (seq, time.monotonic_ns()))
        if a.interval:
            time.sleep(a.interval)
    line("STOP %d %s" % (time.monotonic_ns(), reason))
    client.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
