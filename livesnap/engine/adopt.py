"""Adoption: the tree of a domain livesnap sees for the first time, from its disks' images
and, on libvirt, the external snapshots made with virsh."""
import datetime
import logging
import os
import re

from livesnap import formats
from livesnap.errors import BadImage, ChainTooDeep
from livesnap.model import planner as P
from livesnap.model.tree import ACTIVE, BASE, SNAPSHOT, Node, Snapshot, Tree

log = logging.getLogger(__name__)


def _mtime_iso(path):
    return datetime.datetime.fromtimestamp(os.stat(path).st_mtime,
                                           datetime.timezone.utc).isoformat()


def _adopted_name(kind, disk, path, taken):
    stem = re.sub(r"[^A-Za-z0-9._+@-]", "-", os.path.basename(path)).strip(".-") or "image"
    name = ("%s-%s-%s" % (kind, disk, stem))[:90]
    n, out = 1, name
    while out in taken:
        n += 1
        out = "%s-%d" % (name, n)
    return out


def adopt(domain, max_depth, check_storage, snaps=None, open_leaves=False):
    """The tree of a domain livesnap has not seen.

    Each snapshottable disk's image is the active node. External disk-only snapshots
    made with virsh are adopted: a snapshot's node is the image its <domain> names (its
    point-in-time data). Images below every snapshot are base nodes; a leaf that is
    neither active nor a snapshot's image (an abandoned branch) is kept as a visible
    snapshot ``orphan-<disk>-<file>`` so that nothing is lost without the user saying so.

    ``snaps``: libvirt's snapshots to adopt, already checked (``follow`` passes them);
    None: all of libvirt's, refused unless each is external and disk-only.
    """
    if snaps is not None:
        pass
    elif domain.kind != "libvirt":
        snaps = []
    else:
        from livesnap.platforms import libvirt_snapshots
        snaps = libvirt_snapshots.list_snapshots(domain)
        libvirt_snapshots.check_adoptable(domain, snaps)
    nodes, active, records = [], {}, {}
    for s in snaps:
        records[s.name] = Snapshot(s.name, s.created, s.description)
    for disk in domain.disks():
        if not domain.snapshottable(disk):
            log.info("disk %s (%s, %s) is not an image livesnap manages: left alone",
                     disk.target, disk.path, disk.fmt)
            continue
        t = disk.target
        owner = {os.path.abspath(s.images[t]): s.name for s in snaps
                 if t in s.images and s.disks.get(t, ("external",))[0] == "external"}
        # overlays named by libvirt's metadata may be gone (merged, or discarded by a
        # revert); the images holding data must all be there
        overlays = [os.path.abspath(s.disks[t][1]) for s in snaps
                    if s.disks.get(t, (0, None))[1]]
        roots = [disk.path] + sorted(owner) + sorted(p for p in overlays if os.path.exists(p))
        images = {}                     # path -> (info entry, parent path)
        for root in roots:
            if root in images:
                continue
            if not os.path.exists(root):
                raise BadImage(root, "image of disk %s is missing" % t)
            # a leaf a tapdisk holds open: its header only (the BAT moves under a reader)
            chain = formats.chain(root, disk.fmt, open_leaf=open_leaves and root == disk.path)
            if len(chain) > max_depth:
                raise ChainTooDeep(root, len(chain), max_depth)
            for entry in chain:
                images.setdefault(entry.path, (entry, entry.backing))
        ids = {p: "%s-%s" % (t, P.new_node_id()[:12]) for p in images}
        children = {}
        for p, (_, parent) in images.items():
            children.setdefault(parent, []).append(p)

        def under_snapshot(p):
            parent = images[p][1]
            while parent is not None:
                if parent in owner:
                    return True
                parent = images[parent][1]
            return False

        for p in sorted(images):
            entry, parent = images[p]
            check_storage(p)
            snap = None
            if p == os.path.abspath(disk.path):
                state = ACTIVE
            elif p in owner:
                state, snap = SNAPSHOT, owner[p]
            elif children.get(p) and not under_snapshot(p):
                state = BASE
            else:
                state = SNAPSHOT
                snap = _adopted_name("orphan" if not children.get(p) else "adopted", t, p,
                                     records)
                records[snap] = Snapshot(snap, _mtime_iso(p),
                                         "adopted by livesnap: %s" % p)
            nodes.append(Node(ids[p], t, ids[parent] if parent else None, state, p,
                              entry.fmt, snapshot=snap, alloc=entry.alloc))
        active[t] = ids[os.path.abspath(disk.path)]
    used = {n.snapshot for n in nodes if n.snapshot}
    return Tree(nodes, [r for r in records.values() if r.name in used], active)
