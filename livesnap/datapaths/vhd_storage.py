"""Where the VHD datapaths' images live: files in a directory, or logical volumes (LVHD).

A VHD on an LV (``/dev/<vg>/<lv>``, XAPI's LVHD: ``/dev/VG_XenStorage-<sr>/VHD-<vdi>``) is
on a block device of fixed size: its footer sits at the LV's end and its data cannot grow
past it. So, as XAPI's storage manager does (XEN-NOTES.md §1.3, §2.3):

* a leaf lives on an LV inflated to its full size (``lvm.full_size``: virtual size plus
  metadata for 2 TiB plus bitmaps), so the guest can write every block;
* a frozen image (a snapshot, an internal image) is deflated to its VHD's physical size and
  its LV set read-only;
* an image that a merge writes into is made writable and inflated by what the merge can add
  first, then deflated and set read-only again;
* names change with ``lvrename``, images go with ``lvremove``;
* an LV without a device (inactive: SM activates a VDI's chain only while it is attached)
  is activated before its image is read (``Activation``), and what livesnap activated or
  made for a VM whose disks were detached is deactivated again when the command ends;
* on an SR of SM's (``VG_XenStorage-<sr>``, ``VHD-<uuid>``), SM's refcounts of the LVs
  (``sm_refcount``) change as SM's own snapshot and coalesce change them: a frozen image
  takes the binary count of the leaf it was frozen from as its normal count (it is now a
  hidden image under that leaf: LVHDVDI._finishSnapshot), a removed image loses its counts
  (cleanup.LVHDVDI.delete), and a hidden image renamed over its only child, the leaf, gives
  the leaf its normal count less the leaf's binary count (cleanup.LVHDSR._updateNode). A
  leaf keeps its own counts through the renames: they are the VDI's attach, not the LV's.

On files, the same calls are renames, creations and unlinks with the directory synced, and
the writable/inflate steps are nothing. Every call is idempotent: steps are re-run after a
crash.
"""
import contextlib
import logging
import os

from livesnap import vhd
from livesnap.datapaths import free, own_files, sm_refcount, unlink
from livesnap import faults
from livesnap.errors import Error
from livesnap.tools import lvm
from livesnap.vhd.edit import set_physical_size

log = logging.getLogger(__name__)

MARGIN = 1 << 20
SM_VG_PREFIX = "VG_XenStorage-"            # SM: lvhdutil.VG_PREFIX


def fsync_dir(path):
    """The directory holding ``path`` fsynced (its entries durable)."""
    _fsync_directory(os.path.dirname(path) or ".")


def _fsync_directory(d):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def for_path(path):
    """The storage of an image path: an LV (``/dev/<vg>/<lv>``) or a file."""
    vg_lv = lvm.split_path(path)
    if vg_lv is not None:
        return LvmStorage(vg_lv[0])
    return FILES


class FileStorage(object):
    def exists(self, path):
        return os.path.exists(path)

    def rename(self, old, new, sync=True):
        """``sync=False``: the caller makes it durable (``sync``)."""
        os.rename(old, new)
        if sync:
            fsync_dir(new)

    def replace(self, old, new):
        """``old`` renamed over ``new`` (the image at ``new`` goes)."""
        if os.path.exists(old):
            self.rename(old, new)

    def make_leaf(self, path):
        """A frozen image about to become a leaf (a file: nothing to do)."""
        return None

    def counts_locked(self, *paths):
        """SM's locks of the images' LV refcounts (files: none)."""
        return contextlib.ExitStack()

    def frozen_from(self, frozen, leaf):
        """``frozen`` was renamed from ``leaf``, which now has it as parent (SM's refcounts,
        kept on LVs only)."""
        return None

    def create_child(self, path, parent, leaf=True, sync=True):
        """A new empty VHD at ``path`` whose parent is ``parent`` (a half-made one from a
        crash is replaced; a name that is not livesnap's file: NotOurFile). Mode 0600, as
        created (umask 077 around it: the VHD engine creates files 0644 as vhd-util does),
        whatever the mode of the leaf it replaces: never wider. ``sync=False``: the caller
        makes its name durable (``sync``)."""
        own_files.remove(path)
        old = os.umask(0o077)
        try:
            vhd.snapshot(path, parent)
        finally:
            os.umask(old)
        if sync:
            fsync_dir(path)

    def sync(self, paths):
        """The names of ``paths`` (renamed or created with ``sync=False``) durable: one fsync
        of each directory holding them."""
        for d in sorted({os.path.dirname(p) or "." for p in paths}):
            _fsync_directory(d)

    def freeze(self, path, readonly=True):
        """``path`` will not be written again (a frozen image)."""
        return None

    def set_readonly(self, path):
        return None

    def remove(self, path):
        unlink(path)

    def release(self, path):
        """Remove an image merged away while a tapdisk runs: a large one on a file system
        that discards on free is freed after the command (``datapaths.free``), so that the
        guest's flushes do not wait behind its discards."""
        free(path)

    @contextlib.contextmanager
    def writable(self, path, extra=0, leaf=False):
        """Around a change of ``path`` that may add ``extra`` bytes of data."""
        yield


FILES = FileStorage()


class LvmStorage(object):
    def __init__(self, vg):
        self.vg = vg

    def _lv(self, path):
        vg_lv = lvm.split_path(path)
        if vg_lv is None or vg_lv[0] != self.vg:
            raise ValueError("%s is not an LV of %s" % (path, self.vg))
        return vg_lv[1]

    def exists(self, path):
        return os.path.exists(path)

    def rename(self, old, new, sync=True):
        """The LV renamed; SM's refcounts stay with the names (the caller says what the
        rename means: ``frozen_from``, ``replace``)."""
        lvm.lvrename(self.vg, self._lv(old), self._lv(new))

    def replace(self, old, new):
        """``old``'s LV renamed to ``new``'s name, the LV at ``new`` removed first (nothing
        left to do when ``old`` is gone: renamed before a crash). ``old`` is a hidden image
        whose only child was the leaf ``new`` (a fold): SM's refcounts as its leaf-coalesce
        leaves them (cleanup.LVHDSR._updateNode): the leaf keeps its binary count and takes
        ``old``'s normal count less that (the leaf's attach counted ``old`` once); ``old``'s
        go. The counts change before the rename, so a re-run after a crash finds them done
        (``old``'s gone, the leaf's already what they become). All of it under SM's locks of
        both counts (SM's attach or detach of the leaf waits, or livesnap for it)."""
        key_old, key_new = self._refkey(old), self._refkey(new)
        if not os.path.exists(old):
            return
        with self._locked(key_old, key_new):
            self._lvremove(new)
            if key_old is not None and key_new is not None:
                count, _ = sm_refcount.check(*key_old)
                _, binary = sm_refcount.check(*key_new)
                sm_refcount.set_counts(key_new[0], key_new[1], max(count - binary, 0), binary)
            if key_old is not None:
                sm_refcount.reset(*key_old)
            faults.point("lvm", "replaced", 0)
            self.rename(old, new)

    def frozen_from(self, frozen, leaf):
        """``frozen`` was renamed from ``leaf``, which is now its child: as SM's snapshot
        (LVHDVDI._finishSnapshot), the base copy's normal count is the leaf's binary count
        (the leaf's attach counts each image under it); the leaf keeps its counts. Under
        SM's locks of both counts: an attach or detach of the leaf in flight is seen."""
        key_frozen, key_leaf = self._refkey(frozen), self._refkey(leaf)
        if key_frozen is None or key_leaf is None:
            return
        with self._locked(key_frozen, key_leaf):
            _, binary = sm_refcount.check(*key_leaf)
            sm_refcount.set_counts(key_frozen[0], key_frozen[1], binary, 0)

    def counts_locked(self, *paths):
        """SM's locks of these LVs' refcounts held, to be taken before a tapdisk pause whose
        changes need them (a wait for SM inside the pause would stall the guest)."""
        return self._locked(*[self._refkey(p) for p in paths])

    def _locked(self, *keys):
        """SM's per-object locks of these refcounts (None: not an LV SM counts)."""
        keys = [k for k in keys if k is not None]
        if not keys:
            return contextlib.ExitStack()
        return sm_refcount.locked(keys[0][0], [k[1] for k in keys])

    def _refkey(self, path):
        """(namespace, object) of SM's refcount of an LV of SM's SR, else None."""
        if not self.vg.startswith(SM_VG_PREFIX):
            return None
        lv = self._lv(path)
        if not lv.startswith("VHD-") or len(lv) <= len("VHD-"):
            return None
        return sm_refcount.namespace(self.vg[len(SM_VG_PREFIX):]), lv[len("VHD-"):]

    def make_leaf(self, path):
        """A frozen image about to become a leaf: writable, at a leaf's full size."""
        lvm.set_readonly(self.vg, self._lv(path), False)
        self._inflate(path, lvm.full_size(_virtual_size(path)))

    def create_child(self, path, parent, leaf=True, sync=True):
        """An LV for the new image, then the VHD on it, as SM's LVHDSR makes a snapshot's
        children (``_createSnap``): the VHD with its metadata preallocated for 2 TiB
        (``vhd-util snapshot -S`` ``lvhdutil.MSIZE_MB``: BAT and batmap for that size, so SM's
        fast resize works), on an LV of the leaf's full size (``calcSizeVHDLV``), or the
        smallest that holds that metadata (SM's ``thinpr``) otherwise, as it is deflated when
        frozen. An LV left by a crash is reused."""
        lv = self._lv(path)
        size = lvm.full_size(_virtual_size(parent)) if leaf else lvm.thin_size()
        if not os.path.exists(path):
            lvm.lvcreate(self.vg, lv, size)
        else:
            lvm.set_readonly(self.vg, lv, False)
            if lvm.lv_size(self.vg, lv) < size:
                lvm.lvresize(self.vg, lv, lvm.round_extent(size))
        vhd.snapshot(path, parent, max_size=max(lvm.MSIZE, _virtual_size(parent)))

    def freeze(self, path, readonly=True):
        """Deflate to the VHD's physical size (SM: after the rename to the base copy's
        name), then read-only unless told otherwise (the caller does it later)."""
        lv = self._lv(path)
        try:
            self._deflate(path)              # a leaf until now: writable
        except vhd.VhdIOError:
            lvm.set_readonly(self.vg, lv, False)   # re-run after a crash: made read-only
            self._deflate(path)
        if readonly:
            lvm.set_readonly(self.vg, lv, True)

    def set_readonly(self, path):
        lvm.set_readonly(self.vg, self._lv(path), True)

    def sync(self, paths):
        """LVM's metadata is written by each command: nothing left to make durable."""
        return None

    def remove(self, path):
        """The LV goes, and SM's refcounts of it, under SM's lock of them, then that lock's
        file (cleanup.LVHDVDI.delete)."""
        key = self._refkey(path)
        with self._locked(key):
            self._lvremove(path)
            if key is not None:
                sm_refcount.reset(*key)
        if key is not None:
            sm_refcount.forget_lock(*key)

    release = remove

    def _lvremove(self, path):
        try:
            lvm.lvremove(self.vg, self._lv(path))
        except lvm.LvNotFound:
            pass

    @contextlib.contextmanager
    def writable(self, path, extra=0, leaf=False):
        """Writable, inflated by ``extra`` (a leaf: to its full size); afterwards a non-leaf
        is deflated and read-only again, whatever happened."""
        lv = self._lv(path)
        if leaf:                             # a leaf is always writable
            self._inflate(path, lvm.full_size(_virtual_size(path)))
        else:
            lvm.set_readonly(self.vg, lv, False)
            if extra:
                self._inflate(path, _physical_size(path) + extra)
        faults.point("lvm", "inflated", 0)
        try:
            yield
        finally:
            if not leaf:
                self._deflate(path)
                lvm.set_readonly(self.vg, lv, True)

    # the footer moved by the VHD engine in this process, not by vhd-util runs: these run
    # inside a tapdisk pause

    def _deflate(self, path):
        lvm.deflate(self.vg, self._lv(path), path, vhd=_InProcessVhd)

    def _inflate(self, path, size):
        lvm.inflate(self.vg, self._lv(path), path, size, vhd=_InProcessVhd)

    # the engine's space preflight asks these of LVs (it weighs files itself)

    def available(self, directory):
        """(key, free bytes) where new images in ``directory`` take their space: the VG."""
        return ("vg:%s" % self.vg, lvm.vg_free(self.vg))

    def leaf_cost(self, path):
        """Space a new leaf beside ``path`` takes: an LV of the leaf's full size."""
        return lvm.full_size(_virtual_size(path))


def merge_extra(source):
    """What a merge of ``source``'s own blocks can add to its target: every allocated block
    with its bitmap, plus a margin for the metadata."""
    with vhd.open_image(source, chain=False) as img:
        n = len(img.allocated_blocks())
        return n * (img.block_size + 4096) + MARGIN


def _virtual_size(path):
    """From the footer alone (``path`` may be a leaf a tapdisk holds open: its BAT is not
    read)."""
    with vhd.open_header(path) as img:
        return img.virtual_size


def _physical_size(path):
    with vhd.open_image(path, chain=False) as img:
        return img.physical_size


class _InProcessVhd(object):
    """What ``lvm.inflate``/``deflate`` need of vhd-util, from the VHD engine in process."""
    virtual_size = staticmethod(_virtual_size)
    physical_size = staticmethod(_physical_size)
    set_physical_size = staticmethod(set_physical_size)


class Activation(object):
    """The LVs a command needs active, and their state to restore at its end.

    ``begin(leaf)`` walks a disk's chain from its leaf through the VHD parent locators,
    activating each LV that has no device; ``need(paths)`` does the same for the catalog's
    images. ``end()``: for a disk whose leaf LV was inactive at the start (a detached VDI),
    every LV of that VG livesnap activated or created in this command is deactivated; where
    the leaf was active, only what livesnap activated. LVs active at the start (a base copy
    another running VM shares, say) are never touched.

    On an SR of SM's (``VG_XenStorage-<sr>``, ``VHD-<uuid>``) SM's refcounts say instead what
    stays active, as SM's snapshot and coalesce leave it (LVActivator.deactivateAll: an LV
    whose counts are 0 is deactivated, a new snapshot VDI's too): every LV of the command's
    images (created, activated, or in the catalog's tree, so a face a killed command left
    active goes at recover) that is not ``held`` and has no count is deactivated, under SM's
    lock of its count, as SM's ``LVMCache.deactivate`` does it (an attach on the master in
    flight is waited for)."""

    def __init__(self, parent_of=None):
        """``parent_of(path)``: the parent image's path as the image names it (default: a
        VHD's parent locators; ``lv_images.backing_of`` for qcow2)."""
        self.was_active = set()
        self.activated = set()
        self.detached_vgs = set()
        self.known = set()                 # the catalog's images (need)
        self.parent_of = parent_of or _parent_lv

    def _ensure(self, path):
        vg_lv = lvm.split_path(path)
        if vg_lv is None:
            return False
        if os.path.exists(path):
            if path not in self.activated:
                self.was_active.add(path)
            return True
        try:
            lvm.activate(vg_lv[0], vg_lv[1])
        except lvm.LvNotFound:
            return False
        self.activated.add(path)
        return os.path.exists(path)

    def begin(self, leaf):
        vg_lv = lvm.split_path(leaf)
        if vg_lv is None:
            return
        if not os.path.exists(leaf):
            self.detached_vgs.add(vg_lv[0])
        path, seen = leaf, set()
        while path is not None and path not in seen and self._ensure(path):
            seen.add(path)
            path = self.parent_of(path)

    def need(self, paths):
        for p in paths:
            self.known.add(p)
            self._ensure(p)

    def end(self, current, held=()):
        """Deactivate as described above; ``current``: the images the VM's LVs hold now;
        ``held``: those an active leaf needs (the chains of the VM's leaves that were active
        before the command: a running tapdisk's, or one SM's attach or its user activated)."""
        mine = set(current) | self.activated
        sm = {p for p in mine | self.known if _sm_key(p) is not None}
        for path in sorted(mine - sm):
            vg_lv = lvm.split_path(path)
            if vg_lv is None or not os.path.exists(path) or path in self.was_active:
                continue
            if path in self.activated or vg_lv[0] in self.detached_vgs:
                lvm.activate(vg_lv[0], vg_lv[1], False)
        for path in sorted(sm - set(held)):
            _sm_settle(path)


def _sm_key(path):
    vg_lv = lvm.split_path(path)
    return None if vg_lv is None else LvmStorage(vg_lv[0])._refkey(path)


def _sm_settle(path):
    """An LV of SM's SR deactivated when SM counts nobody needing it (none left where SM
    leaves it locked or LVM refuses: SM's own deactivate leaves an open LV active too)."""
    if not os.path.exists(path):
        return
    key = _sm_key(path)
    try:
        with sm_refcount.locked(key[0], [key[1]]):
            if os.path.exists(path) and sm_refcount.check(*key) == (0, 0):
                lvm.activate(*(lvm.split_path(path) + (False,)))
    except Error as e:
        log.warning("%s left active: %s", path, e)


def _parent_lv(path):
    """The parent's path as the VHD's locators name it (not needing it to exist), or None."""
    try:
        with vhd.open_header(path) as img:
            if not img.is_differencing:
                return None
            for p in img.parent_candidates():
                if lvm.split_path(p) is not None:
                    return p
    except vhd.VhdError:
        return None
    return None
