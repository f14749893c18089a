"""The offline datapath: a shut-off libvirt domain whose disks are qcow2 files.

Images are changed with qemu-img; the domain's persistent definition is rewritten through
libvirt when a disk's active image changes. Every step checks what is already done, so a
re-run after a crash finishes it.
"""
import logging
import os

from livesnap import faults, qcow2
from livesnap.datapaths import Datapath, bitmaps, lv_images, new_overlay, unlink
from livesnap.errors import BitmapsPresent, DatapathError, Error
from livesnap.tools import qemu_img

log = logging.getLogger(__name__)


class OfflineDatapath(Datapath):
    name = "offline"

    def __init__(self, domain):
        self.domain = domain
        # qcow2 on LVs: the chains' LVs made active for the command, put back at its end
        self.activation = lv_images.activation(domain)

    def prepare(self, tree):
        """Before the tree's images are read: every LV among them active."""
        if self.activation is not None:
            self.activation.need(n.path for n in tree.nodes.values())

    def close(self):
        """LV activation put back as it was: on a VG whose disk LV was inactive (a stopped
        domain on shared LVM), what the command activated or made goes inactive again."""
        if self.activation is None:
            return
        current = set()
        for d in self.domain.disks(inactive=True):
            path, seen = d.path, set()
            while path is not None and path not in seen and lv_images.is_lv(path) and \
                    os.path.exists(path):
                seen.add(path)
                path = lv_images.backing_of(path)
            current |= seen
        self.activation.end(current)

    def _sources(self):
        return {d.target: d.path for d in self.domain.disks(inactive=True)}

    def _backing(self, path):
        return qemu_img.backing_path(qemu_img.info(path), path)

    def _new_overlay(self, path, backing, backing_fmt, in_use):
        """Create (or re-create) an empty overlay unless the domain already uses it or it
        already holds writes over ``backing``: a new file of mode 0600, made by livesnap
        (``own_files.create``: never through a link planted at its name), then filled by
        qemu-img. True when the existing overlay is kept."""
        if path in in_use and os.path.exists(path):
            return True
        if holds_writes(path, backing):
            # QEMU switched to it while the domain ran, then the domain stopped with a
            # definition that still names ``backing`` (a libvirtd reload or restart during
            # the snapshot): the writes since the switch are only here
            log.warning("%s holds writes over %s although the definition of %s names %s: "
                        "kept as the disk's image", path, backing, self.domain.name, backing)
            return True
        # a leftover of a crashed attempt (nothing uses it yet); not ours: NotOurFile
        new_overlay(path, backing, backing_fmt)
        return False

    def do_snapshot(self, step):
        in_use = set(self._sources().values())
        for it in step["items"]:
            kept = self._new_overlay(it["leaf_path"], it["frozen_path"], it["frozen_fmt"],
                                     in_use)
            if not kept and it["leaf_path"] not in in_use and it["frozen_fmt"] == "qcow2":
                carry_bitmaps(it["frozen_path"], it["leaf_path"])
        self.domain.set_disk_sources({it["disk"]: (it["leaf_path"], it["fmt"])
                                      for it in step["items"]})

    def do_new_leaf(self, step):
        in_use = set(self._sources().values())
        self._new_overlay(step["leaf_path"], step["parent_path"], step["parent_fmt"], in_use)
        self.domain.set_disk_sources({step["disk"]: (step["leaf_path"], step["fmt"])})

    def abandon(self, step):
        in_use = set(self._sources().values())
        paths = [it["leaf_path"] for it in step.get("items", [])]
        if step["op"] == "new_leaf":
            paths.append(step["leaf_path"])
        backings = {it["leaf_path"]: it["frozen_path"] for it in step.get("items", [])}
        if step["op"] == "new_leaf":
            backings[step["leaf_path"]] = step["parent_path"]
        for p in paths:
            if p not in in_use and holds_writes(p, backings[p]):
                raise DatapathError(reason="%s holds writes over %s (a guest ran on it): not "
                                           "removed" % (p, backings[p]))
        for p in paths:
            if p not in in_use:
                unlink(p, made_here=True)

    def do_remove(self, step):
        unlink(step["path"])

    def do_commit(self, step):
        node, child = step["path"], step["child_path"]
        if os.path.exists(child) and self._backing(child) == node:
            self._keep_bitmaps(step, node, child, into=node)
            if lv_images.is_lv(node):
                lv_images.grow_for(node, child)
            qemu_img.commit(child, node)
        for g in step["grandchildren"]:
            if self._backing(g["path"]) != node:
                qemu_img.rebase(g["path"], node, step["fmt"], unsafe=True)
        if step["child_active"]:
            self.domain.set_disk_sources({step["disk"]: (node, step["fmt"])})
        unlink(child)

    def _keep_bitmaps(self, step, lower, upper, into):
        """The survivor of the merge gets the persistent dirty bitmaps of both images
        (``bitmaps.keep``); what cannot be kept right was refused before any change, and is
        refused here again before this step changes anything."""
        found = bitmaps.problems(step["op"], lower, upper, bitmaps.of(lower),
                                 bitmaps.of(upper), live=False)
        if found:
            raise BitmapsPresent(self.domain.name, found)
        bitmaps.keep(lower, upper, into)
        faults.point("bitmaps", "kept", 0)

    def do_pull(self, step):
        child = step["child_path"]
        if self._backing(child) != step["parent_path"]:
            if self._backing(child) == step["path"]:
                self._keep_bitmaps(step, step["path"], child, into=child)
            if lv_images.is_lv(child):
                lv_images.grow_for(child, step["path"])
            qemu_img.rebase(child, step["parent_path"], step["parent_fmt"])
        unlink(step["path"])


def carry_bitmaps(frozen, leaf):
    """The enabled persistent dirty bitmaps of the image a snapshot freezes go on, empty,
    in its new overlay (what libvirt does for a live external snapshot): the writes after
    the snapshot are then tracked too, and an incremental backup (libvirt checkpoints,
    virtnbdbackup) reads the changes since its checkpoint across the chain. A disabled
    bitmap, or one left in use by a QEMU that died (inconsistent), is not carried."""
    if qcow2.read_header(frozen) is not None:
        return                # a plain header: no bitmaps extension (qcow2.py), no process
    found = qemu_img.bitmaps(frozen)
    if not found:
        return
    have = {b.get("name") for b in qemu_img.bitmaps(leaf)}
    for b in found:
        flags = b.get("flags") or []
        if "auto" in flags and "in-use" not in flags and b.get("name") not in have:
            qemu_img.bitmap_add(leaf, b["name"], b.get("granularity"))


def holds_writes(path, backing):
    """``path`` is a qcow2 overlay over ``backing`` that holds data of its own: a guest
    wrote to it, so it is no leftover to remove or re-create (a fresh overlay holds none).
    An image that cannot be read is not one."""
    if not (os.path.isfile(path) or lv_images.is_lv(path) and os.path.exists(path)):
        return False
    try:
        entry = qemu_img.info(path, force_share=True)
        if entry.get("format") != "qcow2" or qemu_img.backing_path(entry, path) != backing:
            return False
        return bool(qemu_img.allocated(path))
    except Error as e:
        log.info("%s not read (%s): taken for a leftover", path, e)
        return False
