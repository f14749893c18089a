"""Datapaths: what has a domain's images open and how steps are carried out on them.

A datapath executes one plan step per call (``run(step)``), idempotently: a step re-run
after a crash anywhere inside it finishes the step without harming what was done.
Steps that only change the catalog (``hide``, ``snapshot_state``, ``keep_leaf``) need
nothing from a datapath.
"""
import errno
import logging
import os

from livesnap.datapaths import own_files, trash
from livesnap.errors import NotOurFile

log = logging.getLogger(__name__)

CATALOG_ONLY = ("hide", "snapshot_state", "keep_leaf")


class Datapath(object):
    name = "abstract"
    # Does this datapath pause guest IO (so pause times are reported)?
    pauses = False

    def run(self, step):
        op = step["op"]
        fn = getattr(self, "do_" + op, None)
        if fn is None:
            if op in CATALOG_ONLY:
                return None
            raise NotImplementedError("the %s datapath cannot do %r" % (self.name, op))
        return fn(step)

    def abandon(self, step):
        """Undo a step that failed before it took effect (only steps that create files)."""
        return None

    def close(self):
        return None


TRUNCATE_STEP = trash.STEP


def discards_on_free(path):
    """Whether the file system holding ``path`` discards blocks as it frees them, in the
    journal commit that frees them (mounted with ``discard``; btrfs's ``discard=async``
    does it in the background). Read from /proc/self/mountinfo by device number; when that
    does not tell, True."""
    try:
        dev = os.stat(path).st_dev
        want = "%d:%d" % (os.major(dev), os.minor(dev))
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 6 and fields[2] == want:
                    sep = fields.index("-", 6)
                    options = fields[5].split(",") + fields[sep + 3].split(",")
                    return any(o in ("discard", "discard=sync") for o in options)
    except (OSError, ValueError, IndexError):
        pass
    return True


def unlink(path, made_here=False):
    """Remove an image file; a file already gone is fine (steps are re-run after crashes).

    On a file system mounted with ``discard``, a large file is first shrunk in 8 MiB steps,
    each synced: one unlink of a big image would discard it all in one journal commit, and
    the guest's flushes wait behind it (seen as a 150 ms stall for 256 MiB in
    bench/online.py). Elsewhere freeing blocks costs no such commit, and the file is simply
    unlinked. (The steps cost about what the discards cost, ~0.8 ms per MiB here; they are
    paid by livesnap instead of by the guest.)

    Only a file livesnap made is truncated or unlinked (``own_files``); whatever else is at
    the name (a link, a hard link, a device, another user's file) is left, with a warning.
    An LV (``/dev/<vg>/<lv>``: a qcow2 on LVM) is removed with lvremove (``lv_images``);
    ``made_here`` (a new image of a step taken back): only one with livesnap's tag, anything
    else at its name is left, with a warning.
    """
    from livesnap.datapaths import lv_images
    if lv_images.is_lv(path):
        try:
            lv_images.remove(path, wait=lv_images.PROBE_GRACE, made_here=made_here)
        except NotOurFile as e:
            log.warning("%s", e)
        return
    try:
        slow = _slow_to_free(path)
        if slow is None:
            return
        if slow:
            if trash.empty(path, TRUNCATE_STEP):
                log.info("removed %s", path)
        else:
            _unlink_now(path)
    except NotOurFile as e:
        log.warning("%s", e)


def _slow_to_free(path):
    """Whether freeing ``path`` would cost a discard in one journal commit (a file larger
    than two steps on a file system that discards on free); None when it is gone."""
    try:
        size = os.lstat(path).st_size
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENAMETOOLONG):
            return None                 # gone, or a name too long ever to have existed
        raise
    return size > 2 * TRUNCATE_STEP and discards_on_free(path)


def new_overlay(path, backing, backing_fmt):
    """A new empty qcow2 overlay at ``path`` over ``backing`` (a leftover of a crashed
    attempt at that name, not yet used, is replaced): a file of mode 0600 made by livesnap
    (``own_files.create``: never through a link planted at its name), or on an LV, a new LV
    (``lv_images.create``); then qemu-img writes the overlay."""
    from livesnap.datapaths import lv_images
    if lv_images.is_lv(path):
        lv_images.create(path, backing, backing_fmt)
        return
    own_files.remove(path)
    own_files.create(path)
    from livesnap.tools import qemu_img
    qemu_img.create(path, "qcow2", backing=backing, backing_fmt=backing_fmt)


def _unlink_now(path):
    if own_files.remove(path):
        log.info("removed %s", path)


def free(path):
    """Remove an image merged away on a running domain. A large one on a file system that
    discards on free is renamed aside and freed after the command, in small synced steps
    (``trash``): its wall time then holds neither the discard nor a guest stall behind it.
    Elsewhere it is unlinked at once. Only a file livesnap made (``unlink``). An LV goes
    with lvremove once QEMU has closed it (``lv_images.remove``)."""
    from livesnap.datapaths import lv_images
    if lv_images.is_lv(path):
        lv_images.remove(path, wait=lv_images.RELEASE_TIMEOUT)
        return
    try:
        slow = _slow_to_free(path)
        if slow:
            trash.put(path)
        elif slow is not None:
            _unlink_now(path)
    except NotOurFile as e:
        log.warning("%s", e)


class Namer(object):
    """Names for new images: unused by the tree, by this plan and on disk."""

    def __init__(self):
        self.handed_out = set()

    def free_path(self, tree, base, ext):
        """``base + ext``, or ``base-N + ext`` when that is taken."""
        known = {n.path for n in tree.nodes.values()} | self.handed_out
        path, n = base + ext, 1
        while path in known or os.path.lexists(path):
            n += 1
            path = "%s-%d%s" % (base, n, ext)
        self.handed_out.add(path)
        return path


class LibvirtNamer(Namer):
    """libvirt's naming convention: the frozen image keeps its name, the new active image
    is ``<dir>/<domain>-<disk>.<snapshot>.qcow2`` beside it (``-N`` added when taken)."""

    def __init__(self, domain_name):
        super(LibvirtNamer, self).__init__()
        self.domain_name = domain_name

    def __call__(self, tree, disk, purpose, name, keep=None):
        leaf = tree.nodes[tree.active[disk]]
        token = name if purpose == "snapshot" else "revert-" + name
        stem = "%s-%s.%s" % (self.domain_name, disk, token)
        from livesnap.datapaths import lv_images
        if lv_images.is_lv(leaf.path):
            stem = lv_images.lv_name(stem)          # an LV beside it, named as LVM allows
        base = os.path.join(os.path.dirname(leaf.path), stem)
        return {"frozen": leaf.path, "leaf": self.free_path(tree, base, ".qcow2"), "kept": None}
