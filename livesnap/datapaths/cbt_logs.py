"""Changed-block-tracking logs kept as XAPI's storage manager keeps them (SM 3.2.12
drivers/VDI.py, FileSR.py, tapdisk-pause; blktap cbt/, drivers/block-log.c).

A VDI with CBT on has a log ``<vdi uuid>.cbtlog`` beside its image (a file SR); a running
tapdisk has it open (``tap-ctl create -C``) and sets a bit per 64 KiB block the guest writes.
The logs of one disk are a chain through the parent and child uuids in their headers, from
the oldest snapshot VDI to the leaf; ``VDI.list_changed_blocks(a, b)`` ORs the bitmaps of
the logs after ``a`` up to ``b``. What SM does, and livesnap with it:

* **every unpause** names the leaf's log (``tap-ctl unpause -c``; tapdisk-pause ``Unpause``):
  tapdisk closes the log at a pause and reopens it only when the unpause names it;
* **a snapshot** (``VDI._cbt_snapshot``, inside SM's pause): the leaf's log is renamed to the
  snapshot VDI's name and marked consistent, the log before it points to it as its child, the
  leaf gets a new empty log whose parent is the snapshot and whose child is the old log's
  child, consistent unless a tapdisk has it open, and the snapshot's log names the leaf as
  its child. livesnap makes the new log before the pause (``NEW_SUFFIX``) and does only the
  two renames inside it (``Rotation``); the header fields of the closed snapshot log are set
  after it;
* **a delete** of a VDI with a log (``VDI.delete``): the log's parent and child are linked to
  each other, its bitmap is ORed into its child's (``cbt-util coalesce``; the child's tapdisk
  paused around it when that log is open, i.e. not consistent) and the log is removed, so the
  changes it held now count for the next log. Hidden base copies have no logs: merging them
  changes no log;
* **a revert** (XAPI's ``VM.revert``: ``VDI.destroy`` of the VM's VDI, ``VDI.clone`` of the
  snapshot's; SM 3.2.12 has no ``vdi_revert``): the old leaf's log goes as a delete's does
  (above), the clone makes no log (``clone`` passes no ``cbtlog`` to ``_do_snapshot``), the
  snapshot's log is untouched: the reverted disk has CBT off. ``--keep-current`` is
  ``VM.snapshot`` first: ``keep``.

On LVHD the logs are LVs ``/dev/VG_XenStorage-<sr>/<uuid>.cbtlog`` (LVHDSR.py
``_create_cbt_log``: ``journaler.LV_SIZE``, 4 MiB, tagged ``cbtlog``; ``_rename``: lvrename;
``_delete_cbt_log``: lvremove; ``_activate_cbt_log``/``_cbt_op``: an inactive log is activated
around each use and deactivated after). livesnap's next log LV gets its ``cbtlog`` tag only
once it has the leaf's name (SM's scan makes a ``cbt_metadata`` VDI of every tagged LV it
cannot match, by the part of the name before the first dot). The leaf's log is active while a
tapdisk has it open, and an active LV keeps its device through a rename: inside the pause
only device paths are looked at, no LVM metadata is read.
"""
import contextlib
import logging
import os

from livesnap import faults
from livesnap.errors import DatapathError
from livesnap.datapaths import vhd_storage
from livesnap.tools import cbt_util, lvm

log = logging.getLogger(__name__)

SUFFIX = ".cbtlog"
NEW_SUFFIX = ".livesnap-new"       # the leaf's next log, made before the pause
TAG = "cbtlog"                     # SM: constants.CBTLOG_TAG, the LVs' tag
LV_SIZE = 4 << 20                  # SM: journaler.Journaler.LV_SIZE


def log_uuid(path):
    base = os.path.basename(path)
    return base[:-len(SUFFIX)] if base.endswith(SUFFIX) else None


def sibling(path, vdi_uuid):
    """The log of VDI ``vdi_uuid`` beside log ``path``; None for the null uuid."""
    if not vdi_uuid or vdi_uuid == cbt_util.NULL_UUID:
        return None
    return os.path.join(os.path.dirname(path), vdi_uuid + SUFFIX)


class _Files(object):
    """Logs as files beside the VDIs (FileSR)."""

    def exists(self, path):
        return os.path.exists(path)

    @contextlib.contextmanager
    def active(self, path):
        yield

    def make(self, path):
        return None                           # cbt-util create makes the file

    def rename(self, old, new):
        os.rename(old, new)
        vhd_storage.fsync_dir(new)

    def remove(self, path):
        os.unlink(path)
        vhd_storage.fsync_dir(path)

    def tag(self, path):
        return None

    def deactivate(self, path):
        return None


class _Lvs(object):
    """Logs as LVs of the SR's volume group (LVHDSR)."""

    def __init__(self, vg):
        self.vg = vg

    def _lv(self, path):
        return lvm.split_path(path)[1]

    def exists(self, path):
        return os.path.exists(path) or lvm.lv_exists(self.vg, self._lv(path))

    @contextlib.contextmanager
    def active(self, path):
        """Active for the block; deactivated after when it was not (SM's ``_cbt_op``)."""
        if os.path.exists(path):
            yield
            return
        lvm.activate(self.vg, self._lv(path))
        try:
            yield
        finally:
            lvm.activate(self.vg, self._lv(path), False)

    def make(self, path):
        if not os.path.exists(path):
            if lvm.lv_exists(self.vg, self._lv(path)):
                lvm.activate(self.vg, self._lv(path))
            else:
                lvm.lvcreate(self.vg, self._lv(path), LV_SIZE)

    def rename(self, old, new):
        lvm.lvrename(self.vg, self._lv(old), self._lv(new))

    def remove(self, path):
        try:
            lvm.lvremove(self.vg, self._lv(path))
        except lvm.LvNotFound:
            pass

    def tag(self, path):
        lvm.add_tag(self.vg, self._lv(path), TAG)

    def deactivate(self, path):
        if os.path.exists(path):
            lvm.activate(self.vg, self._lv(path), False)


def store(path):
    """Where the log ``path`` lives: an LV (``/dev/<vg>/<lv>``) or a file."""
    vg_lv = lvm.split_path(path)
    return _Lvs(vg_lv[0]) if vg_lv is not None else _Files()


class Rotation(object):
    """SM's ``_cbt_snapshot`` for one disk: ``leaf_log`` (the VM's VDI's) becomes
    ``snap_log`` (the new snapshot VDI's), the leaf continues in a new log. Each part checks
    what is done (steps are re-run after a crash)."""

    def __init__(self, leaf_log, snap_log):
        self.leaf_log, self.snap_log = leaf_log, snap_log
        self.new_log = leaf_log + NEW_SUFFIX
        self.store = store(leaf_log)

    def wanted(self):
        """The leaf has a log, or is in the middle of a rotation."""
        return self.store.exists(self.leaf_log) or self.store.exists(self.new_log)

    def done(self):
        return self.store.exists(self.snap_log) and not self.store.exists(self.new_log)

    def prepare(self, size, open_by_tapdisk):
        """Before the pause: the leaf's next log, empty, for a disk of ``size`` bytes, with
        the header SM gives it (parent: the snapshot; child: the old log's child; consistent
        unless a tapdisk will have it open); both logs active (an LV) for the renames."""
        if self.store.exists(self.snap_log):
            if self.store.exists(self.new_log):
                self.store.make(self.new_log)           # renamed before a crash: activate
            return
        self.store.make(self.leaf_log)                  # an inactive LV: activated
        child = cbt_util.get_child(self.leaf_log)
        self.store.make(self.new_log)
        cbt_util.create(self.new_log, size)
        cbt_util.set_(self.new_log, parent=log_uuid(self.snap_log), child=child,
                      consistent=not open_by_tapdisk)
        self.open_by_tapdisk = open_by_tapdisk

    def in_pause(self):
        """Inside the pause (tapdisk has closed the log): two renames."""
        if not os.path.exists(self.snap_log) and os.path.exists(self.new_log):
            self.store.rename(self.leaf_log, self.snap_log)
            faults.point("cbt", "renamed", 0)
        if os.path.exists(self.new_log) and not os.path.exists(self.leaf_log):
            self.store.rename(self.new_log, self.leaf_log)

    def abandon(self):
        """The snapshot failed before the renames: the new log goes."""
        if not self.store.exists(self.snap_log) and self.store.exists(self.leaf_log) and \
                self.store.exists(self.new_log):
            self.store.remove(self.new_log)

    def finish(self):
        """After the pause: the snapshot's log, closed now, consistent and followed by the
        leaf's; the log before it followed by it; the leaf's new log tagged (an LV)."""
        if not self.store.exists(self.snap_log):
            return
        with self.store.active(self.snap_log):
            cbt_util.set_(self.snap_log, child=log_uuid(self.leaf_log), consistent=True)
            parent = sibling(self.snap_log, cbt_util.get_parent(self.snap_log))
        if parent is not None and self.store.exists(parent):
            with self.store.active(parent):
                cbt_util.set_(parent, child=log_uuid(self.snap_log))
        self.store.tag(self.leaf_log)
        if not getattr(self, "open_by_tapdisk", True):
            # SM leaves a detached VDI's logs inactive (_create_cbt_log, _cbt_op)
            self.store.deactivate(self.leaf_log)
            self.store.deactivate(self.snap_log)


def finish_pending(leaf_log):
    """A leaf whose log was renamed to a snapshot's and whose new log is not in place yet (a
    command killed inside the pause): put the new one in place, so the unpause names it."""
    st = store(leaf_log)
    new = leaf_log + NEW_SUFFIX
    if not st.exists(leaf_log) and st.exists(new):
        st.make(new)
        st.rename(new, leaf_log)


def drop(path, pause_for):
    """SM's ``VDI.delete`` of the VDI whose log is ``path``: its bitmap ORed into its child's
    log (inside ``pause_for(child_log)``, a context manager: the pause of the tapdisk that has
    that log open, or nothing), parent and child linked, the log removed. The coalesce comes
    first, so that a re-run after a crash does it again rather than lose it (an OR twice is
    the same)."""
    st = store(path)
    if not st.exists(path):
        return
    with st.active(path):
        parent_uuid, child_uuid = cbt_util.get_parent(path), cbt_util.get_child(path)
        parent, child = sibling(path, parent_uuid), sibling(path, child_uuid)
        if child is not None and st.exists(child):
            with st.active(child):
                with pause_for(child):
                    cbt_util.coalesce(path, child)
                cbt_util.set_(child, parent=parent_uuid)
    if parent is not None and st.exists(parent):
        with st.active(parent):
            cbt_util.set_(parent, child=child_uuid)
    st.remove(path)
    log.info("CBT log %s merged into %s and removed", path, child or "(no child)")


def keep(leaf_log, kept_log):
    """A revert that keeps the current state (``--keep-current``), offline: what SM leaves
    after XAPI's ``VM.snapshot`` then ``VM.revert``. ``_cbt_snapshot`` renames the leaf's log
    to the kept VDI's, marks it consistent and makes its parent point to it; the leaf's new
    log (parent: the kept one, child: the old log's child) is then dropped by the revert's
    ``VDI.delete``, which gives the kept log that child back and removes it (its bitmap is
    empty, no tapdisk wrote to it). So: the log renamed, consistent, its parent's child set;
    header parent and child unchanged. Each part checks what is done."""
    st = store(leaf_log)
    if st.exists(leaf_log) and not st.exists(kept_log):
        st.rename(leaf_log, kept_log)
    if not st.exists(kept_log):
        return
    with st.active(kept_log):
        cbt_util.set_(kept_log, consistent=True)
        parent = sibling(kept_log, cbt_util.get_parent(kept_log))
    if parent is not None and st.exists(parent):
        with st.active(parent):
            cbt_util.set_(parent, child=log_uuid(kept_log))
    log.info("CBT log %s kept as %s", leaf_log, kept_log)


def refuse_open_child(child, running_leaf_log):
    """A child log that some tapdisk has open (not consistent) other than the running leaf's,
    which livesnap pauses: a coalesce into it could lose the bits tapdisk sets meanwhile."""
    if child != running_leaf_log and not cbt_util.get_consistent(child):
        raise DatapathError(reason="CBT log %s is in use by a tapdisk livesnap does not pause "
                                   "(not consistent): its parent's bitmap cannot be merged "
                                   "into it" % child)
