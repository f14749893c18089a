"""The real blktap in the test bed: tapdisk, tap-ctl and vhd-util built by
scripts/build-blktap.sh from ../shared/upstream, found here by the same cache lookup (the
archive's sha256), and the helpers the Xen tests use to drive them.

* ``prefix()``: the built prefix; ``MissingBuild`` (a failure, not a skip) when it is absent.
* ``env()``: TAP_CTL (tap-ctl with the memlock shim preloaded) and VHD_UTIL for livesnap.
* ``vhd_util(*args)``, ``check(path)`` (``vhd-util check -n PATH -p -b``: [] or the problems),
  ``query(path)`` (parent, hidden, virtual size), ``create(path, size)``.
* ``Tapdisks``: tapdisks of one test, each with a guest (testxen/guest.py) doing IO through the
  real tapdisk over NBD; everything it started is destroyed or killed in ``close()``.
* ``read(path, offset, length)`` / ``write(path, offset, data)``: IO on the chain of ``path``
  through a fresh real tapdisk (read-only for reads) over NBD: the chain as tapdisk resolves it.
"""
import contextlib
import fcntl
import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

from testxen import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "/run/blktap-control"
MiB = 1 << 20


class MissingBuild(RuntimeError):
    pass


def _archive():
    shared = os.environ.get("LIVESNAP_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
    found = glob.glob(os.path.join(shared, "upstream", "blktap-*.tar.gz"))
    if len(found) != 1:
        raise MissingBuild("expected one blktap-*.tar.gz in %s/upstream, found %d"
                           % (shared, len(found)))
    return found[0]


_prefix = []


def prefix():
    """The prefix scripts/build-blktap.sh built (same lookup: the archive's sha256)."""
    if not _prefix:
        h = hashlib.sha256()
        with open(_archive(), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        cache = os.environ.get("LIVESNAP_CACHE") or "/var/cache/livesnap"
        p = os.path.join(cache, "blktap-%s" % h.hexdigest())
        if not os.path.exists(os.path.join(p, ".built")) \
                or not os.path.exists(os.path.join(p, "testbed", "tap-ctl")):
            raise MissingBuild("no blktap build at %s: run scripts/build-blktap.sh "
                               "(make test does)" % p)
        _prefix.append(p)
    return _prefix[0]


def tap_ctl_bin():
    return os.path.join(prefix(), "testbed", "tap-ctl")


def vhd_util_bin():
    return os.path.join(prefix(), "bin", "vhd-util")


# tapdisk's resume retry pause (10 x 1 s upstream) in ms per second: see memlock_shim.c
RETRY_MS = "100"


def env():
    """The variables that point livesnap at the real tools (and shorten tapdisk's resume
    retry pause, testxen/preload/memlock_shim.c)."""
    return {"TAP_CTL": tap_ctl_bin(), "VHD_UTIL": vhd_util_bin(),
            "TESTXEN_TAPDISK_RETRY_MS": RETRY_MS}


def _run(argv, timeout=120, env=None):
    p = subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr


def vhd_util(*args):
    """(rc, stdout, stderr) of the real vhd-util."""
    return _run([vhd_util_bin()] + list(args))


def tap_ctl(*args):
    """(rc, stdout, stderr) of the real tap-ctl."""
    return _run([tap_ctl_bin()] + list(args), timeout=60, env=dict(os.environ, **env()))


def check(path):
    """``vhd-util check -n PATH -p -b`` (the image, its parents, the bitmaps): [] when valid,
    else [its output]."""
    rc, out, err = vhd_util("check", "-n", path, "-p", "-b")
    if rc == 0 and "is valid" in out:
        return []
    return ["rc=%d %s %s" % (rc, out.strip(), err.strip())]


def query(path):
    """{'parent': path or None, 'hidden': 0/1, 'virtual_size': bytes} from vhd-util query."""
    rc, out, err = vhd_util("query", "-n", path, "-p", "-f", "-v")
    assert rc == 0, (path, rc, out, err)
    lines = out.strip().splitlines()
    size, parent, hidden = lines[0], lines[1], lines[2]
    return {"virtual_size": int(size) * MiB,
            "parent": None if "has no parent" in parent else parent.strip(),
            "hidden": int(hidden.split(":")[1])}


def create(path, size):
    """``vhd-util create -n PATH -s MiB``: a new empty dynamic VHD as SM makes it."""
    rc, out, err = vhd_util("create", "-n", path, "-s", str(size // MiB))
    assert rc == 0, (path, rc, out, err)


# --- tapdisks ---------------------------------------------------------------------------------

def parse_create(out):
    """The minor from ``tap-ctl create``'s output (``/run/blktap-control/tapdisk/tapdisk-N``
    without the blktap kernel module, ``/dev/xen/blktap-2/tapdevN`` with it)."""
    name = out.strip().rsplit("/", 1)[-1]
    digits = name[len(name.rstrip("0123456789")):]
    if not digits:
        raise ValueError("unexpected tap-ctl create output %r" % out)
    return int(digits)


def nbd_socket(pid, minor):
    return os.path.join(RUN, "nbd%d.%d" % (pid, minor))


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


MINORS_LOCK = "/run/livesnap-test-blktap-minors.lock"
_minors_depth = [0, None]


@contextlib.contextmanager
def minors():
    """Held while a test creates or destroys a tapdisk, across processes (pytest-xdist
    workers): tap-ctl frees a minor at destroy, and a paused or killed tapdisk's ID file is
    removed here afterwards (``_forget``); without the lock another worker may allocate that
    minor in between and lose its ID file, so that two tapdisks end up with one minor.
    Re-entrant within a process."""
    if _minors_depth[0] == 0:
        fd = os.open(MINORS_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _minors_depth[1] = fd
    _minors_depth[0] += 1
    try:
        yield
    finally:
        _minors_depth[0] -= 1
        if _minors_depth[0] == 0:
            os.close(_minors_depth[1])
            _minors_depth[1] = None


def _forget(pid, minor):
    """What a SIGKILLed tapdisk leaves: its minor's ID file and its sockets."""
    for p in [os.path.join(RUN, "tapdisk", "tapdisk-%d" % minor)] \
            + glob.glob(os.path.join(RUN, "*%d.%d" % (pid, minor))) \
            + glob.glob(os.path.join(RUN, "*%d" % pid)):
        try:
            os.unlink(p)
        except OSError:
            pass


def spawn(path, readonly=False):
    """``tap-ctl create -a vhd:PATH [-R]``: (pid, minor) of the new real tapdisk."""
    args = ["create", "-a", "vhd:%s" % path] + (["-R"] if readonly else [])
    with minors():
        rc, out, err = tap_ctl(*args)
    if rc != 0:
        raise OSError(rc, "tap-ctl create -a vhd:%s failed: %s" % (path, (err or out).strip()))
    minor = parse_create(out)
    rc, out, err = tap_ctl("list", "-m", minor)
    pid = None
    for line in out.splitlines():
        kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
        if kv.get("minor") == str(minor):
            pid = int(kv["pid"])
    assert pid is not None, (minor, out, err)
    return pid, minor


def destroy(pid, minor):
    """``tap-ctl destroy``; SIGKILL (and clean up after it) when that fails."""
    with minors():
        try:
            rc, _, _ = tap_ctl("destroy", "-p", pid, "-m", minor)
        except subprocess.TimeoutExpired:
            rc = -1
        if rc != 0 and _alive(pid):
            kill(pid, minor)
        _reaped(pid, minor)
    return rc


def _reaped(pid, minor, timeout=10.0):
    """After a destroy: once the tapdisk is gone, remove its minor's ID file if tap-ctl left
    it (it does when the tapdisk was paused: the minor would stay taken)."""
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if not _alive(pid):
        _forget(pid, minor)


def kill(pid, minor):
    with minors():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        _forget(pid, minor)


@contextlib.contextmanager
def opened(path, readonly=True):
    """An NBD client on the chain of ``path`` served by a fresh real tapdisk."""
    pid, minor = spawn(path, readonly=readonly)
    try:
        with nbd.Client(nbd_socket(pid, minor), timeout=60) as c:
            yield c
    finally:
        destroy(pid, minor)


def read(path, offset=0, length=None):
    """Bytes of the chain of ``path`` as the real tapdisk reads them."""
    with opened(path) as c:
        if length is None:
            length = c.size - offset
        out = bytearray()
        while len(out) < length:
            n = min(MiB, length - len(out))
            out += c.read(offset + len(out), n)
        return bytes(out)


def write(path, offset, data):
    """Write ``data`` into the chain of ``path`` (its leaf) through the real tapdisk."""
    with opened(path, readonly=False) as c:
        c.write(offset, data)


def digest(path, length=None):
    return hashlib.sha256(read(path, 0, length)).hexdigest()


class Tapdisks(object):
    """The real tapdisks of one test, each serving a disk to a guest (testxen/guest.py) that
    writes and acknowledges records over NBD. ``close()`` stops the guests and destroys the
    tapdisks (SIGKILL when tap-ctl cannot); the tests' ack logs live in ``run_dir``."""

    def __init__(self, run_dir, slots=8, stride=MiB, interval=0.003):
        self.run_dir = run_dir
        self.slots, self.stride, self.interval = slots, stride, interval
        self.disks = {}          # (pid, minor) -> path
        self.guests = {}         # (pid, minor) -> Popen

    def create(self, path, guest=True):
        """Start a real tapdisk on ``path`` and (``guest``) its guest; (pid, minor)."""
        pid, minor = spawn(path)
        self.disks[(pid, minor)] = path
        if guest:
            self.start_guest(pid, minor)
        return pid, minor

    def ack_log(self, pid, minor):
        return os.path.join(self.run_dir, "guest%d.%d.ack" % (pid, minor))

    def start_guest(self, pid, minor):
        envv = dict(os.environ)
        envv["PYTHONPATH"] = ROOT + (os.pathsep + envv["PYTHONPATH"]
                                     if envv.get("PYTHONPATH") else "")
        log = open(os.path.join(self.run_dir, "guest%d.%d.err" % (pid, minor)), "ab")
        try:
            self.guests[(pid, minor)] = subprocess.Popen(
                [sys.executable, "-m", "testxen.guest", "--socket", nbd_socket(pid, minor),
                 "--ack-log", self.ack_log(pid, minor), "--slots", str(self.slots),
                 "--stride", str(self.stride), "--interval", str(self.interval)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=envv,
                cwd="/", start_new_session=True)
        finally:
            log.close()

    def acked(self, pid, minor):
        try:
            with open(self.ack_log(pid, minor)) as f:
                return sum(1 for line in f if line.startswith("ACK "))
        except FileNotFoundError:
            return 0

    def wait_acks(self, pid, minor, n, timeout=30.0):
        """Wait until at least ``n`` acks are in the log; the count."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.acked(pid, minor)
            if c >= n:
                return c
            g = self.guests.get((pid, minor))
            if g is not None and g.poll() is not None:
                with open(os.path.join(self.run_dir, "guest%d.%d.err" % (pid, minor))) as f:
                    raise AssertionError("the guest of tapdisk %d/%d ended (rc %s) after %d acks:"
                                         " %s" % (pid, minor, g.returncode, c, f.read()[-2000:]))
            assert time.monotonic() < deadline, "only %d of %d acks" % (c, n)
            time.sleep(0.01)

    def stop_guest(self, pid, minor):
        """SIGTERM the guest and wait: its last write returned (and was acked) or failed."""
        g = self.guests.pop((pid, minor), None)
        if g is None:
            return
        g.terminate()
        try:
            g.wait(60)
        except subprocess.TimeoutExpired:
            g.kill()
            g.wait()
            raise AssertionError("the guest of tapdisk %d/%d did not stop" % (pid, minor))

    def destroy(self, pid, minor):
        """Stop the guest, then ``tap-ctl destroy``; the rc of tap-ctl."""
        self.stop_guest(pid, minor)
        rc, out, err = tap_ctl("destroy", "-p", pid, "-m", minor)
        if rc == 0:
            self.disks.pop((pid, minor), None)
            _reaped(pid, minor)
        return rc, out, err

    def close(self):
        for g in self.guests.values():
            g.kill()
            g.wait()
        self.guests = {}
        for (pid, minor) in list(self.disks):
            if _alive(pid):
                destroy(pid, minor)
            else:
                _forget(pid, minor)
        self.disks = {}


def open_files(pid):
    out = []
    for fd in glob.glob("/proc/%d/fd/*" % pid):
        try:
            out.append(os.readlink(fd))
        except OSError:
            pass
    return out


