"""``livesnap service``: a resident process that runs livesnap commands without paying the
interpreter's start-up and the imports for each (as libvirtd spares virsh its own).

It imports livesnap and libvirt's bindings once, listens on a Unix socket (mode 0600, in a
0700 directory; or the socket systemd passes, ``LISTEN_FDS``), and for each request of
``livesnap.cli.client`` runs the command in one process of its own, exactly as the client
would have: the client's stdin/stdout/stderr (received with SCM_RIGHTS), argv, working
directory and environment. That process is forked ahead, while the service is idle (the
spare), and handed the request. The service reports the command's pid to the client; the
command answers its exit status itself once done, and the service reports the signal that
ended a command that did not. Each command is its own process, so a command that crashes
or is killed (``LIVESNAP_FAULT``) leaves the service as it was; the per-domain lock and the
journal work as for any other livesnap process.

The service never connects to libvirt itself (libvirt's event loop would not survive the
fork): each command's process opens its own connection. It is single-threaded (a fork is
safe: no other thread holds a lock), refuses peers of another user, and stops serving when
livesnap's code on disk changes (the client then runs the command itself) and exits as soon
as its commands have ended, so that a restart (systemd's socket activation) picks up the
new code.

It is started by ``livesnap.launcher`` (``livesnap service``, its own parser: ``main``); it
runs the commands with the command table (``livesnap.cli.main``) and reads requests in the
wire format (``livesnap.wire``); the command line imports nothing of it.
"""
import argparse
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time

from livesnap import wire
from livesnap.service_requests import Pending as _Pending
from livesnap.service_requests import answer as _answer
from livesnap.service_requests import close_from as _close_from
from livesnap.service_requests import receive as _receive
from livesnap.service_requests import std_streams as _std_streams
from livesnap.errors import ServiceSocket

log = logging.getLogger(__name__)

# spares that die unused (or cannot be forked) before the service stops making them and
# forks each command's process on its request
SPARE_FAILURES = 3
REQUEST_TIMEOUT = 5.0
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

# imported once, before any command: what a snapshot command imports
WARM = ("livesnap.cli.main", "livesnap.cli.snapshot", "livesnap.cli.output",
        "livesnap.engine.engine", "livesnap.datapaths.libvirt_live",
        "livesnap.platforms.libvirt_domain", "livesnap.platforms.libvirt_snapshots",
        "livesnap.platforms.domain_xml", "livesnap.tools.qemu_img", "livesnap.hook",
        # a Xen host's: domain XML files, tapdisk, the VHD engine
        "livesnap.platforms.xen_domain", "livesnap.datapaths.vhd_files",
        "livesnap.datapaths.vhd_storage", "livesnap.vhd.cli",
        "libvirt", "lxml.etree")


def warm_up():
    loaded = []
    for name in WARM:
        try:
            __import__(name)
            loaded.append(name)
        except ImportError as e:          # e.g. no lxml on a Xen host: imported when needed
            log.info("not preloaded: %s (%s)", name, e)
    return loaded


def code_stamp():
    """The modification times of livesnap's loaded modules: when one changes on disk, the
    service's copy is out of date."""
    return {mod.__file__: _mtime(mod.__file__) for name, mod in list(sys.modules.items())
            if (name == "livesnap" or name.startswith("livesnap."))
            and getattr(mod, "__file__", None)}


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _stale(stamp):
    """The first module file whose modification time is no longer the stamp's, or None."""
    for path, mtime in stamp.items():
        if _mtime(path) != mtime:
            return path
    return None


def listening(path):
    """Whether a service accepts connections at ``path`` (a probe: it sends nothing, which
    the service takes for no request)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def wait_listening(path, proc, timeout=60.0):
    """For a caller that started ``livesnap service`` as the child process ``proc``: wait
    until it listens at ``path``. False when it exited or did not listen in time."""
    end = time.monotonic() + timeout
    while not listening(path):
        if proc.poll() is not None or time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def listen(path):
    """A listening socket at ``path``: its directory made 0700, a stale socket file (nobody
    listening) replaced, a live one refused."""
    d = os.path.dirname(path)
    if d and not os.path.isdir(d):
        os.makedirs(d, 0o700)
    if os.path.exists(path):
        if listening(path):
            raise ServiceSocket(path, "a livesnap service already listens there")
        os.unlink(path)                           # left by a service that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


def inherited_socket():
    """The listening socket systemd passed (socket activation), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=3)


class Service(object):
    def __init__(self, sock, path=None, request_timeout=REQUEST_TIMEOUT):
        self.sock = sock
        self.path = path
        self.request_timeout = request_timeout
        self.children = {}            # pid -> the client's connection
        self.pending = {}             # connection -> _Pending: a request still arriving
        self.spare = None             # (pid, channel): a process forked ahead of a command
        self.spare_failures = 0
        self.left = False             # in a process forked from it: see _leave_service
        self.stale = None
        self.stamp = code_stamp()
        self.code = wire.code_dir()
        from livesnap.cli import main
        self.parser = main.build_parser()          # every command's, built once

    # -- the loop ---------------------------------------------------------------------------

    def serve(self):
        """Serve until SIGTERM/SIGINT or until livesnap's code changed on disk; then exit
        once the running commands have ended."""
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        old_wakeup = signal.set_wakeup_fd(wfd)
        self.stopping = False
        handlers = {signal.SIGCHLD: signal.signal(signal.SIGCHLD, _nothing),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, self._stop),
                    signal.SIGINT: signal.signal(signal.SIGINT, self._stop)}
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)      # (see run())
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "accept")
        sel.register(rfd, selectors.EVENT_READ, "signal")
        self.sel = sel
        try:
            while True:
                self._reap()
                if self.sock is not None and (self.stopping or self.stale):
                    self._close_listener()         # new commands run in their own process
                if self.sock is None and not self.children:
                    break
                if (self.sock is not None and self.spare is None
                        and self.spare_failures < SPARE_FAILURES):
                    self._fork_spare()
                for key, _ in sel.select(self._next_deadline()):
                    if key.data == "signal":
                        try:
                            os.read(rfd, 512)
                        except OSError:
                            pass
                    elif isinstance(key.data, _Pending):
                        self._read_request(key.data)
                    elif self.sock is not None:
                        self._accept()
                self._expire()
        finally:
            sel.close()
            signal.set_wakeup_fd(old_wakeup)
            for signo, h in handlers.items():
                signal.signal(signo, h)
            os.close(rfd)
            os.close(wfd)
            self._close_listener()
        return 0

    def _close_listener(self):
        """No more requests: the socket's name goes first (a new caller finds no service
        and runs its command itself); callers already connected, queued or with their
        request still arriving, are told to do the same ("fallback"), never left to find
        their connection reset. (systemd's socket stays, with its queue, for the next
        service it starts.)"""
        self._drop_spare()
        for pending in list(self.pending.values()):
            self._drop_pending(pending, "fallback stopping")
        if self.sock is None:
            return
        try:
            self.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        if self.path:                              # not systemd's socket: that stays
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.sock.setblocking(False)
            while True:
                try:
                    conn, _ = self.sock.accept()
                except OSError:                    # none left (EAGAIN)
                    break
                self._reply(conn, "fallback stopping")
                conn.close()
        self.sock.close()
        self.sock = None

    def _stop(self, signo, frame):
        self.stopping = True

    def _accept(self):
        """A new connection: a caller of this user is read as its request arrives (a
        caller that stalls holds up no one: see ``_Pending``); another user's is told
        "fallback" and closed."""
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        try:
            uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))[1]
        except OSError:
            conn.close()
            return
        if uid != os.getuid():
            log.warning("refused a request of uid %d", uid)
            # answered before the close: a caller whose request is already sent (unread
            # here) then reads the answer, not ECONNRESET
            self._reply(conn, "fallback refused")
            conn.close()
            return
        conn.setblocking(False)
        pending = _Pending(conn, time.monotonic() + self.request_timeout)
        self.pending[conn] = pending
        self.sel.register(conn, selectors.EVENT_READ, pending)

    def _drop_pending(self, pending, answer=None):
        del self.pending[pending.conn]
        try:
            self.sel.unregister(pending.conn)
        except (KeyError, ValueError):
            pass
        pending.close_fds()
        if answer:
            self._reply(pending.conn, answer)
        pending.conn.close()

    def _next_deadline(self):
        """select()'s timeout: until the first pending request's deadline, or None."""
        if not self.pending:
            return None
        return max(0.0, min(p.deadline for p in self.pending.values()) - time.monotonic())

    def _expire(self):
        now = time.monotonic()
        for pending in list(self.pending.values()):
            if pending.deadline <= now:
                log.warning("no whole request within %ss: connection closed",
                            self.request_timeout)
                self._drop_pending(pending, "fallback timeout")

    def _read_request(self, pending):
        try:
            whole = pending.receive()
        except (OSError, ValueError) as e:
            log.warning("bad request: %s", e)
            self._drop_pending(pending, "fallback bad-request")
            return
        if whole is None:                          # a probe: connected, sent nothing
            self._drop_pending(pending)
            return
        if not whole:
            return                                 # more to come
        body, fds = pending.body(), pending.fds
        pending.fds = []
        self._drop_pending_keep(pending)
        self._request(pending.conn, body, fds)

    def _drop_pending_keep(self, pending):
        """The request is whole: the connection leaves the selector, stays open."""
        del self.pending[pending.conn]
        self.sel.unregister(pending.conn)

    def _request(self, conn, body, fds):
        """A whole request: run it in the spare or a process forked for it."""
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            argv, cwd, environ, code, umask = wire.decode_request(body)
            if len(fds) != 3:
                raise ValueError("expected 3 descriptors, got %d" % len(fds))
        except (OSError, ValueError) as e:
            log.warning("bad request: %s", e)
            for fd in fds:
                os.close(fd)
            self._reply(conn, "fallback bad-request")
            conn.close()
            return
        if code != self.code:
            # the caller's PYTHONPATH or working directory chose another livesnap than
            # this one: it runs its command with its own code
            self._reply(conn, "fallback other-code")
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        stale = _stale(self.stamp)
        if stale:
            self.stale = stale
            log.warning("%s changed on disk: no more commands served, exiting when the "
                        "running ones end", stale)
            self._reply(conn, "fallback code-changed")
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        pid = self._hand_to_spare(conn, fds, body)
        if pid is None:
            pid = os.fork()
            if pid == 0:
                self._child(conn, fds, argv, cwd, environ, umask)     # never returns
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self._reply(conn, "pid %d" % pid)

    # -- the spare: the next command's process, forked while the service is idle -----------

    def _fork_spare(self):
        """Fork the process the next command will run in, now rather than on its request
        (forking a process with libvirt and lxml loaded takes a few ms)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            self._spare_failed("cannot fork a spare process: %s" % e)
            return
        if pid == 0:
            ours.close()
            self._spare(theirs)                    # never returns
        theirs.close()
        self.spare = (pid, ours)

    def _spare_failed(self, what):
        self.spare_failures += 1
        log.warning("%s%s", what, "" if self.spare_failures < SPARE_FAILURES else
                    "; no more spares: each command's process is forked on its request")

    def _drop_spare(self):
        """The spare ends when its channel closes."""
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None

    def _hand_to_spare(self, conn, fds, body):
        """Pass a request to the spare: the caller's connection and streams, and the request
        itself. Returns the spare's pid, or None (no spare, or it is gone: fork then)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        pid, chan = spare
        message = wire.framed(body)
        try:
            chan.settimeout(REQUEST_TIMEOUT)
            sent = chan.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(
                "%di" % (1 + len(fds)), conn.fileno(), *fds))])
            if sent < len(message):
                # only then: the spare closes its end once it has the whole request, and a
                # send, even of nothing, to a closed end fails: that must not make the
                # service fork the command a second time
                chan.sendall(message[sent:])
        except OSError as e:
            self._spare_failed("the spare process %d is gone (%s): forking" % (pid, e))
            return None
        finally:
            chan.close()
        return pid

    def _spare(self, chan):
        """In the spare: wait for a request from the service, then run it as ``_child``
        would have in a process forked for it. Ends when the service closes the channel
        (it stops, its code changed, it died)."""
        try:
            # not the service's listener while waiting (a caller would wait on a dead
            # service's socket), nor its signal pipe
            self._leave_service()
            _close_from(3, keep=chan.fileno())
            try:
                body, fds = _receive(chan)
            finally:
                chan.close()
        except BaseException:
            os._exit(1)
        if body is None:
            os._exit(0)                            # never handed a command
        try:
            argv, cwd, environ, _, umask = wire.decode_request(body)
            if len(fds) != 4:
                raise ValueError("expected 4 descriptors, got %d" % len(fds))
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fds[0])
        except BaseException as e:                 # the service checked it: not expected
            if len(fds) == 4:
                try:
                    os.write(fds[3], ("livesnap: %s\n" % (e,)).encode("utf-8", "replace"))
                except OSError:
                    pass
            os._exit(1)                            # the caller is told "exit 1"
        self._child(conn, fds[1:], argv, cwd, environ, umask)     # never returns

    def _reply(self, conn, line):
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            conn.sendall((line + "\n").encode("ascii"))
        except OSError:
            pass                                   # the client is gone

    def _reap(self):
        """Every ended child: a command (its caller is answered) or a spare."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and self.spare[0] == pid:
                self._drop_spare()                 # a spare that died unused
                self._spare_failed("the spare process %d died (status %d)" % (pid, status))
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            if os.WIFSIGNALED(status):
                self._reply(conn, "signal %d" % os.WTERMSIG(status))
            else:
                self._reply(conn, "exit %d" % os.WEXITSTATUS(status))
            conn.close()

    # -- one command ------------------------------------------------------------------------

    def _leave_service(self):
        """In a process forked from the service (a spare, a command): the signals as a
        program's, and nothing of the service's open: its listener, selector, the running
        commands' connections. The objects are closed, not only their descriptors (a later
        close() of theirs would hit a reused number). Once per process: a spare leaves
        before it waits, then runs its command."""
        if self.left:
            return
        self.left = True
        signal.set_wakeup_fd(-1)
        for signo in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signo, signal.SIG_DFL)
        self.sel.close()
        self.sock.close()
        for other in self.children.values():
            other.close()
        for pending in self.pending.values():
            pending.conn.close()
            pending.close_fds()

    def _child(self, conn, fds, argv, cwd, environ, umask):
        rc = 1
        report = None
        try:
            self._leave_service()
            signal.signal(signal.SIGINT, signal.default_int_handler)   # as in any program
            # the caller's connection, above the received descriptors and 0-2, not inherited
            # by what the command runs: the command answers "exit N" on it itself
            report = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, max(fds + [2]) + 1)
            conn.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
            _close_from(3, keep=report)            # the received fds, the selector's pipe
            os.environ.clear()
            os.environ.update(environ)
            sys.stdin, sys.stdout, sys.stderr = _std_streams(environ)
            os.chdir(cwd)
            os.umask(umask)                        # the files it makes: as the caller's
            sys.argv = ["livesnap"] + list(argv)
            root = logging.getLogger()
            for h in list(root.handlers):
                root.removeHandler(h)
            from livesnap.cli import main
            rc = main.finish(main.main(argv, parser=self.parser))
        except SystemExit as e:                    # argparse: --help, usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        except BaseException as e:
            try:
                os.write(2, ("livesnap: %s\n" % (e,)).encode("utf-8", "replace"))
            except OSError:
                pass
            rc = 1
        finally:
            rc = rc if isinstance(rc, int) else 1
            if report is not None:
                _answer(report, rc)
            os._exit(rc)


def _nothing(signo, frame):
    """SIGCHLD's handler: the wake-up fd is what wakes the loop."""


def run(args):
    """``livesnap service``."""
    logging.getLogger().setLevel(logging.INFO if not args.debug else logging.DEBUG)
    loaded = warm_up()                         # before listening: a socket means ready
    service = Service(None, None, args.request_timeout)       # its parser built, too
    # a SIGTERM/SIGINT from the moment there is a socket waits for serve()'s handlers: its
    # default action would close the listener on callers already queued (ECONNRESET)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    sock = inherited_socket()
    path = None
    if sock is None:
        path = args.socket or wire.socket_path() or wire.DEFAULT_SOCKET
        try:
            sock = listen(path)
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            raise ServiceSocket(path, e.strerror or str(e))
    log.info("livesnap service on %s (%d modules preloaded)", path or "fd 3", len(loaded))
    service.sock, service.path = sock, path
    return service.serve()


def build_parser():
    """``livesnap service``'s options: the common ones, its socket and request timeout."""
    from livesnap.cli import main
    p = argparse.ArgumentParser(prog="livesnap service", parents=[main.common_options()])
    p.add_argument("--socket", metavar="PATH",
                   help="listen here (default: $LIVESNAP_SERVICE or %s; with systemd's "
                        "socket activation, the socket passed)" % wire.DEFAULT_SOCKET)
    p.add_argument("--request-timeout", type=_positive_seconds, default=REQUEST_TIMEOUT,
                   metavar="SECONDS",
                   help="close a connection whose request has not arrived whole by then "
                        "(default: %(default)s)")
    p.set_defaults(func=run)
    return p


def main(argv):
    """``livesnap service ARGS`` (from ``livesnap.launcher``): run as any command is, by the
    command table's ``main`` (logging, errors, exit status). Returns the exit status."""
    from livesnap.cli import main as commands
    return commands.finish(commands.main(argv, parser=build_parser()))


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("not a positive number of seconds: %r" % text)
    return value
