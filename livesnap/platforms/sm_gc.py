"""Holding XAPI's storage manager's garbage collector (SM's GC, ``drivers/cleanup.py``) off an
SR while livesnap merges there, by SM's own protocol and files (SM v3.2.12; never by
importing SM):

* ``gc_active`` (``cleanup.py``: ``LOCK_TYPE_GC_ACTIVE``; ``lock.Lock("gc_active", sr)``, a
  POSIX write lock on ``/var/lock/sm/<sr-uuid>/gc_active``) is held by a GC process for its
  whole run (``_gcLoop``: ``lockGCActive.acquireNoblock()`` first, "Another GC instance
  already active, exiting" when it cannot, released in its ``finally``). SM takes it only
  while holding the SR lock (``LockActive.acquireNoblock``: ``Lock("sr", sr)`` then
  ``gc_active`` without blocking); so does livesnap.
* A GC already running is asked to stop with the IPC flag ``abort`` (``ipc.IPCFlag(sr)``: the
  file ``/var/run/sm/ipc/<sr-uuid>/abort`` holding the setter's pid), which the GC tests
  in its quiet period (``_gcLoopPause``, 5 minutes after a kick), between steps and while a
  coalesce runs (``Util.runAbortable``: the coalesce is killed and undone); it then
  releases ``gc_active``. ``cleanup._abort`` waits for ``gc_active`` (20 x 3 s) and clears the
  flag; ``cleanup.py -a``/``-x`` are that function. livesnap does the same, and clears only
  a flag it set.

While livesnap holds ``gc_active`` a GC kicked meanwhile (``_kickGC`` ->
``systemctl start SMGC@<sr>``) exits at once; livesnap's own ``SR.scan`` afterwards (the
engine's metadata sync) kicks it again, and it finds the state it would have reached.
"""
import contextlib
import fcntl
import os
import time

from livesnap.errors import SmGcBusy
from livesnap.platforms import sm_lock

GC_ACTIVE = "gc_active"
ABORT_FLAG = "abort"
IPC_BASE_DIR = "/var/run/sm/ipc"

_HELD = {}                  # (lock dir, sr uuid) -> how many blocks of this process hold it


@contextlib.contextmanager
def held_off(sr_uuid, lock_dir=sm_lock.BASE_DIR, ipc_dir=IPC_BASE_DIR, timeout=60.0,
             poll=0.05):
    """Hold SM's GC off SR ``sr_uuid``: ``gc_active`` held for the block, a running GC
    aborted first. Yields ``{"aborted": True}`` when a GC had to be asked to stop.
    ``SmGcBusy`` when the GC has not let go within ``timeout``."""
    key = (os.path.abspath(lock_dir), sr_uuid)
    if key in _HELD:
        # already held by this process (the follower around the engine's merge): POSIX
        # locks belong to the process, and a second descriptor's close would drop it
        _HELD[key] += 1
        try:
            yield {"aborted": False}
        finally:
            _HELD[key] -= 1
        return
    fd, path = sm_lock.open_lock_file(sr_uuid, GC_ACTIVE, lock_dir)
    flag = os.path.join(ipc_dir, sr_uuid, ABORT_FLAG)
    state = {"aborted": False}
    set_flag = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            with sm_lock.sr_lock(sr_uuid, base_dir=lock_dir, timeout=timeout, poll=poll):
                got = sm_lock.try_lock(fd)
            if got:
                break
            if not os.path.exists(flag):
                set_flag = _set_flag(flag)
                state["aborted"] = True
            if time.monotonic() > deadline:
                raise SmGcBusy(sr=sr_uuid, lock_path=path, timeout=timeout)
            time.sleep(poll)
        if set_flag:
            _clear_flag(flag)
            set_flag = False
        _HELD[key] = 1
        try:
            yield state
        finally:
            del _HELD[key]
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        if set_flag:
            _clear_flag(flag)
        os.close(fd)


def _set_flag(flag):
    """``IPCFlag.set``: the flag file holding this pid."""
    d = os.path.dirname(flag)
    if not os.path.isdir(d):
        os.makedirs(d, 0o755)
    with open(flag, "w") as f:
        f.write("%d\n" % os.getpid())
    return True


def _clear_flag(flag):
    try:
        os.unlink(flag)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def held_off_all(sr_uuids, lock_dir=sm_lock.BASE_DIR, ipc_dir=IPC_BASE_DIR, timeout=60.0):
    """``held_off`` for several SRs, taken in uuid order."""
    with contextlib.ExitStack() as stack:
        states = [stack.enter_context(held_off(u, lock_dir, ipc_dir, timeout))
                  for u in sorted(set(sr_uuids))]
        yield {"aborted": any(s["aborted"] for s in states)}
