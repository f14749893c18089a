"""The storage manager's lock files, as XAPI's SM takes them (xapi-project/sm
``drivers/lock.py``): ``Lock(name, ns)`` is a POSIX write lock (``fcntl`` ``F_WRLCK`` on the
whole file, ``flock.WriteLock``) on ``<base>/<ns>/<name>``, base ``/var/lock/sm``.

Below both users: the XAPI platform (SM's SR, VDI and GC locks, ``platforms.sm_lock`` and
``platforms.sm_gc``) and the LVHD datapath (SM's per-object lock of an LV's refcount,
``datapaths.sm_refcount``). Python 3.6, stdlib only.
"""
import contextlib
import errno
import fcntl
import os
import time

from livesnap.errors import Busy

BASE_DIR = "/var/lock/sm"


def open_lock_file(ns, name, base_dir=BASE_DIR):
    """(fd, path) of SM's lock file ``<base_dir>/<ns>/<name>``, made as SM makes it."""
    nspath = os.path.join(base_dir, ns)
    if not os.path.isdir(nspath):
        os.makedirs(nspath, 0o755, exist_ok=True)
    path = os.path.join(nspath, name)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), path


def try_lock(fd):
    """Take the POSIX write lock on ``fd`` if no other process holds it: True if taken."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (IOError, OSError) as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return False


@contextlib.contextmanager
def sm_lock(ns, name, base_dir=BASE_DIR, timeout=60.0, poll=0.05):
    """SM's ``Lock(name, ns)``: a POSIX write lock on ``<base_dir>/<ns>/<name>``, waited for
    up to ``timeout`` seconds (``Busy`` then, nothing taken)."""
    fd, path = open_lock_file(ns, name, base_dir)
    try:
        deadline = time.monotonic() + timeout
        while not try_lock(fd):
            if time.monotonic() > deadline:
                raise Busy(domain="%s %s" % (name.upper(), ns), lock_path=path)
            time.sleep(poll)
        try:
            yield path
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
