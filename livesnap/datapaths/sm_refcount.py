"""SM's reference counts of LVHD volumes, kept as SM keeps them for the LVs livesnap changes.

XAPI's storage manager (xapi-project/sm ``drivers/refcounter.py``) counts, per host, who
needs an LV active: one file per object, ``<base>/<namespace>/<object>``, holding
``"<count> <binary count>\\n"`` (``RefCounter._writeCount``); a file whose counts are both 0
is removed, and its namespace directory with it when empty (``_removeObject``). For LVHD the
namespace is ``lvm-<sr uuid>`` (lvhdutil.NS_PREFIX_LVM) and the object a VDI's uuid
(``VHD-<uuid>`` without its prefix). An attached leaf holds the binary count (0 or 1), and
every hidden image under an attached leaf one normal count per attached leaf above it
(LVHDVDI._chainSetActive; lvhdutil.setInnerNodeRefcounts rebuilds exactly that on a new
master and asserts a visible image has no normal count). SM's own chain changes move the
counts with the images (LVHDVDI._finishSnapshot, cleanup.LVHDVDI.rename/delete,
cleanup.LVHDSR._updateNode); ``LvmStorage`` does the same for livesnap's.

The base directory is ``/var/run/sm/refcount`` (``RefCounter.BASE_DIR``), or
``$LIVESNAP_SM_REFCOUNT_DIR`` (tests). Callers hold SM's SR lock, as SM does around its
snapshot and coalesce, and, around each change, SM's per-object lock of every object they
read or write (``locked``): SM's attach and detach on the master (``vdi_attach`` and
``vdi_detach`` run without the SR lock) count each LV under ``Lock(<uuid>, "lvm-<sr>")``
(lvmcache.LVMCache.activate/deactivate: the lock held across RefCounter's read and write
and the LV's activation), so neither side's change of a count is lost to the other's. The
lock files are SM's (``/var/lock/sm``, or ``$LIVESNAP_SM_LOCK_DIR``: tests and the XAPI
plugin's setting). Python 3.6, stdlib only.
"""
import contextlib
import errno
import os

from livesnap import sm_locks
from livesnap.errors import Busy, SmRefcountBusy

BASE_DIR = "/var/run/sm/refcount"
NS_PREFIX_LVM = "lvm-"
LOCK_TIMEOUT = 60.0                 # how long SM may hold an object's lock (seconds)


def base_dir():
    return os.environ.get("LIVESNAP_SM_REFCOUNT_DIR") or BASE_DIR


def lock_dir():
    return os.environ.get("LIVESNAP_SM_LOCK_DIR") or sm_locks.BASE_DIR


_held = {}                          # (ns, obj) -> how many ``locked`` hold it in this process


@contextlib.contextmanager
def locked(ns, objs):
    """SM's per-object locks ``Lock(obj, ns)`` of ``objs``, all held (taken in name order:
    SM takes one at a time), waited for up to ``LOCK_TIMEOUT`` each; ``SmRefcountBusy``
    when SM keeps one longer (the others let go, nothing done). Re-entrant, as SM's Lock
    is: a lock this process holds already is not taken again (a POSIX lock's second open
    file would drop it when closed)."""
    with contextlib.ExitStack() as stack:
        for obj in sorted(set(objs)):
            key = (ns, obj)
            if not _held.get(key):
                try:
                    stack.enter_context(sm_locks.sm_lock(ns, obj, lock_dir(), LOCK_TIMEOUT))
                except Busy as e:
                    raise SmRefcountBusy(vdi=obj, lock_path=e.lock_path, timeout=LOCK_TIMEOUT)
            _held[key] = _held.get(key, 0) + 1
            stack.callback(_release, key)
        yield


def _release(key):
    _held[key] -= 1
    if not _held[key]:
        del _held[key]


def forget_lock(ns, obj):
    """The object's lock file removed, as SM removes it with the LV (``Lock.cleanup(uuid,
    ns)`` in LVHDVDI.delete and the GC's delete); its namespace directory stays."""
    try:
        os.unlink(os.path.join(lock_dir(), ns, obj))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def check(ns, obj, base=None):
    """(count, binary count) of ``obj`` in namespace ``ns``; (0, 0) without a file."""
    path = os.path.join(base or base_dir(), ns, obj)
    try:
        with open(path) as f:
            nums = f.readline().split()
    except (IOError, OSError) as e:
        if e.errno == errno.ENOENT:
            return (0, 0)
        raise
    try:
        return (int(nums[0]), int(nums[1]))
    except (IndexError, ValueError):
        return (0, 0)                       # a file cut short (a crash inside a write)


def set_counts(ns, obj, count, binary, base=None):
    """SM's ``RefCounter.set``: write both counts; both 0 removes the file (and the namespace
    directory when it is left empty). Written to a new file renamed over the old one."""
    if count < 0 or binary not in (0, 1):
        raise ValueError("refcount of %s/%s: (%r, %r)" % (ns, obj, count, binary))
    d = os.path.join(base or base_dir(), ns)
    path = os.path.join(d, obj)
    if count == 0 and binary == 0:
        reset(ns, obj, base)
        return
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, ".%s.livesnap-tmp" % obj)
    with open(tmp, "w") as f:
        f.write("%d %d\n" % (count, binary))
    os.rename(tmp, path)


def reset(ns, obj, base=None):
    """SM's ``RefCounter.reset``: the object's file goes, and its namespace directory when
    that is left empty."""
    d = os.path.join(base or base_dir(), ns)
    try:
        os.unlink(os.path.join(d, obj))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        return
    try:
        os.rmdir(d)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise


def namespace(sr_uuid):
    return NS_PREFIX_LVM + sr_uuid
