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
``$LIVESNAP_SM_REFCOUNT_DIR`` (tests). Callers hold SM's SR lock, as SM does around the same
changes. Python 3.6, stdlib only.
"""
import errno
import os

BASE_DIR = "/var/run/sm/refcount"
NS_PREFIX_LVM = "lvm-"


def base_dir():
    return os.environ.get("LIVESNAP_SM_REFCOUNT_DIR") or BASE_DIR


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
