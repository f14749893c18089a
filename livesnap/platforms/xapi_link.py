"""The follower's link to xapi (``livesnap xapi-follow``, platforms/xapi_follow.py), kept up
across xapi's restarts, and its stop on SIGTERM/SIGINT.

xapi goes away whenever an admin restarts the toolstack (``xe-toolstack-restart``: xapi is
stopped and started again, for some seconds up to a minute): calls then fail with the
connection refused or reset, the local socket gone, an answer cut off (EOF), a timeout,
``HOST_STILL_BOOTING`` while xapi starts, or the session no longer valid
(``SESSION_INVALID``, ``HANDLE_INVALID`` of class ``session``). Such a failure is *lost*
(``is_lost``): the follower logs it once, logs in again with a bounded backoff (``Backoff``:
0.5 s doubling up to 30 s) and starts over from a new ``event.from`` token and a full
comparison, since the events of the outage are lost. Any other XAPI failure is an answer.

``Stopper``: SIGTERM/SIGINT stop the follower at a safe point. While it waits (``event.from``,
a backoff) the signal ends the wait at once (``Stopped``); elsewhere it is recorded and the
follower stops after what it is doing. A signal the engine's own catcher took during a
merge (engine/session.py ``SignalCatcher``: the step finishes, the plan stops) is seen
through ``signal.set_wakeup_fd``, which every handled signal writes to.

Python 3.6, stdlib only.
"""
import http.client
import logging
import os
import signal
import time
import xmlrpc.client

log = logging.getLogger(__name__)

# a session xapi no longer knows (a restart), or a xapi not yet serving
LOST_CODES = ("SESSION_INVALID", "HOST_STILL_BOOTING")
# no answer at all: refused, reset, gone (OSError: socket.timeout too), cut off
# (http.client's RemoteDisconnected, IncompleteRead), or not xapi's XML (a Fault, a
# ProtocolError: XenAPI's own "Tried 3 times to get a valid session")
LOST_TYPES = (OSError, EOFError, http.client.HTTPException, xmlrpc.client.Error)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def is_lost(e):
    """Whether a failed XenAPI call (``XapiError``, or the exception XenAPI raised) lost the
    link to xapi rather than got xapi's answer."""
    details = getattr(e, "details", None)
    if isinstance(details, (list, tuple)) and details:
        code = str(details[0])
        return code in LOST_CODES or (
            code == "HANDLE_INVALID" and len(details) > 1 and
            str(details[1]).lower() == "session")
    seen = set()
    while e is not None and id(e) not in seen:      # XapiError: raised while handling it
        seen.add(id(e))
        if isinstance(e, LOST_TYPES):
            return True
        e = e.__cause__ or e.__context__
    return False


class Backoff(object):
    """Delays 0.5 s, 1 s, 2 s ... up to ``cap`` (30 s)."""

    def __init__(self, first=0.5, cap=30.0):
        self.first = first
        self.cap = cap
        self.next = first

    def delay(self):
        d = self.next
        self.next = min(self.next * 2, self.cap)
        return d


class Stopped(BaseException):
    """SIGTERM/SIGINT ended a wait (a BaseException: no ``except Exception`` of XenAPI's or
    http's swallows it)."""

    def __init__(self, signo):
        BaseException.__init__(self, signo)
        self.signo = signo


class Stopper(object):
    """SIGTERM/SIGINT for the follower (see the module's doc); outside the main thread it
    installs nothing and only ``stop()`` (the caller's) ends the follower."""

    def __init__(self, stop=None):
        self.stop = stop
        self.signo = None
        self.waiting = False
        self.old = {}
        self.old_wakeup = None
        self.pipe = None

    def _handler(self, signo, frame):
        self.signo = signo
        if self.waiting:
            raise Stopped(signo)

    def __enter__(self):
        try:
            for sig in STOP_SIGNALS:
                self.old[sig] = signal.signal(sig, self._handler)
        except ValueError:                          # not the main thread
            self.old = {}
            return self
        r, w = os.pipe()
        for fd in (r, w):
            os.set_blocking(fd, False)
        self.pipe = (r, w)
        self.old_wakeup = signal.set_wakeup_fd(w)
        return self

    def __exit__(self, *exc):
        if self.pipe is not None:
            signal.set_wakeup_fd(self.old_wakeup)
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None
        for sig, old in self.old.items():
            signal.signal(sig, old)
        self.old = {}
        return False

    def stopping(self):
        """Whether the follower is to stop: a stop signal came (also one the engine's
        catcher took), or the caller's ``stop()`` says so."""
        if self.signo is None and self.pipe is not None:
            try:
                got = os.read(self.pipe[0], 512)
            except BlockingIOError:
                got = b""
            for b in bytearray(got):
                if b in STOP_SIGNALS:
                    self.signo = b
        return self.signo is not None or (self.stop is not None and bool(self.stop()))

    def check(self):
        """``Stopped`` when the follower is to stop."""
        if self.stopping():
            raise Stopped(self.signo)

    def wait(self, fn, *args):
        """``fn(*args)`` (a call that waits: ``event.from``, a sleep), ended by a stop
        signal with ``Stopped``."""
        self.waiting = True
        try:
            self.check()
            return fn(*args)
        finally:
            self.waiting = False

    def sleep(self, seconds):
        self.wait(time.sleep, seconds)


class Link(object):
    """The XenAPI session of ``platform``, (re)made by ``connect()`` (a logged-in session,
    e.g. ``xapi.connect_local``)."""

    def __init__(self, platform, connect, stopper, backoff=Backoff):
        self.platform = platform
        self.connect = connect
        self.stopper = stopper
        self.backoff = backoff

    def lost(self, e):
        """Log the loss once, then ``up()``."""
        log.warning("lost the link to xapi (%s); logging in again, retrying with a backoff up "
                    "to %.0f s", e, self.backoff().cap)
        self.up(quiet=True)

    def up(self, quiet=False):
        """Log in, retrying with the backoff until it works (or a stop signal: ``Stopped``);
        the old session is logged out if xapi still has it."""
        started = time.monotonic()
        backoff = self.backoff()
        told = quiet
        while True:
            self.stopper.check()
            try:
                session = self.stopper.wait(self.connect)
                break
            except Exception as e:
                if not told:
                    log.warning("cannot log in to xapi (%s); retrying with a backoff up to "
                                "%.0f s", e, backoff.cap)
                    told = True
                else:
                    log.debug("logging in to xapi failed: %s", e)
            self.stopper.sleep(backoff.delay())
        old, self.platform.session = self.platform.session, session
        if told:
            log.warning("logged in to xapi after %.1f s of trying", time.monotonic() - started)
        if old is not None:
            logout(old)

    def close(self):
        if self.platform.session is not None:
            logout(self.platform.session)
            self.platform.session = None


def logout(session):
    """Log a XenAPI session out if xapi still knows it; a failure is only logged. Its
    transport's connection is closed first: a call ``Stopped`` left it mid-answer
    (xmlrpc.client closes it only for an ``Exception``)."""
    transport = vars(session).get("transport")      # not __getattr__'s: an RPC proxy
    if transport is not None:
        try:
            transport.close()
        except Exception:
            pass
    try:
        session.xenapi.session.logout()
    except Exception as e:
        log.debug("logout: %s", e)
