"""Persistent dirty bitmaps across a merge: what incremental backups rely on (libvirt
checkpoints, oVirt, virtnbdbackup) kept right when two images become one.

A bitmap of one name may sit in several images of a chain (libvirt and livesnap add an
empty one to each new overlay): together they record the changes since the bitmap was made,
and a backup reads their union. A merge keeps that union in the image that survives it
(the lower image for a commit, the upper for a pull):

* live, in QEMU's chain: libvirt (>= 7) merges the bitmaps itself at the end of the block
  job (seen with libvirt 9.0 for active commit, commit of an intermediate image and pull);
* offline, with qemu-img: ``keep`` below, before the data moves.

Refused (``problems``), because no merge can make it right: a bitmap in the lower image
that the upper image lacks, in a live merge (the upper image's changes are in no bitmap,
and the merge would make the bitmap's chain look whole to libvirt without them; offline,
``keep`` marks them), and, offline, a bitmap left inconsistent by a QEMU that stopped.
"""
import logging

from livesnap import qcow2
from livesnap.tools import qemu_img

log = logging.getLogger(__name__)


def may_have(path):
    """False when livesnap's own header reader vouches for a plain header (no bitmaps
    extension, no process started); else ask qemu-img."""
    try:
        return qcow2.read_header(path) is None
    except OSError:
        return True


def of(path):
    """The image's persistent dirty bitmaps: [{"name", "granularity", "flags"}]."""
    return qemu_img.bitmaps(path) if may_have(path) else []


def enabled(bitmap):
    return "auto" in (bitmap.get("flags") or [])


def problems(op, lower, upper, lower_maps, upper_maps, live):
    """Why a merge (``op`` "commit" or "pull") of ``upper`` with its backing file ``lower``
    cannot keep their bitmaps right, given each image's bitmaps; [] when it can.
    ``upper_maps`` None: not known (the active image of a running domain, whose bitmaps
    QEMU holds and writes to the file only when it closes it; libvirt adds the recording
    bitmaps of the image below to each new overlay itself)."""
    out = []
    if live and upper_maps is not None:
        above = {b.get("name") for b in upper_maps}
        for b in lower_maps:
            if b.get("name") not in above:
                out.append("dirty bitmap %s in %s is missing from %s above it: the changes "
                           "made there are in no bitmap, and a live merge would make the "
                           "bitmap look whole without them" % (b.get("name"), lower, upper))
    if not live:
        for path, maps in ((lower, lower_maps), (upper, upper_maps)):
            for b in maps or []:
                if "in-use" in (b.get("flags") or []):
                    out.append("dirty bitmap %s in %s is inconsistent (left in use by a QEMU "
                               "that stopped)" % (b.get("name"), path))
    return out


def keep(lower, upper, into):
    """Before an offline merge of ``upper`` with its backing file ``lower``, give the image
    that survives (``into``) every persistent dirty bitmap of the other one, each the union
    of the two images' bitmaps of that name (``qemu-img bitmap --merge``; a missing bitmap is
    added in the same command, with the same granularity, disabled when the source is).

    Done before the data moves: the merge's own writes then mark the survivor's enabled
    bitmaps as well (``qemu-img commit`` marks every cluster of the upper image in the lower
    image's bitmaps, so a bitmap found only in the lower image covers all the upper image's
    changes; a pull marks what it copies). For a pull, an enabled bitmap found only in the
    lower image gets the upper image's clusters marked first (``mark_all``): the changes
    made there since the overlay was made, which no bitmap recorded. More is marked than
    changed, never less: a backup then copies a little more. A union made again changes
    nothing (re-run after a crash)."""
    other = upper if into == lower else lower
    found = of(other)
    if not found:
        return []
    have = {b.get("name") for b in of(into)}
    kept = []
    for b in found:
        name, gran = b.get("name"), b.get("granularity")
        if name not in have:
            if into == upper and enabled(b):
                mark_all(upper, name, gran)
            else:
                qemu_img.bitmap_merge(into, name, other, add=True, granularity=gran,
                                      disabled=not enabled(b))
                kept.append(name)
                continue
        qemu_img.bitmap_merge(into, name, other)
        kept.append(name)
    log.info("dirty bitmaps %s of %s merged into %s", ", ".join(kept), other, into)
    return kept


def mark_all(path, name, granularity):
    """Add to ``path`` the enabled bitmap ``name`` with every cluster the image holds itself
    marked (its changes over its backing file), in one command: the clusters are marked in a
    scratch image first (qemu-io zero writes, which its bitmap records)."""
    import os
    import shutil
    import tempfile
    from livesnap.tools import qemu_io
    size = qemu_img.info(path).get("virtual-size")
    tmp = tempfile.mkdtemp(prefix="livesnap-bitmap-")
    try:
        scratch = os.path.join(tmp, "marks.qcow2")
        qemu_img.create(scratch, "qcow2", size=size)
        qemu_img.bitmap_add(scratch, "marks", granularity)
        qemu_io.write_zeroes(scratch, qemu_img.allocated(path))
        qemu_img.bitmap_merge(path, name, scratch, source_name="marks", add=True,
                              granularity=granularity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
