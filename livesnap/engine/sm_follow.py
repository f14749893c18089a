"""The catalog following what XAPI's storage manager (SM) did to a VM's images on its own
(SM's layout, a XAPI host): a snapshot's VDI deleted with ``xe vdi-destroy``,
``xe snapshot-uninstall`` or XenCenter (SM's ``vdi_delete`` unlinks or lvremoves its image
and forgets its record), and a merge SM's garbage collector made (``cleanup.py``: a
leaf-coalesce renames the base copy over the leaf; a coalesce relinks the children of the
image it merged away). livesnap never acts on a catalog that says otherwise: the images are
re-read under SM's SR lock (``domain.chain_lock``), and the tree takes what is found:

* a snapshot's face (its VDI, a leaf) whose image is gone and whose VDI record XAPI no
  longer has was deleted by SM: its node goes, and a snapshot left with no node is
  forgotten; with its image still there but hidden (LVHD's ``lvremove`` failed) the node is
  marked hidden, and the engine's reclaim removes the image. Its base copy, down to one child, is then reclaimed by livesnap's own merge
  (the engine's ``reclaim``: the fold), not left to SM's GC;
* an image gone whose every child now names the image's parent as its VHD parent was merged
  away by SM's GC: its node goes and its children hang from its parent.

Anything else missing stays missing: the engine's validation names it.

``reclaim_followed``: what ``recover`` does with it when no operation is open.
``merge_guard``: around the steps of a plan that merge, the domain's guard (XAPI: SM's GC
held off the VM's SRs, platforms/sm_gc.py), so that SM's GC does not merge the same images.
"""
import contextlib
import logging
import os

from livesnap.model.tree import HIDDEN, SNAPSHOT

log = logging.getLogger(__name__)


def _exists(path):
    return os.path.exists(path)


def _parent(path):
    from livesnap.datapaths.fold_resume import parent_or_none
    return parent_or_none(path)


def deleted_by_sm(domain, tree):
    """(gone, left) face nodes (snapshot leaves) SM deleted, their VDI record gone: ``gone``
    with their image, ``left`` with their image still there but hidden (``LVHDVDI.delete``
    hides the VHD before its ``lvremove``, which may fail: a hidden leaf for the GC). A
    visible image whose record is gone (``xe vdi-forget``) is not a delete."""
    from livesnap import vhd
    from livesnap.platforms.xapi import image_uuid
    gone, left = [], []
    for n in sorted(tree.nodes.values(), key=lambda n: n.path):
        # (a hidden one: a face whose image SM left, marked by an earlier follow)
        if n.state not in (SNAPSHOT, HIDDEN) or n.snapshot is None or tree.children(n.id):
            continue
        vdi_uuid = image_uuid(n.path)
        if vdi_uuid is None or domain.vdi_exists(vdi_uuid):
            continue
        if not _exists(n.path):
            gone.append(n.id)
            continue
        if n.state == HIDDEN:
            continue
        try:
            if vhd.query(n.path).hidden:
                left.append(n.id)
        except vhd.VhdError:
            pass                            # the engine's validation names it
    return gone, left


def merged_by_sm(tree):
    """The nodes SM's GC merged away: image gone, every child present and hanging from the
    node's parent (one pass; the caller repeats until none is left)."""
    out = []
    for n in sorted(tree.nodes.values(), key=lambda n: n.path):
        kids = tree.children(n.id)
        if _exists(n.path) or not kids:
            continue
        want = tree.nodes[n.parent].path if n.parent is not None else None
        if all(_exists(tree.nodes[k].path) and _parent(tree.nodes[k].path) == want
               for k in kids):
            out.append(n.id)
    return out


def follow(domain, tree):
    """(tree, changes): a copy of ``tree`` with what SM did taken in, and
    ``{"deleted": [snapshot names forgotten], "faces_deleted": [image paths],
    "merged": [image paths]}``; changes is None when SM did nothing. The images are read
    under SM's SR lock of the VM's SRs."""
    lock = getattr(domain, "chain_lock", None)
    if lock is None or getattr(domain, "vdi_exists", None) is None:
        return tree, None
    work = tree.copy()
    faces, merged, deleted = [], [], []
    with lock():
        while True:
            todo, left = deleted_by_sm(domain, work)
            for nid in left:
                # its image is removed by the engine's reclaim (a hidden snapshot node)
                n = work.nodes[nid]
                n.state = HIDDEN
                faces.append(n.path)
                log.info("%s: snapshot %s's VDI %s (disk %s) was deleted through XAPI/SM, "
                         "its image left hidden", domain.name, n.snapshot, n.path, n.disk)
                if all(work.nodes[i].state == HIDDEN
                       for i in work.snapshot_nodes(n.snapshot).values()):
                    work.snapshots[n.snapshot].state = HIDDEN
                    deleted.append(n.snapshot)
            for nid in todo:
                n = work.nodes.pop(nid)
                faces.append(n.path)
                log.info("%s: snapshot %s's image %s (disk %s) was deleted through XAPI/SM",
                         domain.name, n.snapshot, n.path, n.disk)
                if not work.snapshot_nodes(n.snapshot):
                    del work.snapshots[n.snapshot]
                    deleted.append(n.snapshot)
            merged_now = merged_by_sm(work)
            for nid in merged_now:
                n = work.nodes.pop(nid)
                for k in work.children(nid):
                    work.nodes[k].parent = n.parent
                merged.append(n.path)
                log.info("%s: image %s was merged away by SM's garbage collector",
                         domain.name, n.path)
            if not todo and not left and not merged_now:
                break
        # a hidden snapshot (logically deleted) whose nodes all went with SM's merges
        for name in sorted(work.snapshots):
            if work.snapshots[name].state == HIDDEN and not work.snapshot_nodes(name):
                del work.snapshots[name]
                if name not in deleted:
                    deleted.append(name)
    if not faces and not merged:
        return tree, None
    return work, {"deleted": sorted(set(deleted)), "faces_deleted": faces, "merged": merged}


def merge_guard(domain, steps):
    """Around ``steps`` that merge (commit, pull, fold): the domain's ``merge_guard`` (XAPI:
    SM's GC held off the VM's SRs, platforms/sm_gc.py); else nothing."""
    guard = getattr(domain, "merge_guard", None)
    if guard is None or not any(s["op"] in ("commit", "pull", "fold") for s in steps):
        return contextlib.ExitStack()
    return guard()


def reclaim_followed(engine, s, datapath):
    """``recover`` with no open operation (XAPI): when SM deleted snapshot VDIs or merged
    images since livesnap last looked, the catalog follows and what is left to merge is
    merged (the engine's reclaim, validated first); None when SM did nothing."""
    tree = engine.load(s, validate=False, datapath=datapath)
    if not s.followed or "faces_deleted" not in s.followed:
        return None
    engine._validate(s.domain, tree, datapath)
    plan = engine._planner(s, datapath, engine._users(s, tree)).reclaim(tree)
    return engine._reclaim(s, datapath, plan, False)


def in_session(engine, session, tree):
    """XAPI (SM's layout): snapshot VDIs SM deleted (xe, XenCenter) and merges its GC
    made, taken into the catalog (``follow``; ``session.followed``), saved when the session
    holds the lock; XAPI's records are then brought in step with it (the VM snapshot record
    of a snapshot SM deleted is destroyed: ``xe vdi-destroy`` leaves it behind)."""
    if getattr(session.domain, "vdi_exists", None) is None or \
            session.catalog.unfinished() is not None:
        return tree
    followed, changes = follow(session.domain, tree)
    if changes is None:
        return tree
    session.followed = changes
    if not session.locked or session.dry_run:
        return followed
    log.info("%s changed by SM: snapshots deleted %s, images merged %s",
             session.domain.name, changes["deleted"] or "none", changes["merged"] or "none")
    session.catalog.save_tree(followed)
    tree = session.catalog.load_tree()
    engine._sync_metadata(session, tree)
    return tree
