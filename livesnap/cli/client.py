"""The ``livesnap`` program's first step: hand the command to the livesnap service if one
listens, else run it here.

The service (``livesnap service``, ``livesnap/service.py``) has livesnap and libvirt's
bindings imported already; it forks a process per command that runs exactly what this
process would run, on this process's stdin, stdout and stderr (passed over the socket),
with its arguments, working directory and environment. What the caller sees is the same
either way: output, exit status, death by a signal (SIGINT, SIGTERM and SIGHUP sent here
are passed on to the command). Only the interpreter's start-up and the imports are not paid
per command, as virsh does not start libvirtd per command.

Without a service (no socket, nobody listening, ``LIVESNAP_SERVICE=off``, or a service
whose code is older than this checkout's), the command runs in this process. Nor is
anything sent to a socket whose listener is not root's or this user's (its peer
credentials): that user would get this process's streams and environment; the command
then runs here, after a one-line warning.

This module runs before everything else, in every command, so it imports only the
built-in modules under ``socket`` and ``signal`` (``_socket``, ``_signal``: the wrappers
import enum, selectors and collections, ~15 ms of a ~35 ms start).
"""
import _signal as signal
import _socket as socket
import os
import struct
import sys

from livesnap import wire

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _command(argv):
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


class _Forwarder(object):
    """Signals for the command: recorded until its pid is known, then passed on."""

    def __init__(self):
        self.pid = None
        self.pending = []

    def __call__(self, signo, frame):
        if self.pid is None:
            self.pending.append(signo)
        else:
            self._send(signo)

    def _send(self, signo):
        try:
            os.kill(self.pid, signo)
        except OSError:
            pass

    def started(self, pid):
        self.pid = pid
        for signo in self.pending:
            self._send(signo)


def via_service(argv, path):
    """Run ``argv`` in the service at ``path``. Returns ("exit", rc) or ("signal", signo),
    or None when there is no service to run it (the caller runs it itself)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return None
    forward = _Forwarder()
    old = {}
    try:
        try:
            sock.connect(path)
        except OSError:
            return None
        uid = _peer_uid(sock)
        if uid is None or uid not in (0, os.geteuid()):
            # another user's: it would get this process's streams and environment
            sys.stderr.write("livesnap: not using the service at %s: it is run by uid %s, "
                             "not root or this user; running the command here\n" % (path, uid))
            return None
        request = wire.encode_request(argv, os.getcwd(), os.environ)
        for signo in FORWARDED:
            old[signo] = signal.signal(signo, forward)
        fds = struct.pack("3i", 0, 1, 2)
        try:
            sent = sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            if sent < len(request):
                sock.sendall(request[sent:])       # what did not fit in one message
        except OSError:
            return None
        lines = _lines(sock)
        while True:
            line = next(lines)
            if not line:
                if forward.pid is None:
                    return None                  # refused before starting: run it here
                return _orphaned(forward.pid)
            word, _, value = line.decode("ascii", "replace").strip().partition(" ")
            if word == "pid":
                forward.started(int(value))
            elif word == "exit":
                return ("exit", int(value))
            elif word == "signal":
                return ("signal", int(value))
            elif word == "fallback":
                return None                      # e.g. the service runs older code
    finally:
        for signo, handler in old.items():
            if handler is not None:
                signal.signal(signo, handler)
        sock.close()


def _peer_uid(sock):
    """The uid of the process that made the peer socket (the service's listener), or None."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except (OSError, AttributeError, struct.error):
        return None


def _orphaned(pid):
    """The connection ended without an answer: the service went away and the command then
    died without answering (a command answers "exit N" itself; a signal's death is
    answered by the service). Return only when it has ended (a next command must not find
    the domain still locked), with exit status 1."""
    import time
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break                        # ended, not yet reaped by its new parent
        except (OSError, IndexError):
            break
        time.sleep(0.05)
    sys.stderr.write("livesnap: the service ended while running this command (pid %d); "
                     "the command has ended since, its exit status is unknown: see "
                     "'livesnap snapshot-list' and 'livesnap recover'\n" % pid)
    return ("exit", 1)


def _lines(sock):
    """The service's reply lines; b"" once it has closed the connection."""
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line + b"\n"
        try:
            more = sock.recv(4096)
        except InterruptedError:                 # (retried by Python >= 3.5 anyway)
            continue
        except OSError:                          # e.g. ECONNRESET: the connection is over
            more = b""
        if not more:
            while True:
                yield b""
        buf += more


def run():
    """The ``livesnap`` program's command (``livesnap.launcher`` starts ``livesnap service``
    itself): handed to the service, or run in this process."""
    argv = sys.argv[1:]
    if argv[:1] == ["service"]:
        _launch(argv)                            # never returns
    path = wire.socket_path()
    if path is not None and _command(argv) != "service" and os.path.exists(path):
        outcome = via_service(argv, path)
        if outcome is not None:
            kind, value = outcome
            sys.stdout.flush()
            if kind == "signal":                 # die of it, as the command did
                try:
                    signal.signal(value, signal.SIG_DFL)
                except (OSError, ValueError):    # SIGKILL, SIGSTOP: no handler to reset
                    pass
                os.kill(os.getpid(), value)
                os._exit(128 + value)
            os._exit(value)
    from livesnap.cli import main
    main.run()


def _launch(argv):
    """``livesnap service`` reached through this module (a console script installed before
    ``livesnap.launcher`` was its entry point): this process becomes the launcher, same
    pid (systemd's LISTEN_PID), same livesnap."""
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; sys.path.insert(0, %r); sys.argv[0] = 'livesnap'; "
            "from livesnap.launcher import run; run()" % top)
    os.execv(sys.executable, [sys.executable, "-c", code] + list(argv))


if __name__ == "__main__":
    run()
