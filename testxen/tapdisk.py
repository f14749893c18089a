"""A tapdisk stand-in (XEN-NOTES.md §8): one daemon process per disk.

Used by nothing any more: its last user, the benchmark (bench/xen.py), runs on the real
blktap tapdisk (testxen/blktap.py) as tests/xen and tests/xapi do. It follows tapdisk's behaviour as read from blktap
drivers/tapdisk-vbd.c and control/tap-ctl.c: pause drains and closes the chain, unpause
reopens strictly (EMEDIUMTYPE on a size change), requests queue while paused.

It opens the VHD chain of a leaf through ``livesnap.vhd.open_image(path, writable=True)``, so
BAT, bitmaps and batmap are cached in memory and the leaf's primary footer and batmap are stale on
disk while it is open, exactly as with tapdisk. Inside it runs the **guest**: a writer thread that
writes 4 KiB records continuously into a ring of slots at the start of the disk and acknowledges
each one after its write returned, by appending ``ACK <seq> <monotonic ns>`` to the ack log.

Control: a unix socket ``<run dir>/tapdisk<pid>.<minor>.sock``; one JSON request line per
connection, one JSON reply line (``{"rc": 0, ...}``; rc is a positive errno on failure):

* ``{"cmd": "status"}`` -> pid, minor, state (0 running, 0x10 pause requested, 0x20 paused),
  type, path, size, ack_log, acked (last acknowledged seq)
* ``{"cmd": "pause"}``: stop taking new writes (the writer blocks: its request is queued, it does
  not fail), wait for the in-flight write + ack to finish (no time cap, but given up when the
  client disconnects), flush footer + batmap, close the whole chain, state 0x20. Idempotent.
* ``{"cmd": "unpause", "args": "vhd:/path"}`` (args optional: the old path): reopen the chain
  strictly: the virtual size must equal the old one, else EMEDIUMTYPE (124); each failed open is
  retried (``--retries`` times, ``--retry-interval`` apart; tapdisk: 10 x 1 s); then writes resume.
  Not paused -> EINVAL. A failed unpause leaves the tapdisk paused on its old path.
* ``{"cmd": "close"}``: pause, then exit (tap-ctl close/destroy). SIGTERM does the same.
* ``{"cmd": "stall", "seconds": S}`` (test hook): the next write stays in flight S seconds, as a
  slow backend request would, so that a pause drains slowly. Running, the reply comes once that
  write is in flight (a pause sent after it has to drain it); paused, at once.

While paused no file of the chain is open. The registry entry ``tapdisk<pid>.<minor>.json`` is
written before the daemon reports ready and removed when it exits.

Records: testxen/records.py.
"""
import argparse
import errno
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid

from livesnap.vhd import VhdError, open_image
from testxen.records import (  # noqa: F401  (re-exported)
    HEADER, MAGIC, RECORD_SIZE, TornRecord, make_record, parse_record)

RUNNING, PAUSE_REQUESTED, PAUSED = 0x0, 0x10, 0x20
DEFAULT_RUN_DIR = "/run/testxen"


def names(run_dir, pid, minor):
    base = os.path.join(run_dir, "tapdisk%d.%d" % (pid, minor))
    return {"sock": base + ".sock", "json": base + ".json", "ack": base + ".ack",
            "log": base + ".log"}


class Tapdisk(object):
    def __init__(self, a):
        self.a = a
        self.pid = os.getpid()
        self.minor = a.minor
        self.type = "vhd"
        self.path = os.path.abspath(a.path)
        self.files = names(a.run_dir, self.pid, self.minor)
        self.cond = threading.Condition()
        self.state = RUNNING
        self.inflight = False
        self.stopping = False
        self.stall = 0.0
        self.acked = 0
        self.write_errors = 0
        self.img = None
        self.size = None
        self.run_id = uuid.uuid4().bytes
        self.ack_fd = None

    # --- image ----------------------------------------------------------------------------

    def _open_strict(self, path):
        """Open the chain of ``path`` for writing; with a known size, refuse another size."""
        img = open_image(path, writable=True)
        if self.size is not None and img.virtual_size != self.size:
            img.writable = False          # refused: do not touch the file on close
            img.close()
            raise OSError(errno.EMEDIUMTYPE, "virtual size changed from %d to %d"
                          % (self.size, img.virtual_size))
        return img

    def _reopen(self, path):
        last = None
        for attempt in range(self.a.retries):
            if attempt:
                time.sleep(self.a.retry_interval)
            try:
                return self._open_strict(path)
            except (VhdError, OSError) as e:
                last = e
                self.log("open %s attempt %d failed: %s" % (path, attempt + 1, e))
        code = getattr(last, "errno", None) or errno.EIO
        raise OSError(code, str(last))

    # --- the guest ------------------------------------------------------------------------

    def _ack_line(self, text):
        os.write(self.ack_fd, (text + "\n").encode())

    def writer(self):
        seq = 0
        while True:
            seq += 1
            slot = seq % self.a.slots
            with self.cond:
                while self.state != RUNNING and not self.stopping:
                    self.cond.wait()           # the request is queued while paused
                if self.stopping:
                    return
                self.inflight = True
                stall, self.stall = self.stall, 0.0
                if stall:
                    self.cond.notify_all()     # the stall request waits for this
            try:
                if stall:
                    time.sleep(stall)
                self.img.write(slot * self.a.stride, make_record(self.run_id, seq, slot))
                self._ack_line("ACK %d %d" % (seq, time.monotonic_ns()))
                self.acked = seq
            except Exception as e:             # the guest sees an IO error
                self.write_errors += 1
                self._ack_line("ERR %d %d %s" % (seq, time.monotonic_ns(), e))
            finally:
                with self.cond:
                    self.inflight = False
                    self.cond.notify_all()
            if self.a.interval:
                time.sleep(self.a.interval)

    # --- control --------------------------------------------------------------------------

    def do_pause(self, conn=None):
        with self.cond:
            if self.state == PAUSED:
                return {"rc": 0}
            self.state = PAUSE_REQUESTED
            while self.inflight:
                self.cond.wait(0.01)
                if self.inflight and conn is not None and _disconnected(conn):
                    self.state = RUNNING       # the client gave up: abandon the pause
                    self.cond.notify_all()
                    self.log("pause abandoned: client disconnected")
                    return {"rc": errno.ECONNABORTED, "error": "client disconnected"}
            try:
                self.img.close()               # flush footer + batmap, close the chain
            finally:
                self.img = None
                self.state = PAUSED
            self._ack_line("STATE paused %d" % time.monotonic_ns())
        return {"rc": 0}

    def do_unpause(self, args=None):
        with self.cond:
            if self.state != PAUSED:
                return {"rc": errno.EINVAL, "error": "not paused"}
            path = self.path
            if args:
                typ, sep, p = args.partition(":")
                if not sep or typ != "vhd":
                    return {"rc": errno.EINVAL, "error": "bad args %r" % args}
                path = os.path.abspath(p)
            try:
                self.img = self._reopen(path)
            except OSError as e:
                return {"rc": e.errno or errno.EIO, "error": e.strerror or str(e)}
            self.path = path
            self.write_registry()
            self.state = RUNNING
            self._ack_line("STATE running %d %s" % (time.monotonic_ns(), path))
            self.cond.notify_all()
        return {"rc": 0}

    def status(self):
        return {"rc": 0, "pid": self.pid, "minor": self.minor, "state": self.state,
                "type": self.type, "path": self.path, "size": self.size,
                "ack_log": self.files["ack"], "acked": self.acked,
                "write_errors": self.write_errors}

    def handle(self, req, conn):
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "pause":
            return self.do_pause(conn)
        if cmd == "unpause":
            return self.do_unpause(req.get("args"))
        if cmd == "close":
            reply = self.do_pause()
            if reply["rc"] == 0:
                self.stopping = True
            return reply
        if cmd == "stall":
            with self.cond:
                self.stall = float(req.get("seconds", 0))
                while self.stall and self.state == RUNNING and not self.stopping:
                    self.cond.wait()           # until the writer has taken it
            return {"rc": 0}
        return {"rc": errno.EINVAL, "error": "unknown command %r" % cmd}

    def write_registry(self):
        entry = {"pid": self.pid, "minor": self.minor, "type": self.type, "path": self.path,
                 "sock": self.files["sock"], "ack_log": self.files["ack"]}
        tmp = self.files["json"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(entry, f)
        os.rename(tmp, self.files["json"])

    def log(self, text):
        sys.stderr.write("tapdisk[%d.%d] %s\n" % (self.pid, self.minor, text))
        sys.stderr.flush()

    def serve(self, ready):
        self.img = self._open_strict(self.path)
        self.size = self.img.virtual_size
        if self.a.slots * self.a.stride > self.size or self.a.stride < RECORD_SIZE:
            raise OSError(errno.EINVAL, "ring of %d x %d bytes does not fit %d bytes"
                          % (self.a.slots, self.a.stride, self.size))
        self.ack_fd = os.open(self.files["ack"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._ack_line("RUN %s slots=%d stride=%d size=%d path=%s" % (
            self.run_id.hex(), self.a.slots, self.a.stride, self.size, self.path))
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.files["sock"]):
            os.unlink(self.files["sock"])
        srv.bind(self.files["sock"])
        srv.listen(8)
        srv.settimeout(0.2)
        self.write_registry()
        t = threading.Thread(target=self.writer, name="guest", daemon=True)
        t.start()
        ready("OK %d %d" % (self.pid, self.minor))
        deadline = time.monotonic() + self.a.max_lifetime if self.a.max_lifetime else None
        try:
            while not self.stopping:
                if deadline is not None and time.monotonic() > deadline:
                    self.log("max lifetime reached")
                    break
                try:
                    conn, _ = srv.accept()
                except socket.timeout:
                    continue
                with conn:
                    conn.settimeout(None)
                    try:
                        req = json.loads(_readline(conn) or "{}")
                        reply = self.handle(req, conn)
                    except Exception as e:
                        reply = {"rc": errno.EIO, "error": "%s: %s" % (type(e).__name__, e)}
                    try:
                        conn.sendall((json.dumps(reply) + "\n").encode())
                    except OSError:
                        pass
        finally:
            self.shutdown(srv, t)

    def shutdown(self, srv, writer):
        if self.state != PAUSED:
            self.do_pause()
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        writer.join(5)
        srv.close()
        for key in ("sock", "json"):
            try:
                os.unlink(self.files[key])
            except OSError:
                pass
        self._ack_line("STATE closed %d" % time.monotonic_ns())


def _readline(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _disconnected(conn):
    r, _, _ = select.select([conn], [], [], 0)
    if not r:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def request(sock_path, req, timeout=None):
    """Send one request to a tapdisk's control socket; its JSON reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall((json.dumps(req) + "\n").encode())
        line = _readline(s)
    finally:
        s.close()
    if not line:
        raise OSError(errno.EPROTO, "no reply from %s" % sock_path)
    return json.loads(line)


def main(argv=None):
    p = argparse.ArgumentParser(prog="tapdisk (testxen stand-in)")
    p.add_argument("--path", required=True)
    p.add_argument("--minor", type=int, required=True)
    p.add_argument("--run-dir", default=os.environ.get("TESTXEN_RUN_DIR", DEFAULT_RUN_DIR))
    p.add_argument("--interval", type=float, default=0.002, help="seconds between writes")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--stride", type=int, default=RECORD_SIZE, help="bytes between slots")
    p.add_argument("--retries", type=int, default=10)
    p.add_argument("--retry-interval", type=float, default=1.0)
    p.add_argument("--max-lifetime", type=float, default=0, help="exit after S seconds (0: never)")
    p.add_argument("--ready-fd", type=int, default=1)
    a = p.parse_args(argv)
    os.makedirs(a.run_dir, exist_ok=True)
    td = Tapdisk(a)
    ready_fd = a.ready_fd
    sent = [False]

    def ready(text):
        os.write(ready_fd, (text + "\n").encode())
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, ready_fd)             # the spawner stops reading; keep the fd valid
        os.close(devnull)
        sent[0] = True

    def on_term(signo, frame):
        td.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        td.serve(ready)
    except (VhdError, OSError) as e:
        code = getattr(e, "errno", None) or errno.EIO
        if not sent[0]:
            ready("ERR %d %s" % (code, e))
        td.log("failed: %s" % e)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
