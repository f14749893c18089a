"""tap-ctl, one function per verb (binary overridable by ``TAP_CTL``).

Facts (XEN-NOTES.md §4.2, §8): ``tap-ctl list`` on a non-tty prints one line per tapdisk,
``pid=<dec> minor=<dec> state=<%#x> args=<type>:<path>`` (fields may be missing; ``state=0``
when running, 0x20 when paused). ``pause`` drains in-flight IO (no time cap) and closes the whole
chain; ``unpause -a type:path`` reopens it strictly (EMEDIUMTYPE when the size changed).
``tap-ctl pause -t`` always fails upstream (blktap control/tap-ctl.c falls through into
``usage``), so a pause runs under livesnap's own timeout instead.

tapdisk can leave a finished pause unanswered (blktap drivers/tapdisk-control.c,
``tapdisk_control_pause_vbd``): it retries the pause at most every 10 ms and, between tries,
waits in its event loop's ``select()``; once no request is in flight that wait has no timeout
but the scheduler's 600 s. When the last in-flight request completes within 10 ms of a try,
the event loop itself finishes the pause (the state is 0x2a: paused, quiesced, closed), but
the answer waits for the next unrelated event on any of tapdisk's descriptors, e.g. another
tap-ctl connecting. So while a pause runs livesnap connects to that tapdisk with
``tap-ctl list -p PID`` (read-only; tapdisk answers a list even while busy with the pause),
one ``PAUSE_NUDGE_EARLY`` after the pause command started (served right after tapdisk took
the pause: when no request was in flight tapdisk paused at once and this list shows it
paused), one ``PAUSE_NUDGE_FIRST`` after the start (tapdisk makes its first try a few ms
after the start, its next one is due 10 ms after that), then ``PAUSE_NUDGE_CLOSE`` more, each
``PAUSE_NUDGE_CLOSE_WAIT`` after the last returned, then every ``PAUSE_NUDGE_INTERVAL``
seconds (``_Nudger``). A nudge's list that shows the tapdisk paused is also the state check
after the pause: no other ``list`` runs while the guest waits.

Errors (all ``livesnap.errors.DatapathError``, carrying op, pid, minor, path, rc, err)::

    TapCtlError
     +-- TapdiskNotFound      no such tapdisk (pid/minor) in ``tap-ctl list``
     +-- PauseFailed          pause exited non-zero, or the state is not 0x20 afterwards
     |    +-- PauseTimeout    pause did not return within livesnap's timeout
     +-- UnpauseFailed        unpause exited non-zero, or the tapdisk is still paused
          +-- MediumChanged   rc EMEDIUMTYPE (124): size/sector size/info of the image changed
"""
import collections
import errno
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager

from livesnap.errors import DatapathError, InvalidOutput
from livesnap.tools import runner

log = logging.getLogger(__name__)

# tapdisk state flags (blktap2.py / tapdisk-vbd.h)
DEAD = 0x1
CLOSED = 0x2
QUIESCE_REQUESTED = 0x4
QUIESCED = 0x8
PAUSE_REQUESTED = 0x10
PAUSED = 0x20
SHUTDOWN_REQUESTED = 0x40

EMEDIUMTYPE = getattr(errno, "EMEDIUMTYPE", 124)
DEFAULT_PAUSE_TIMEOUT = 30.0
# the nudges' waits, in seconds (see the module's docstring and ``_Nudger``)
PAUSE_NUDGE_EARLY = 0.001       # after the pause command started
PAUSE_NUDGE_FIRST = 0.011       # after the start too: tapdisk's next try is due
PAUSE_NUDGE_CLOSE_WAIT = 0.001  # then after each list returned, PAUSE_NUDGE_CLOSE times
PAUSE_NUDGE_CLOSE = 10
PAUSE_NUDGE_INTERVAL = 0.05     # then
# SM (blktap2.py TapCtl.list) retries list 10x with 0.5 s backoff on these exit codes
LIST_RETRY_CODES = (errno.EPROTO, errno.ENOENT)

TapDisk = collections.namedtuple("TapDisk", "pid minor state type path")
TapDisk.__doc__ = """One tapdisk as ``tap-ctl list`` shows it; missing fields are None."""


class TapCtlError(DatapathError):
    fields = ("op", "pid", "minor", "path", "reason")
    msg = ("tap-ctl {self.op} of tapdisk pid={self.pid} minor={self.minor} ({self.path}): "
           "{self.reason}")
    rc = None
    err = ""
    cmd = None


class TapdiskNotFound(TapCtlError):
    pass


class PauseFailed(TapCtlError):
    pass


class PauseTimeout(PauseFailed):
    pass


class UnpauseFailed(TapCtlError):
    pass


class MediumChanged(UnpauseFailed):
    msg = ("tap-ctl {self.op} of tapdisk pid={self.pid} minor={self.minor} ({self.path}): "
           "tapdisk refused the reopen, the image's size or info changed (EMEDIUMTYPE)")


def _bin():
    return runner.binary("TAP_CTL", "tap-ctl")


def _reason(rc, out, err):
    text = (err or out or "").strip()
    text = " ".join(text.splitlines()[-3:]) if text else "(no output)"
    # tap-ctl exits with an errno; 126 and 127 are a shell's "cannot run", "not found"
    name = errno.errorcode.get(rc) if rc and 0 < rc < 126 else None
    return "rc=%s%s: %s" % (rc, " (%s)" % name if name else "", text)


# --- list ---------------------------------------------------------------------------------

def parse_list(text):
    """Parse ``tap-ctl list`` (non-tty) output into ``TapDisk`` tuples."""
    disks = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        fields = {}
        rest, sep, args = line.partition("args=")
        if not sep:
            args = None
        for tok in rest.split():
            if "=" not in tok:
                raise ValueError("unparsable token %r in %r" % (tok, line))
            k, v = tok.split("=", 1)
            fields[k] = v
        if not fields and args is None:
            raise ValueError("unparsable line %r" % line)
        typ = path = None
        if args is not None:
            if ":" not in args:
                raise ValueError("args without type in %r" % line)
            typ, path = args.split(":", 1)
        disks.append(TapDisk(pid=int(fields["pid"]) if "pid" in fields else None,
                             minor=int(fields["minor"]) if "minor" in fields else None,
                             state=int(fields["state"], 16) if "state" in fields else None,
                             type=typ, path=path))
    return disks


def list_(pid=None, minor=None, path=None, retries=10, backoff=0.5):
    """``tap-ctl list [-p PID] [-m MINOR]`` as ``[TapDisk]``; with ``path``, the tapdisks
    whose image is that file under any spelling (``same_file``). ``tap-ctl list -f`` is not
    used: it compares strings, and on a host tapdisk is opened on
    ``/var/run/sr-mount/<sr>/<vdi>.vhd`` while ``/var/run`` is a link to ``/run``."""
    argv = [_bin(), "list"]
    if pid is not None:
        argv += ["-p", str(pid)]
    if minor is not None:
        argv += ["-m", str(minor)]
    attempt = 0
    while True:
        rc, out, err = runner.run_rc(argv)
        if rc == 0:
            break
        attempt += 1
        if rc not in LIST_RETRY_CODES or attempt >= retries:
            e = TapCtlError("list", pid, minor, path, _reason(rc, out, err))
            e.rc, e.err, e.cmd = rc, err, argv
            raise e
        time.sleep(backoff)
    try:
        disks = parse_list(out)
    except (ValueError, KeyError) as e:
        raise InvalidOutput(argv, out, str(e))
    # older tap-ctl builds ignore some filters: apply them here too
    return [d for d in disks
            if (pid is None or d.pid == pid) and (minor is None or d.minor == minor)
            and (path is None or same_file(d.path, path))]


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name the same image: equal once normalised, else the
    same file or device (``stat``: symlinked directories, ``/dev/<vg>/<lv>`` and its
    ``/dev/mapper`` name), else (a path that no longer exists) equal once every symlink is
    resolved."""
    if a is None or b is None:
        return False
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def find(path):
    """The tapdisk serving ``path`` (a ``TapDisk``), or None."""
    disks = [d for d in list_(path=path) if d.pid is not None and d.minor is not None]
    if len(disks) > 1:
        log.warning("%d tapdisks serve %s: %s; using the first", len(disks), path, disks)
    return disks[0] if disks else None


def get(pid, minor):
    """The ``TapDisk`` with this pid and minor; ``TapdiskNotFound`` if there is none."""
    for d in list_(pid=pid, minor=minor):
        if d.pid == pid and d.minor == minor:
            return d
    raise TapdiskNotFound("list", pid, minor, None, "no such tapdisk")


# --- pause / unpause ----------------------------------------------------------------------

def pause(pid, minor, timeout=DEFAULT_PAUSE_TIMEOUT, path=None, cbtlog=None):
    """``tap-ctl pause -p PID -m MINOR`` under livesnap's own ``timeout`` (seconds); afterwards
    the tapdisk must show state 0x20 (in a nudge's list served during the pause, else in a
    list run after it). A timed-out pause is undone (best effort, with ``cbtlog`` passed on)
    before ``PauseTimeout`` is raised, so that the guest is not left paused by a late pause."""
    argv = [_bin(), "pause", "-p", str(pid), "-m", str(minor)]
    with _nudging(pid, minor) as nudger:
        rc, out, err = runner.run_rc(argv, timeout=timeout)
    if rc == -9:
        e = PauseTimeout("pause", pid, minor, path, "no answer within %ss" % timeout)
        e.rc, e.err, e.cmd = rc, err, argv
        _undo_late_pause(pid, minor, path, cbtlog)
        raise e
    if rc != 0:
        e = PauseFailed("pause", pid, minor, path, _reason(rc, out, err))
        e.rc, e.err, e.cmd = rc, err, argv
        raise e
    disk = nudger.paused or get(pid, minor)
    if disk.state is None or not disk.state & PAUSED:
        e = PauseFailed("pause", pid, minor, path or disk.path,
                        "state is %s after pause, not paused (0x20)" % _hex(disk.state))
        e.cmd = argv
        raise e
    return disk


class _Nudger(object):
    """``tap-ctl list -p PID`` while a pause of ``pid``/``minor`` runs (``interval``: every
    ``interval`` seconds, else as the module's docstring says). ``paused``: the ``TapDisk``
    of a list that showed ``minor`` paused (PAUSED set: tapdisk had paused it when it
    answered), else None."""

    def __init__(self, pid, minor, interval=None):
        self.pid, self.minor, self.interval = pid, minor, interval
        self.paused = None
        self.close = 0
        self.start = time.monotonic()
        self.stop = threading.Event()

    def run(self):
        self.start = time.monotonic()
        wait = self.interval or PAUSE_NUDGE_EARLY
        while not self.stop.wait(wait):
            try:
                rc, out, err = runner.run_rc([_bin(), "list", "-p", str(self.pid)], timeout=10)
                state = self._state(out) if rc == 0 else None
            except Exception as e:          # a pause must not fail for want of a nudge
                log.debug("nudging tapdisk %s: %s", self.pid, e)
                state = None
            wait = self.interval or self._next(state)

    def _state(self, out):
        """``minor``'s state in a list's output (None: not there, not parsable); records it
        in ``paused`` when PAUSED is set."""
        try:
            disks = [d for d in parse_list(out) if d.pid == self.pid and d.minor == self.minor]
        except (ValueError, KeyError):
            return None
        if len(disks) != 1 or disks[0].state is None:
            return None
        if disks[0].state & PAUSED:
            self.paused = disks[0]
        return disks[0].state

    def _next(self, state):
        """The wait before the next nudge, after one whose list showed ``state``: close
        together at first, at the slow pace once ``PAUSE_NUDGE_CLOSE`` have run or after a
        list that did not show the tapdisk (failed: no use in hurrying)."""
        self.close += 1
        if self.close == 1:                 # the early one
            return max(0.0, self.start + PAUSE_NUDGE_FIRST - time.monotonic())
        if state is None or self.close > PAUSE_NUDGE_CLOSE + 1:
            return PAUSE_NUDGE_INTERVAL
        return PAUSE_NUDGE_CLOSE_WAIT


@contextmanager
def _nudging(pid, minor=None, interval=None):
    """While the block runs, nudge tapdisk ``pid`` (``_Nudger``; ``interval``: every
    ``interval`` seconds): a control connection wakes tapdisk's event loop, so that a pause it
    has finished is answered (see the module's docstring). Failures are ignored: the pause
    itself reports. Yields the ``_Nudger``."""
    nudger = _Nudger(pid, minor, interval)
    t = threading.Thread(target=nudger.run, name="tap-ctl-nudge-%s" % pid)
    t.daemon = True
    t.start()
    try:
        yield nudger
    finally:
        nudger.stop.set()
        t.join()


def _hex(state):
    return "-" if state is None else "%#x" % state


def _undo_late_pause(pid, minor, path, cbtlog=None):
    try:
        disk = get(pid, minor)
        if disk.state and disk.state & (PAUSED | PAUSE_REQUESTED):
            unpause(pid, minor, path or disk.path, disk.type or "vhd", cbtlog=cbtlog)
    except Exception as e:         # the timeout is the error the caller gets
        log.error("could not undo the timed-out pause of tapdisk %s/%s: %s", pid, minor, e)


def unpause(pid, minor, path=None, type="vhd", timeout=None, cbtlog=None):
    """``tap-ctl unpause -p PID -m MINOR [-a TYPE:PATH] [-c CBTLOG]``; afterwards the tapdisk
    must not be paused. Unpausing a tapdisk that already runs ``path`` succeeds (idempotent).
    ``cbtlog``: the disk's changed-block-tracking log, which tapdisk drops at an unpause that
    does not name it (blktap drivers/tapdisk-control.c ``tapdisk_control_resume_vbd``); SM's
    tapdisk-pause names it whenever the VDI has one."""
    argv = [_bin(), "unpause", "-p", str(pid), "-m", str(minor)]
    if path is not None:
        argv += ["-a", "%s:%s" % (type, path)]
    if cbtlog is not None:
        argv += ["-c", cbtlog]
    rc, out, err = runner.run_rc(argv, timeout=timeout)
    if rc != 0:
        if rc == EMEDIUMTYPE:
            e = MediumChanged("unpause", pid, minor, path, _reason(rc, out, err))
        else:
            try:
                disk = get(pid, minor)
            except TapCtlError:
                disk = None
            if (disk is not None and disk.state is not None and not disk.state & PAUSED
                    and (path is None or same_file(disk.path, path))):
                log.info("tapdisk %s/%s already runs %s", pid, minor, disk.path)
                return disk
            e = UnpauseFailed("unpause", pid, minor, path, _reason(rc, out, err))
        e.rc, e.err, e.cmd = rc, err, argv
        raise e
    disk = get(pid, minor)
    if disk.state is None or disk.state & (PAUSED | PAUSE_REQUESTED):
        e = UnpauseFailed("unpause", pid, minor, path or disk.path,
                          "state is %s after unpause" % _hex(disk.state))
        e.cmd = argv
        raise e
    return disk


class PauseWindow(object):
    """What ``paused()`` yields. Set ``path`` inside the block to retarget the unpause
    (``-a type:path``). After the block: ``pause_ms`` (the pause command), ``window_ms`` (from
    the start of the pause command until the unpause returned), ``signals`` received."""

    def __init__(self, pid, minor, path, type, cbtlog=None):
        self.pid, self.minor, self.path, self.type = pid, minor, path, type
        self.cbtlog = cbtlog
        self.pause_ms = None
        self.window_ms = None
        self.signals = []
        self.paused = False

    @property
    def ms(self):
        return self.window_ms

    def __repr__(self):
        return "<PauseWindow %s/%s %s window=%sms>" % (self.pid, self.minor, self.path,
                                                        self.window_ms)


@contextmanager
def paused(pid, minor, path=None, type="vhd", timeout=DEFAULT_PAUSE_TIMEOUT,
           unpause_attempts=3, retry_delay=0.2, cbtlog=None):
    """Pause tapdisk ``pid``/``minor`` for the ``with`` block and always unpause it, with
    ``-a type:path`` (``path``: the tapdisk's current path unless given or set on the yielded
    ``PauseWindow``), and ``-c cbtlog`` when given (also settable on the window).
    SIGINT/SIGTERM arriving meanwhile are only recorded; they are delivered
    again after the unpause. A failing unpause is retried (not ``MediumChanged``) and then
    raised, even when the block raised too (the guest's IO is the bigger problem)."""
    if path is None:
        path = get(pid, minor).path
    win = PauseWindow(pid, minor, path, type, cbtlog)
    old_handlers = {}

    def record(signo, frame):
        log.warning("signal %d during the pause of tapdisk %s/%s: delivered after the unpause",
                    signo, pid, minor)
        win.signals.append(signo)

    if threading.current_thread() is threading.main_thread():
        for signo in (signal.SIGINT, signal.SIGTERM):
            old_handlers[signo] = signal.signal(signo, record)
    t0 = time.monotonic()
    try:
        try:
            pause(pid, minor, timeout=timeout, path=path, cbtlog=cbtlog)
            win.paused = True
            win.pause_ms = (time.monotonic() - t0) * 1000.0
            yield win
        finally:
            if win.paused:
                _unpause_retrying(win, unpause_attempts, retry_delay)
                win.window_ms = (time.monotonic() - t0) * 1000.0
                log.info("tapdisk %s/%s (%s) paused for %.1f ms", pid, minor, win.path,
                         win.window_ms)
    finally:
        for signo, handler in old_handlers.items():
            signal.signal(signo, handler)
        for signo in win.signals:
            os.kill(os.getpid(), signo)


def _unpause_retrying(win, attempts, delay):
    for attempt in range(1, attempts + 1):
        try:
            unpause(win.pid, win.minor, win.path, win.type, cbtlog=win.cbtlog)
            return
        except MediumChanged:
            raise
        except TapCtlError as e:
            if attempt == attempts:
                raise
            log.warning("unpause attempt %d of tapdisk %s/%s failed: %s", attempt, win.pid,
                        win.minor, e)
            time.sleep(delay)
