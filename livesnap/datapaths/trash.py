"""Images merged away on a running domain, freed after the command instead of inside it.

On a file system mounted with ``discard`` (``datapaths.discards_on_free``), freeing a large
image costs ~0.8 ms per MiB and, done as one unlink, stalls the guest's flushes behind one
big journal commit. livesnap therefore shrinks such an image in small synced steps; this
module moves that work out of the command's wall time:

* ``put(path)`` renames the image, as the command's last act on it, to a hidden name in its
  own directory (``.<name>.livesnap-free``: not an image name any tool looks for, not a
  ``*.vhd``/``*.qcow2`` a storage scan would pick up) and queues it;
* ``release()``, called when the command's session ends (its domain lock released), starts
  a detached process that shrinks each queued file in 8 MiB synced steps and unlinks it;
* ``sweep(dirs)`` queues what a process that died (a host crash) left behind, so the next
  command on a domain with images in those directories frees it.

A file being freed is held under ``flock``, so two sweeps never free the same file twice.
Only a file livesnap made is renamed, truncated or unlinked (``own_files``: a regular file
with one link, opened without following a link, on its directory's device, owned by root
or the directory's owner): anything else under a trash name (a planted link, hard link,
FIFO, device, directory, another user's file) is left alone with a warning.
The detached process inherits no descriptor (not the domain lock, not the caller's pipes):
the command's caller sees it end when its own work ends.
"""
import errno
import fcntl
import logging
import os
import sys

from livesnap.datapaths import own_files
from livesnap.errors import NotOurFile

log = logging.getLogger(__name__)

SUFFIX = ".livesnap-free"
STEP = 8 << 20

_pending = []


def trash_name(path):
    d, base = os.path.split(path)
    return os.path.join(d, "." + base + SUFFIX)


def put(path):
    """Rename ``path`` to its trash name and queue it; a file already gone is fine (a step
    re-run after a crash). Returns the trash name, or None."""
    new = trash_name(path)
    f = own_files.open_own(path)                 # NotOurFile: left where it is
    if f is None:
        return None
    with f:
        try:
            f.rename(os.path.basename(new))
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
    log.info("removed %s (its blocks are freed after the command)", path)
    _pending.append(new)
    return new


def pending():
    return list(_pending)


def sweep(dirs):
    """Queue trash files left in ``dirs`` by an earlier process that did not finish; what is
    under a trash name but not a file livesnap made is left alone, with a warning."""
    for d in sorted(set(dirs)):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if n.startswith(".") and n.endswith(SUFFIX):
                p = os.path.join(d, n)
                if p in _pending:
                    continue
                try:
                    if not own_files.inspect(p):
                        continue
                except (NotOurFile, OSError) as e:
                    log.warning("not freed: %s", e)
                    continue
                _pending.append(p)


def empty(path, step=STEP):
    """Shrink ``path`` in ``step`` synced steps, then unlink it. False when another process
    is freeing it (its lock is held) or it is gone; NotOurFile (nothing changed) when it is
    not a file livesnap made."""
    f = own_files.open_own(path, os.O_WRONLY)
    if f is None:
        return False
    fd = f.fd
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        size = os.fstat(fd).st_size
        while size > step:
            size -= step
            os.ftruncate(fd, size)
            os.fsync(fd)
        try:
            f.unlink()
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        return True
    finally:
        f.close()


def release(wait=False):
    """Free the queued files in a detached process (``wait``: here, now). Returns the pid of
    the process started, or None.

    The process is a new interpreter (``-S``: the standard library and livesnap only), not a
    fork: spawning it costs the caller ~1 ms, where forking a process that has libvirt and
    its threads costs ~10. It has its own session, stdio on /dev/null and no other
    descriptor (``close_fds``): not the domain lock, not the caller's pipes. The caller does
    not wait for it; Python's subprocess module reaps it in a process that lives on."""
    paths = [os.path.abspath(p) for p in _pending]      # the worker runs in /
    del _pending[:]
    if not paths:
        return None
    if wait:
        for p in paths:
            try:
                empty(p)
            except NotOurFile as e:
                log.warning("not freed: %s", e)
        return None
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from livesnap.datapaths import trash; sys.exit(trash.worker(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-S", "-c", code, root] + paths,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, cwd="/",
                            start_new_session=True)
    return proc.pid


def worker(paths):
    """The detached process's work: free each file (a test may stall it at the fault point
    ``trash:emptying:0``). Exit status 1 when a file could not be freed (the next sweep
    will)."""
    from livesnap import faults
    rc = 0
    for p in paths:
        faults.point("trash", "emptying", 0)
        try:
            empty(p)
        except (OSError, NotOurFile):
            rc = 1
    return rc
