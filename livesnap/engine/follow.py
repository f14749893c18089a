"""Following what was done outside livesnap with libvirt's own tools after livesnap's first
use: external disk-only snapshots made with ``virsh snapshot-create-as --disk-only`` (or
virt-manager) are adopted, snapshots ``virsh snapshot-delete`` merged away (blockcommit, the
overlay removed) are recorded as gone. The catalog is re-read from libvirt's metadata and the
images, with the same checks as the first adoption (``adopt``), and what it had that the new
reading does not explain is refused with a reason instead of being guessed at.

``reconcile`` is pure with respect to the catalog (it returns the new tree); the engine
saves it (when it holds the domain's lock) or ``livesnap check --repair`` does.
"""
import logging
import os

from livesnap.engine import adopt, users
from livesnap.errors import BadImage, Error, UsageError
from livesnap.model.tree import ACTIVE, BASE, HIDDEN, SNAPSHOT, Tree

log = logging.getLogger(__name__)


def evidence(domain, tree, known):
    """What libvirt's metadata says was done with virsh since livesnap last wrote it:
    libvirt's snapshots livesnap never had, and the names of visible snapshots libvirt no
    longer has. Empty lists when nothing (or ``domain`` is not a libvirt domain).
    ``known``: a function giving the names livesnap has had (called only when libvirt
    has a name the tree does not)."""
    if domain.kind != "libvirt":
        return [], []
    from livesnap.platforms import libvirt_snapshots
    names = libvirt_snapshots.list_names(domain)
    new = [n for n in names if n not in tree.snapshots]
    if new:
        new = set(new) - set(known())
        new = [s for s in libvirt_snapshots.list_snapshots(domain) if s.name in new] \
            if new else []
    gone = sorted(s.name for s in tree.visible_snapshots() if s.name not in names)
    return new, gone


def refuse_unmanageable(domain, snaps):
    """A snapshot made outside livesnap that livesnap cannot manage (memory state, internal)
    is refused by name."""
    _usable_snapshots(domain, snaps, set())


def _internal_names(domain):
    """Names of the internal snapshots inside the images of the domain's disks' chains."""
    from livesnap import formats
    from livesnap.tools import qemu_img
    out = set()
    for disk in domain.disks():
        if not domain.snapshottable(disk) or disk.fmt != "qcow2":
            continue
        for entry in formats.chain(disk.path, disk.fmt):
            if entry.fmt == "qcow2":
                info = qemu_img.info(entry.path, force_share=True)
                out.update(s.get("name") for s in info.get("snapshots") or [])
    return out


def _usable_snapshots(domain, snaps, known):
    """libvirt's snapshots a re-reading adopts: livesnap's own, and external disk-only ones
    made since. One livesnap cannot manage (a memory state, an internal snapshot inside an
    image) is refused by name; a definition that names no image (added by hand, metadata
    only) is left alone as before."""
    out = []
    internal = None
    for s in snaps:
        if s.name in known:
            out.append(s)
            continue
        if s.memory not in (None, "no"):
            raise UsageError(reason="snapshot '%s' of '%s' was made outside livesnap with a "
                                    "memory state (%s); livesnap manages disk-only external "
                                    "snapshots: delete it with virsh (virsh snapshot-delete "
                                    "%s %s) before using livesnap on this domain"
                             % (s.name, domain.name, s.memory, domain.name, s.name))
        kinds = {kind for kind, _ in s.disks.values()}
        if "external" in kinds:
            out.append(s)
            continue
        if internal is None:
            internal = _internal_names(domain)
        if s.name in internal:
            raise UsageError(reason="snapshot '%s' of '%s' was made outside livesnap as an "
                                    "internal snapshot (inside the qcow2 image); livesnap "
                                    "manages external snapshots only: delete it with virsh "
                                    "(virsh snapshot-delete %s %s) before using livesnap on "
                                    "this domain" % (s.name, domain.name, domain.name, s.name))
    return out


def reconcile(engine, session, tree):
    """The catalog's tree ``tree`` brought in step with libvirt's metadata and the images:
    ``(new tree, {"adopted": [names], "gone": [names]})``. Raises (``BadImage``,
    ``UsageError``) with the reason when the images and metadata do not explain the
    catalog: an image of the catalog that still exists but is in no chain of the domain, a
    hidden or base image gone, a merged image whose children were not moved onto its
    parent, an internal or memory snapshot."""
    domain = session.domain
    snaps = []
    if domain.kind == "libvirt":
        from livesnap.platforms import libvirt_snapshots
        snaps = _usable_snapshots(domain, libvirt_snapshots.list_snapshots(domain),
                                  session.catalog.known_names())
    fresh = adopt.adopt(domain, engine.max_depth, engine._check_storage, snaps=snaps)
    defined = {s.name for s in snaps}
    old = {n.path: n for n in tree.nodes.values()}
    new = {n.path: n for n in fresh.nodes.values()}

    for path, n in sorted(old.items()):
        if path in new:
            if new[path].disk != n.disk:
                raise BadImage(path, "the catalog has it on disk %s, the domain now on disk "
                                     "%s" % (n.disk, new[path].disk))
            live = [fresh.nodes[i].path for i in fresh.chain(fresh.active[n.disk])]
            if n.state == ACTIVE and path not in live:
                # a snapshot taken on it keeps it below the disk's new image
                raise BadImage(path, "the catalog has it as disk %s's active image, but the "
                                     "disk now uses %s, whose chain does not hold it; the "
                                     "chains do not match a snapshot taken on it"
                               % (n.disk, live[0]))
            continue
        where = "%s of disk %s%s" % (n.state, n.disk,
                                     " (snapshot %s)" % n.snapshot if n.snapshot else "")
        if os.path.exists(path) and not _left_by_libvirt(path):
            raise BadImage(path, "the catalog has it as the %s but it is in no chain of '%s' "
                                 "nor named by libvirt's snapshots; livesnap cannot tell what "
                                 "became of it" % (where, domain.name))
        if n.state in (HIDDEN, BASE):
            raise BadImage(path, "the catalog's %s is gone; libvirt never knew it (it holds "
                                 "data other images read), so it was not merged by libvirt"
                           % where)
        # merged (libvirt's blockcommit) into the nearest image below it that is still
        # there (several merges may have been done before livesnap looked again)
        target = n.parent
        while target is not None and tree.nodes[target].path not in new:
            target = tree.nodes[target].parent
        target = tree.nodes[target].path if target is not None else None
        children = [tree.nodes[c].path for c in tree.children(n.id)]
        if children or n.state == ACTIVE:
            if target is None:
                raise BadImage(path, "the catalog's %s is gone and every image below it with "
                                     "it; its data is nowhere livesnap can see" % where)
            for c in children:
                moved = new.get(c)
                if moved is None and (not os.path.exists(c) or _left_by_libvirt(c)):
                    continue                # merged too: checked on its own
                if moved is None or moved.parent is None or \
                        fresh.nodes[moved.parent].path != target:
                    raise BadImage(path, "the catalog's %s is gone but %s does not read %s "
                                         "now; the chain does not match a merge"
                                   % (where, c, target))
            live = [fresh.nodes[i].path for i in fresh.chain(fresh.active[n.disk])]
            if n.state == ACTIVE and target not in live:
                raise BadImage(path, "the catalog's %s is gone and disk %s now uses %s, whose "
                                     "chain does not hold %s it was merged into; the chain "
                                     "does not match a merge" % (where, n.disk, live[0],
                                                                 target))
        elif n.snapshot in defined:
            raise BadImage(path, "image of snapshot %s is missing while libvirt still has "
                                 "the snapshot" % n.snapshot)
        # else: a leaf snapshot deleted (with its image) outside livesnap

    # the new reading, with the catalog's ids, hidden and base nodes and its names where
    # libvirt's metadata has none (adopt invents "adopted-"/"orphan-" names for those)
    ids = {}
    for path, fn in new.items():
        on = old.get(path)
        ids[fn.id] = on.id if on is not None else fn.id
    nodes, records = [], {}
    for path, fn in sorted(new.items()):
        on = old.get(path)
        state, snap = fn.state, fn.snapshot
        if on is not None and state != ACTIVE:
            if on.state == HIDDEN or on.state == BASE and snap not in defined:
                state, snap = on.state, on.snapshot
            elif on.state == SNAPSHOT and snap not in defined:
                state, snap = SNAPSHOT, on.snapshot
        elif on is not None and on.state == HIDDEN:
            raise BadImage(path, "disk %s now writes the catalog's hidden image (which other "
                                 "images read)" % fn.disk)
        fn.id, fn.parent = ids[fn.id], ids[fn.parent] if fn.parent else None
        fn.state, fn.snapshot = state, snap
        nodes.append(fn)
        if snap is not None and snap not in records:
            records[snap] = tree.snapshots.get(snap) or fresh.snapshots[snap]
    active = {d: ids[nid] for d, nid in fresh.active.items()}
    out = Tree(nodes, list(records.values()), active)
    problems = out.validate()
    if problems:
        raise BadImage(engine.state_dir, "the catalog re-read from libvirt's metadata and the "
                                         "images is inconsistent: %s" % problems[0])
    users.refuse_shared(domain, out)
    before = {s.name for s in tree.snapshots.values()}
    after = {s.name for s in out.snapshots.values()}
    return out, {"adopted": sorted(after - before), "gone": sorted(before - after)}


def _left_by_libvirt(path):
    """An image libvirt may have merged away yet left in place: a qcow2 on an LV (libvirt's
    snapshot-delete and blockcommit remove files, never block devices). The merge is then
    checked as for a file gone; the LV itself is left to the user (``check`` names it):
    whether it holds anything the merge did not take cannot be told from here."""
    from livesnap.datapaths import lv_images
    return lv_images.is_lv(path)


def same(a, b):
    """Two trees say the same (ids aside from nodes' allocation)."""
    def key(t):
        return (sorted((n.id, n.disk, n.parent, n.state, n.path, n.fmt, n.snapshot)
                       for n in t.nodes.values()),
                sorted((s.name, s.state) for s in t.snapshots.values()), sorted(t.active.items()))
    return key(a) == key(b)


def in_session(engine, session, tree, strict, image_problems):
    """The catalog's tree, or, when libvirt's metadata shows snapshots made or deleted
    with virsh since livesnap last wrote it and the images changed with them, the tree
    re-read from both (``reconcile``): saved when the session holds the lock. What cannot
    be followed raises when ``strict``, else is kept in ``session.follow_error``.
    ``image_problems``: engine.check's (check imports this module)."""
    if session.domain.kind != "libvirt" or session.catalog.unfinished() is not None:
        return tree
    try:
        new, gone = evidence(session.domain, tree, session.catalog.known_names)
        if not new and not gone:
            return tree
        if not any(True for _ in image_problems(session.domain, tree)):
            if new:             # an internal or memory snapshot is refused even so
                refuse_unmanageable(session.domain, new)
            return tree
        followed, changes = reconcile(engine, session, tree)
    except Error as e:
        if strict:
            raise
        session.follow_error = str(e)
        return tree
    if same(tree, followed):
        return tree
    session.followed = changes
    if not session.locked or session.dry_run:
        return followed                 # followed in memory: a dry run changes nothing
    log.info("%s changed outside livesnap: adopted %s, gone %s", session.domain.name,
             changes["adopted"] or "nothing", changes["gone"] or "nothing")
    session.catalog.save_tree(followed)
    engine._sync_metadata(session, followed)
    return session.catalog.load_tree()
