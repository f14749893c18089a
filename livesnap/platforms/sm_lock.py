"""The storage manager's locks on XAPI hosts, taken around livesnap's chain changes.

SM serialises everything that changes an SR's VHD chains (its own snapshots, deletes and the
garbage collector's coalesce/relink) with a POSIX write lock on ``/var/lock/sm/<sr-uuid>/sr``
(xapi-project/sm ``drivers/lock.py``: ``Lock("sr", sr_uuid)``, ``flock.WriteLock``, i.e.
``fcntl(F_SETLK/F_SETLKW, F_WRLCK)`` on the whole file). livesnap takes the same lock, so the
GC never sees a chain half changed. Around a pause of a VDI's tapdisk SM holds the VDI's
lock (``Lock("vdi", vdi_uuid)``: ``/var/lock/sm/<vdi-uuid>/vdi``, drivers/tapdisk-pause and
blktap2.py); livesnap takes it around its pauses too. The lock file primitive is
``livesnap.sm_locks`` (the LVHD datapath takes SM's per-object refcount locks with it).
"""
from livesnap.sm_locks import BASE_DIR, open_lock_file, sm_lock, try_lock  # noqa: F401


def sr_lock(sr_uuid, base_dir=BASE_DIR, timeout=60.0, poll=0.05):
    """Hold SM's lock of SR ``sr_uuid``; ``Busy`` if SM holds it longer than ``timeout``."""
    return sm_lock(sr_uuid, "sr", base_dir, timeout, poll)


def vdi_lock(vdi_uuid, base_dir=BASE_DIR, timeout=60.0, poll=0.05):
    """Hold SM's lock of VDI ``vdi_uuid`` (what SM holds around a pause of its tapdisk)."""
    return sm_lock(vdi_uuid, "vdi", base_dir, timeout, poll)
