"""How the livesnap service reads a caller's request off its socket and how a command's
process answers it: a request read as it arrives without ever blocking the service
(``Pending``), read whole on a channel (``receive``), the command's standard streams as the
caller's environment would have opened them (``std_streams``), its "exit N" answer
(``answer``), and closing the descriptors a forked process must not keep (``close_from``).
Used by ``livesnap.service`` only."""
import array
import io
import os
import socket

MAX_REQUEST = 1 << 20


class Pending(object):
    """A caller's connection whose request is still arriving: read as it comes (the
    connection is non-blocking and in the service's selector), never waited for, so that a
    caller that connects and stalls (sends nothing, or half a request) holds up no other
    command; it is closed at its deadline."""

    def __init__(self, conn, deadline):
        self.conn = conn
        self.deadline = deadline
        self.data = b""
        self.fds = []
        self.want = None          # the whole request's length, header included, once known

    def receive(self):
        """Read what has arrived. True: the request is whole; False: more to come; None:
        the caller closed without sending anything (a probe). ValueError: malformed."""
        while True:
            fds = array.array("i")
            try:
                data, anc, flags, _ = self.conn.recvmsg(
                    65536, socket.CMSG_SPACE(16 * fds.itemsize))
            except (BlockingIOError, InterruptedError):
                return False
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - (len(payload) % fds.itemsize)])
            self.fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise ValueError("too many descriptors")
            if not data:
                if not self.data and not self.fds:
                    return None
                raise ValueError("truncated request")
            self.data += data
            if self.want is None:
                head, sep, _ = self.data.partition(b"\n")
                if not sep:
                    if len(self.data) > 20:
                        raise ValueError("no request header")
                    continue
                if not head.isdigit() or int(head) > MAX_REQUEST:
                    raise ValueError("bad request length")
                self.want = len(head) + 1 + int(head)
            if len(self.data) > self.want:
                raise ValueError("more than the request")
            if len(self.data) == self.want:
                return True

    def body(self):
        return self.data[self.data.index(b"\n") + 1:]

    def close_fds(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def std_streams(environ):
    """stdin, stdout, stderr on descriptors 0-2 as the interpreter would have opened them
    in the caller's environment: PYTHONIOENCODING (``encoding[:errors]``) and
    PYTHONUNBUFFERED are the caller's, not the service's."""
    encoding, _, errors = environ.get("PYTHONIOENCODING", "").partition(":")
    encoding, errors = encoding or None, errors or None
    unbuffered = bool(environ.get("PYTHONUNBUFFERED"))

    def writer(fd, line_buffering, errors):
        if unbuffered:
            return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=encoding,
                                    errors=errors, write_through=True)
        return open(fd, "w", buffering=1 if line_buffering else -1, closefd=False,
                    encoding=encoding, errors=errors)
    return (open(0, "r", closefd=False, encoding=encoding, errors=errors),
            writer(1, os.isatty(1), errors),
            writer(2, True, errors or "backslashreplace"))


def receive(conn):
    """A request: (body, descriptors) read from ``conn``, or (None, []) when the peer sent
    nothing (a probe, or a channel closed). Descriptors received with a malformed request
    are closed before the ValueError."""
    fds = array.array("i")
    data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - (len(payload) % fds.itemsize)])
    fds = list(fds)
    if not data and not fds:
        return None, []
    try:
        head, sep, rest = data.partition(b"\n")
        if not sep:
            raise ValueError("no request header")
        want = int(head)
        if want > MAX_REQUEST:
            raise ValueError("request too large")
        chunks = [rest]
        got = len(rest)
        while got < want:
            more = conn.recv(min(65536, want - got))
            if not more:
                raise ValueError("truncated request")
            chunks.append(more)
            got += len(more)
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        raise
    return b"".join(chunks), fds


def answer(report, rc):
    """The command's own "exit N" to its caller, once its output is written: its copies of
    the caller's streams are closed first (a reader of the caller's output sees its end
    when the caller exits). The caller returns without waiting for this process to be torn
    down and reaped; the service's own answer after the reaping then finds it gone. (A
    command killed by a signal never gets here: the service answers "signal N".)"""
    for fd in (0, 1, 2):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.write(report, ("exit %d\n" % rc).encode("ascii"))
    except OSError:
        pass                                       # the caller is gone


def close_from(low, keep=None):
    for n in os.listdir("/proc/self/fd"):
        fd = int(n)
        if fd >= low and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass
