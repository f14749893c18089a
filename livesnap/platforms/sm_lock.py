"""The storage manager's locks on XAPI hosts, taken around livesnap's chain changes.

SM serialises everything that changes an SR's VHD chains (its own snapshots, deletes and the
garbage collector's coalesce/relink) with a POSIX write lock on ``/var/lock/sm/<sr-uuid>/sr``
(xapi-project/sm ``drivers/lock.py``: ``Lock("sr", sr_uuid)``, ``flock.WriteLock``, i.e.
``fcntl(F_SETLK/F_SETLKW, F_WRLCK)`` on the whole file). livesnap takes the same lock, so the
GC never sees a chain half changed. Around a pause of a VDI's tapdisk SM holds the VDI's
lock (``Lock("vdi", vdi_uuid)``: ``/var/lock/sm/<vdi-uuid>/vdi``, drivers/tapdisk-pause and
blktap2.py); livesnap takes it around its pauses too.
"""
import contextlib
import errno
import fcntl
import os
import time

from livesnap.errors import Busy

BASE_DIR = "/var/lock/sm"


def sr_lock(sr_uuid, base_dir=BASE_DIR, timeout=60.0, poll=0.05):
    """Hold SM's lock of SR ``sr_uuid``; ``Busy`` if SM holds it longer than ``timeout``."""
    return sm_lock(sr_uuid, "sr", base_dir, timeout, poll)


def vdi_lock(vdi_uuid, base_dir=BASE_DIR, timeout=60.0, poll=0.05):
    """Hold SM's lock of VDI ``vdi_uuid`` (what SM holds around a pause of its tapdisk)."""
    return sm_lock(vdi_uuid, "vdi", base_dir, timeout, poll)


def open_lock_file(ns, name, base_dir=BASE_DIR):
    """(fd, path) of SM's lock file ``<base_dir>/<ns>/<name>``, made as SM makes it."""
    nspath = os.path.join(base_dir, ns)
    if not os.path.isdir(nspath):
        os.makedirs(nspath, 0o755)
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
    """SM's ``Lock(name, ns)``: a POSIX write lock on ``<base_dir>/<ns>/<name>``."""
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
