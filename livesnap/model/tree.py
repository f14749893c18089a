"""The snapshot tree of one domain: image nodes per disk, snapshots naming frozen nodes.

A node is one image as the catalog knows it. States:

* ``active``   the image a disk of the domain writes to (a leaf);
* ``snapshot`` a frozen image holding a visible snapshot's point-in-time data;
* ``hidden``   a logically deleted snapshot image kept because two or more children need it;
* ``base``     a frozen image livesnap found under the disk when it first saw it (a template,
               a backing file made by someone else): read-only to livesnap, never merged into
               or deleted.

A snapshot is a name with a time and a description; its disks are the nodes whose
``snapshot`` field names it. A snapshot is ``hidden`` once deleted logically and disappears
when its last node is reclaimed.
"""
import copy

ACTIVE = "active"
SNAPSHOT = "snapshot"
HIDDEN = "hidden"
BASE = "base"
NODE_STATES = (ACTIVE, SNAPSHOT, HIDDEN, BASE)


class Node(object):
    __slots__ = ("id", "disk", "parent", "state", "snapshot", "path", "fmt", "alloc")

    def __init__(self, id, disk, parent, state, path, fmt="qcow2", snapshot=None, alloc=0):
        self.id = id
        self.disk = disk
        self.parent = parent
        self.state = state
        self.path = path
        self.fmt = fmt
        self.snapshot = snapshot
        self.alloc = alloc

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __repr__(self):
        return "Node(%s %s %s parent=%s snap=%s)" % (self.id, self.disk, self.state,
                                                     self.parent, self.snapshot)


class Snapshot(object):
    __slots__ = ("name", "created", "description", "state")

    def __init__(self, name, created, description="", state=SNAPSHOT):
        self.name = name
        self.created = created
        self.description = description
        self.state = state

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


class Tree(object):
    """Nodes by id, snapshots by name, and the active node of each disk."""

    def __init__(self, nodes=(), snapshots=(), active=None):
        self.nodes = {n.id: n for n in nodes}
        self.snapshots = {s.name: s for s in snapshots}
        self.active = dict(active or {})

    def copy(self):
        return copy.deepcopy(self)

    # -- queries -----------------------------------------------------------------------

    def children(self, node_id):
        return sorted(n.id for n in self.nodes.values() if n.parent == node_id)

    def chain(self, node_id):
        """The node and its ancestors, leaf first."""
        out = []
        while node_id is not None:
            out.append(node_id)
            node_id = self.nodes[node_id].parent
        return out

    def depth(self, node_id):
        return len(self.chain(node_id))

    def disks(self):
        return sorted(self.active)

    def snapshot_nodes(self, name):
        """{disk: node id} of a snapshot (its remaining nodes)."""
        return {n.disk: n.id for n in self.nodes.values() if n.snapshot == name}

    def visible_snapshots(self):
        return sorted((s for s in self.snapshots.values() if s.state == SNAPSHOT),
                      key=lambda s: (s.created, s.name))

    def owner(self, node_id):
        """The snapshot whose data ``node_id`` holds: its own, or (SM's layout: an unnamed
        base copy) that of its face, the snapshot leaf on it (the oldest when several)."""
        node = self.nodes[node_id]
        if node.snapshot is not None:
            return node.snapshot
        faces = [self.nodes[c].snapshot for c in self.children(node_id)
                 if self.nodes[c].state in (SNAPSHOT, HIDDEN) and self.nodes[c].snapshot
                 and self.nodes[c].snapshot in self.snapshots and not self.children(c)]
        if not faces:
            return None
        return min(faces, key=lambda s: (self.snapshots[s].created, s))

    def snapshot_parent(self, name, include_hidden=False):
        """The snapshot whose node is the nearest ancestor of this snapshot's nodes.

        Hidden snapshots are walked through (so the visible snapshots form a tree of their
        own) unless ``include_hidden``, or unless the snapshot is hidden itself.
        """
        nodes = self.snapshot_nodes(name)
        if not nodes:
            return None
        want_visible = self.snapshots[name].state == SNAPSHOT and not include_hidden
        node = self.nodes[nodes[sorted(nodes)[0]]].parent
        while node is not None:
            owner = self.owner(node)
            if owner is not None and owner != name and owner in self.snapshots and (
                    not want_visible or self.snapshots[owner].state == SNAPSHOT):
                return owner
            node = self.nodes[node].parent
        return None

    def current_snapshot(self):
        """The visible snapshot the active disks sit on, if any."""
        disks = self.disks()
        if not disks:
            return None
        node = self.nodes[self.active[disks[0]]].parent
        while node is not None:
            owner = self.owner(node)
            if owner is not None and self.snapshots.get(owner) and \
                    self.snapshots[owner].state == SNAPSHOT:
                return owner
            node = self.nodes[node].parent
        return None

    def reclaimable(self):
        """Hidden nodes down to fewer than two children (what a reclaim merges or deletes).
        Operations reclaim them at once; one is left only when a reclaim was deferred."""
        return sorted(n.id for n in self.nodes.values()
                      if n.state == HIDDEN and len(self.children(n.id)) < 2)

    def to_dict(self):
        return {"nodes": [self.nodes[k].to_dict() for k in sorted(self.nodes)],
                "snapshots": [self.snapshots[k].to_dict() for k in sorted(self.snapshots)],
                "active": dict(self.active)}

    @classmethod
    def from_dict(cls, d):
        return cls([Node(**n) for n in d["nodes"]], [Snapshot(**s) for s in d["snapshots"]],
                   d["active"])

    def validate(self):
        """Structural invariants; returns a list of problems (empty when sound)."""
        problems = []
        for n in self.nodes.values():
            if n.state not in NODE_STATES:
                problems.append("node %s has unknown state %r" % (n.id, n.state))
            if n.parent is not None and n.parent not in self.nodes:
                problems.append("node %s has unknown parent %s" % (n.id, n.parent))
            elif n.parent is not None and self.nodes[n.parent].disk != n.disk:
                problems.append("node %s and its parent are on different disks" % n.id)
            if (n.state == SNAPSHOT or (n.state == HIDDEN and n.snapshot is not None)) and \
                    n.snapshot not in self.snapshots:
                problems.append("node %s belongs to unknown snapshot %r" % (n.id, n.snapshot))
            if n.state == ACTIVE and self.active.get(n.disk) != n.id:
                problems.append("node %s is active but not disk %s's leaf" % (n.id, n.disk))
            if n.state == ACTIVE and self.children(n.id):
                problems.append("active node %s has children" % n.id)
        for disk, nid in self.active.items():
            if nid not in self.nodes or self.nodes[nid].state != ACTIVE:
                problems.append("disk %s's active node %s is missing" % (disk, nid))
        for n in self.nodes.values():
            seen = set()
            cur = n.id
            while cur is not None and cur in self.nodes:
                if cur in seen:
                    problems.append("cycle through node %s" % cur)
                    break
                seen.add(cur)
                cur = self.nodes[cur].parent
        for s in self.snapshots.values():
            if not self.snapshot_nodes(s.name):
                problems.append("snapshot %s has no nodes" % s.name)
        return problems
