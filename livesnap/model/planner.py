"""Turn create / delete / revert into a plan of abstract steps, and apply steps to a tree.

A plan is a list of steps; a step is a plain dict (JSON-serialisable, it goes into the
journal) with an ``op`` and every fact a datapath needs to carry it out without looking at
the catalog: node ids, paths, formats. ``apply(tree, step)`` is the step's effect on the
tree; the engine persists the tree after each step it has executed.

Steps:

``snapshot``         freeze each disk's active leaf as the named snapshot's node and put a new
                     empty active leaf on top (all disks at one instant).
``remove``           delete a node that has no children.
``commit``           merge a node N with its only child C by copying C's data into N's image;
                     C then lives in N's image, C's children are re-pointed to it, C's old
                     image is deleted.
``pull``             merge N with its only child C by copying N's data into C's image; C's
                     parent becomes N's parent; N's image is deleted.
``hide``             mark a node logically deleted (it keeps two or more children).
``snapshot_state``   a snapshot becomes ``hidden`` (logically deleted), or is forgotten.
``new_leaf``         (revert) a new empty active leaf on a snapshot's node.
``keep_leaf``        (revert --keep-current) the old active leaf becomes a snapshot's node
                     (renamed to ``kept_path`` where the datapath keeps leaves at fixed paths).
``internal_snapshot`` freeze one disk's active leaf as an unnamed hidden node, with a new empty
                     active leaf on top: on tapdisk, data may be copied only between read-only
                     images, so a merge that involves the active leaf first moves its data
                     into a frozen image this way (a pause of milliseconds).

Images with other users: ``users`` ({image path: [user, ...]}, found by the caller) names the
images something outside the tree reads (another domain's disk, an image backing onto
them). Such an image is never written or deleted: a node whose removal or merge would touch
one is hidden instead (kept, deleted logically) and is not reclaimed while the user is
there; a revert that would delete such an active leaf is refused.

SM's layout (``faces=True``, a XAPI host): every visible image is a leaf and every interior
image a hidden base copy, as XAPI's storage manager lays out its snapshots. A snapshot then
freezes the leaf as an unnamed hidden node (the base copy) and puts two empty children on it:
the new active leaf and the snapshot's own node, its *face* (the snapshot's VDI, a leaf that
reads what the base reads). Deleting a snapshot removes its face (a leaf: no child); its base,
down to one child, is then merged at once: with a hidden child by ``commit``/``pull``, with a
leaf child (the active leaf, or another snapshot's leaf) by ``fold``, which leaves the leaf
at its path holding the data of both, as SM's leaf-coalesce does. A revert to a snapshot whose
face is empty puts the new leaf beside it on its base; to a face holding data (a merged or
kept leaf) it first ``clone``s the face (frozen as a new base under a new empty face at the
face's path: SM's VDI.clone), then puts the new leaf on that base.

``fold``             merge a node N with its only child C, a leaf that keeps its path: C then
                     holds the data of both, its parent is N's parent, N's image is gone (the
                     datapath's way: a pull, or a converging merge around a running leaf).
``clone``            (SM's layout, revert) freeze a snapshot's leaf as an unnamed hidden node
                     with an empty face at its path.

Deferred reclaim: an unnamed hidden node whose only child is the active leaf is left as it is
on a datapath that needs an internal snapshot to merge with the active leaf (merging it would
only make another such node); it is reclaimed as soon as its child is frozen by the next
snapshot, or offline.

The planner is pure: new node ids and image paths come from functions the caller passes.
"""
from livesnap.errors import ChainTooDeep, DuplicateName, ImageInUse, SnapshotNotFound, UsageError
from livesnap.model.tree import ACTIVE, HIDDEN, SNAPSHOT, Node, Snapshot

DEFAULT_MAX_DEPTH = 30


def new_node_id():
    import uuid  # only create and revert make nodes; uuid's import is not free
    return uuid.uuid4().hex


class Plan(object):
    """The steps of one operation plus what its result will report."""

    def __init__(self, op, domain, steps, result):
        self.op = op
        self.domain = domain
        self.steps = steps
        self.result = result

    def to_dict(self):
        return {"op": self.op, "domain": self.domain, "steps": self.steps, "result": self.result}

    @classmethod
    def from_dict(cls, d):
        return cls(d["op"], d["domain"], d["steps"], d["result"])


# -- applying steps ----------------------------------------------------------------------

def apply(tree, step):
    """Change ``tree`` in place by the effect of ``step``."""
    op = step["op"]
    if op == "snapshot":
        tree.snapshots[step["name"]] = Snapshot(step["name"], step["created"],
                                                step.get("description", ""))
        for item in step["items"]:
            frozen = tree.nodes[item["frozen"]]
            frozen.path = item["frozen_path"]
            if item.get("face"):
                frozen.state = HIDDEN
                frozen.snapshot = None
                tree.nodes[item["face"]] = Node(item["face"], item["disk"], frozen.id, SNAPSHOT,
                                                item["face_path"], item["fmt"],
                                                snapshot=step["name"])
            else:
                frozen.state = SNAPSHOT
                frozen.snapshot = step["name"]
            tree.nodes[item["leaf"]] = Node(item["leaf"], item["disk"], frozen.id, ACTIVE,
                                            item["leaf_path"], item["fmt"])
            tree.active[item["disk"]] = item["leaf"]
    elif op == "remove":
        del tree.nodes[step["node"]]
    elif op == "commit":
        node, child = tree.nodes.pop(step["node"]), tree.nodes[step["child"]]
        child.parent = node.parent
        child.path = node.path
        child.fmt = node.fmt
        child.alloc = node.alloc + child.alloc
    elif op in ("pull", "fold"):
        node, child = tree.nodes.pop(step["node"]), tree.nodes[step["child"]]
        child.parent = node.parent
        child.alloc = node.alloc + child.alloc
    elif op == "hide":
        tree.nodes[step["node"]].state = HIDDEN
    elif op == "snapshot_state":
        if step["state"] is None:
            del tree.snapshots[step["name"]]
        else:
            tree.snapshots[step["name"]].state = step["state"]
    elif op == "new_leaf":
        tree.nodes[step["leaf"]] = Node(step["leaf"], step["disk"], step["parent"], ACTIVE,
                                        step["leaf_path"], step["fmt"])
        tree.active[step["disk"]] = step["leaf"]
    elif op == "keep_leaf":
        if step["name"] not in tree.snapshots:
            tree.snapshots[step["name"]] = Snapshot(step["name"], step["created"],
                                                    step.get("description", ""))
        node = tree.nodes[step["node"]]
        node.state = SNAPSHOT
        node.snapshot = step["name"]
        if step.get("kept_path"):
            node.path = step["kept_path"]
    elif op == "clone":
        frozen = _hide(tree, step["node"], step["frozen_path"])
        tree.nodes[step["face"]] = Node(step["face"], step["disk"], frozen.id, SNAPSHOT,
                                        step["face_path"], step["fmt"], snapshot=step["name"])
    elif op == "internal_snapshot":
        frozen = _hide(tree, step["frozen"], step["frozen_path"])
        tree.nodes[step["leaf"]] = Node(step["leaf"], step["disk"], frozen.id, ACTIVE,
                                        step["leaf_path"], step["fmt"])
        tree.active[step["disk"]] = step["leaf"]
    else:
        raise ValueError("unknown step %r" % op)


def _hide(tree, node_id, path):
    """The node frozen as an unnamed hidden image at ``path``."""
    node = tree.nodes[node_id]
    node.state = HIDDEN
    node.snapshot = None
    node.path = path
    return node


# -- planning ----------------------------------------------------------------------------

class Planner(object):
    """Plans operations on one domain's tree.

    ``namer(tree, disk, purpose, name, keep=None)`` returns the paths of a new image of
    ``disk``: ``{"frozen", "leaf"}`` for a snapshot (purpose ``snapshot`` or ``internal``),
    ``{"leaf", "kept"}`` for a revert (``kept``: where a kept old leaf goes, or None);
    ``new_id()`` returns a new node id. Both are the caller's, so planning stays pure.
    """

    def __init__(self, domain, namer, new_id=new_node_id, max_depth=DEFAULT_MAX_DEPTH,
                 merge_ops=None, needs_internal=None, users=None, faces=False, empty=None):
        self.domain = domain
        # SM's layout: snapshots as leaves ("faces") over hidden base copies
        self.faces = faces
        # empty(tree, node) -> True when the node's own image holds no data blocks
        self.empty = empty
        self.namer = namer
        self.new_id = new_id
        self.max_depth = max_depth
        # merge_ops(tree, node, child) -> the merge kinds the datapath can do there
        self.merge_ops = merge_ops
        # needs_internal(tree, child) -> True when a merge with ``child`` (the active leaf)
        # needs an internal snapshot first
        self.needs_internal = needs_internal
        # {image path: [user, ...]}: images something outside the tree reads
        self.users = users or {}
        self.in_use = []            # [{"image", "users"}] kept for their users, this plan

    def _add(self, tree, steps, step):
        apply(tree, step)
        steps.append(step)

    def _check_new_name(self, tree, name):
        if name in tree.snapshots:
            raise DuplicateName(self.domain, name)

    # create ------------------------------------------------------------------------------

    def create(self, tree, name, created, description="", disks=None):
        self._check_new_name(tree, name)
        all_disks = tree.disks()
        if not all_disks:
            raise UsageError(reason="domain '%s' has no disk livesnap can snapshot" % self.domain)
        disks = sorted(set(disks)) if disks else all_disks
        for d in disks:
            if d not in tree.active:
                raise UsageError(reason="domain '%s' has no snapshottable disk '%s' (disks: %s)"
                                 % (self.domain, d, ", ".join(all_disks)))
        work = tree.copy()
        items = []
        for d in disks:
            leaf = work.nodes[work.active[d]]
            depth = work.depth(leaf.id) + 1
            if depth > self.max_depth:
                raise ChainTooDeep(leaf.path, depth, self.max_depth)
            paths = self.namer(work, d, "snapshot", name)
            item = {"disk": d, "frozen": leaf.id, "frozen_path": paths["frozen"],
                    "leaf": self.new_id(), "leaf_path": paths["leaf"], "fmt": leaf.fmt,
                    "frozen_fmt": leaf.fmt}
            if self.faces:
                item["face"] = self.new_id()
                item["face_path"] = paths["face"]
            items.append(item)
        steps = []
        self._add(work, steps, {"op": "snapshot", "name": name, "created": created,
                                "description": description, "items": items})
        reclaimed = self._cascade(work, steps)      # deferred reclaims can go ahead now
        return Plan("create", self.domain, steps, {"snapshot": name, "reclaimed": reclaimed})

    # delete ------------------------------------------------------------------------------

    def delete(self, tree, name):
        snap = tree.snapshots.get(name)
        if snap is None or snap.state != SNAPSHOT:
            raise SnapshotNotFound(self.domain, name)
        work = tree.copy()
        steps = []
        actions = set()
        for disk, nid in sorted(work.snapshot_nodes(name).items()):
            actions.add(self._drop_node(work, steps, nid))
        if work.snapshot_nodes(name):
            self._add(work, steps, {"op": "snapshot_state", "name": name, "state": HIDDEN})
        else:
            self._add(work, steps, {"op": "snapshot_state", "name": name, "state": None})
        reclaimed = self._cascade(work, steps)
        if self.faces and actions == {"deleted"} and \
                any(s["op"] in ("commit", "pull", "fold") for s in steps):
            actions = {"merged"}        # SM's layout: its leaf deleted, its base merged
        if "hidden" in actions:
            action = "hidden"
        elif "merged" in actions:
            action = "merged"
        else:
            action = "deleted"
        return Plan("delete", self.domain, steps,
                    {"snapshot": name, "action": action, "reclaimed": reclaimed,
                     "in_use": self.in_use})

    def _drop_node(self, work, steps, nid):
        """Plan the removal of one snapshot or hidden node by the child rule."""
        kids = work.children(nid)
        used = self._in_use(work, nid)
        if used:
            if work.nodes[nid].state != HIDDEN:
                users = [u for p in used for u in self.users[p]]
                self._add(work, steps, {"op": "hide", "node": nid, "disk": work.nodes[nid].disk,
                                        "path": work.nodes[nid].path,
                                        "users": sorted(set(users))})
            return "hidden"
        if not kids:
            self._add(work, steps, self._remove_step(work, nid))
            return "deleted"
        if len(kids) == 1:
            self._merge(work, steps, nid, kids[0])
            return "merged"
        if work.nodes[nid].state != HIDDEN:
            self._add(work, steps, {"op": "hide", "node": nid, "disk": work.nodes[nid].disk,
                                    "path": work.nodes[nid].path})
        return "hidden"

    def _in_use(self, work, nid):
        """The other users of the images a removal or merge of ``nid`` would write or delete
        (its own, and its only child's: commit deletes the child's image, pull writes it),
        noted in ``self.in_use``; [] when there are none."""
        kids = work.children(nid)
        found = []
        for i in [nid] + (kids if len(kids) == 1 else []):
            path = work.nodes[i].path
            if self.users.get(path):
                found.append(path)
                if all(k["image"] != path for k in self.in_use):
                    self.in_use.append({"image": path, "users": list(self.users[path])})
        return found

    def _remove_step(self, work, nid):
        n = work.nodes[nid]
        return {"op": "remove", "node": nid, "disk": n.disk, "path": n.path, "fmt": n.fmt}

    def _merge(self, work, steps, nid, cid):
        """Plan the merge of ``nid`` with its only child, through an internal snapshot of
        the active leaf where the datapath needs one. In SM's layout a leaf child keeps its
        path and takes the node's data (``fold``)."""
        if self.faces and not work.children(cid):
            self._add(work, steps, self._fold_step(work, nid, cid))
            return
        if self.needs_internal is not None and self.needs_internal(work, cid):
            leaf = work.nodes[cid]
            paths = self.namer(work, leaf.disk, "internal", None)
            self._add(work, steps, {"op": "internal_snapshot", "disk": leaf.disk,
                                    "frozen": cid, "frozen_path": paths["frozen"],
                                    "frozen_fmt": leaf.fmt, "leaf": self.new_id(),
                                    "leaf_path": paths["leaf"], "fmt": leaf.fmt})
        self._add(work, steps, self._merge_step(work, nid, cid))

    def _fold_step(self, work, nid, cid):
        n, c = work.nodes[nid], work.nodes[cid]
        parent = work.nodes[n.parent] if n.parent is not None else None
        spare = self.namer(work, c.disk, "internal", None)["frozen"] \
            if c.state == ACTIVE else None
        return {"op": "fold", "disk": n.disk, "node": nid, "path": n.path, "fmt": n.fmt,
                "child": cid, "child_path": c.path, "child_fmt": c.fmt,
                "child_active": c.state == ACTIVE, "spare_path": spare,
                "parent": n.parent, "parent_path": parent.path if parent else None,
                "parent_fmt": parent.fmt if parent else None, "bytes": n.alloc}

    def _deferred(self, work, nid):
        """An unnamed hidden node over the active leaf, on a datapath that needs an internal
        snapshot to merge with it: merging now would only make another one. (Not in SM's
        layout: its fold converges on the leaf.)"""
        kids = work.children(nid)
        return (not self.faces and self.needs_internal is not None
                and work.nodes[nid].snapshot is None and len(kids) == 1 and self.needs_internal(work, kids[0]))

    def _merge_step(self, work, nid, cid):
        """Merge node ``nid`` with its only child ``cid``: commit or pull, by bytes moved.

        Commit copies the child's allocated data into the node; pull copies the node's into
        the child. Commit writes into the node's image, which is safe because the child is
        its only user.
        """
        n, c = work.nodes[nid], work.nodes[cid]
        parent = work.nodes[n.parent] if n.parent is not None else None
        grandchildren = [{"node": g, "path": work.nodes[g].path, "fmt": work.nodes[g].fmt}
                         for g in work.children(cid)]
        allowed = self.merge_ops(work, nid, cid) if self.merge_ops else ("commit", "pull")
        op = "commit" if c.alloc <= n.alloc else "pull"
        if op not in allowed:
            op = allowed[0]
        chain = work.chain(work.active[n.disk])
        return {"op": op, "disk": n.disk, "node": nid, "path": n.path, "fmt": n.fmt,
                "leaf_path": work.nodes[work.active[n.disk]].path,
                "node_in_chain": nid in chain, "child_in_chain": cid in chain,
                "child": cid, "child_path": c.path, "child_fmt": c.fmt,
                "child_active": c.state == ACTIVE,
                "parent": n.parent, "parent_path": parent.path if parent else None,
                "parent_fmt": parent.fmt if parent else None,
                "grandchildren": grandchildren, "bytes": min(c.alloc, n.alloc)}

    def _cascade(self, work, steps):
        """Reclaim every hidden node now down to one child (or none), repeatedly.

        Returns the names of the hidden snapshots whose last node was reclaimed.
        """
        reclaimed = []
        while True:
            todo = [n for n in work.reclaimable()
                    if not self._deferred(work, n) and not self._in_use(work, n)]
            if not todo:
                return reclaimed
            nid = todo[0]
            owner = work.nodes[nid].snapshot
            self._drop_node(work, steps, nid)
            if owner is not None and owner in work.snapshots and \
                    not work.snapshot_nodes(owner):
                self._add(work, steps, {"op": "snapshot_state", "name": owner, "state": None})
                reclaimed.append(owner)

    def reclaim(self, tree):
        """Plan only the cascade (for hooks and ``livesnap reclaim``)."""
        work = tree.copy()
        steps = []
        reclaimed = self._cascade(work, steps)
        return Plan("reclaim", self.domain, steps, {"reclaimed": reclaimed, "in_use": self.in_use})

    # revert ------------------------------------------------------------------------------

    def revert(self, tree, name, created, keep_current=None):
        snap = tree.snapshots.get(name)
        if snap is None or snap.state != SNAPSHOT:
            raise SnapshotNotFound(self.domain, name)
        if keep_current is not None:
            self._check_new_name(tree, keep_current)
        work = tree.copy()
        steps = []
        targets = work.snapshot_nodes(name)
        for d in sorted(targets):
            old = work.active[d]
            base = work.nodes[targets[d]]
            paths = self.namer(work, d, "revert", name, keep=keep_current)
            if self.faces and not work.children(base.id):
                base = self._revert_base(work, steps, base, name)
            self._refuse_used_leaf(work.nodes[old], keep_current, paths.get("kept"))
            new_leaf = {"op": "new_leaf", "disk": d, "parent": base.id,
                        "parent_path": base.path, "parent_fmt": base.fmt,
                        "leaf": self.new_id(), "leaf_path": paths["leaf"],
                        "fmt": base.fmt if base.fmt in ("qcow2", "vhd") else "qcow2"}
            if keep_current is not None:
                old_step = {"op": "keep_leaf", "node": old, "name": keep_current,
                            "created": created, "description": "kept by revert to %s" % name,
                            "path": work.nodes[old].path, "kept_path": paths.get("kept")}
            else:
                old_step = self._remove_step(work, old)
            if paths["leaf"] == work.nodes[old].path:
                # the datapath keeps the disk's path: the old leaf makes room first
                self._add(work, steps, old_step)
                self._add(work, steps, new_leaf)
            else:
                self._add(work, steps, new_leaf)
                self._add(work, steps, old_step)
        reclaimed = self._cascade(work, steps)
        return Plan("revert", self.domain, steps,
                    {"snapshot": name, "kept": keep_current, "reclaimed": reclaimed,
                     "in_use": self.in_use})


    def _revert_base(self, work, steps, face, name):
        """SM's layout: the node a reverted disk's new leaf goes on, for a snapshot whose node
        is the leaf ``face``: its base when the face is empty (both read the same), else the
        face cloned (frozen as a new base under a new empty face at its path)."""
        if face.parent is not None and self.empty is not None and self.empty(work, face.id):
            return work.nodes[face.parent]
        frozen = self.namer(work, face.disk, "internal", None)["frozen"]
        self._add(work, steps, {"op": "clone", "disk": face.disk, "node": face.id,
                                "path": face.path, "frozen_path": frozen, "name": name,
                                "face": self.new_id(), "face_path": face.path, "fmt": face.fmt})
        return work.nodes[face.id]

    def _refuse_used_leaf(self, leaf, keep_current, kept_path):
        """A revert deletes the old active leaf, or (on a datapath that keeps leaves at
        fixed paths) moves it: refused when something else reads it."""
        who = self.users.get(leaf.path)
        if not who:
            return
        if keep_current is None:
            raise ImageInUse(leaf.path, list(who), "a revert without --keep-current would "
                                                   "delete it")
        if kept_path and kept_path != leaf.path:
            raise ImageInUse(leaf.path, list(who), "a revert would move it to %s" % kept_path)


def plan_disks(plan):
    """The disks the steps of ``plan`` act on."""
    out = set()
    for s in plan.steps:
        for it in s.get("items") or [s]:
            if it.get("disk"):
                out.add(it["disk"])
    return sorted(out)


def plan_summary(plan):
    """One line per step, for ``--dry-run`` and logs."""
    lines = []
    for s in plan.steps:
        op = s["op"]
        if op == "snapshot":
            for it in s["items"]:
                lines.append("snapshot %s: freeze %s as %s, new leaf %s%s"
                             % (it["disk"], it["frozen"][:8], it["frozen_path"], it["leaf_path"],
                                ", snapshot image %s" % it["face_path"]
                                if it.get("face_path") else ""))
        elif op == "fold":
            lines.append("fold %s: merge %s (%s) into its leaf %s (%s), moving ~%d bytes"
                         % (s["disk"], s["node"][:8], s["path"], s["child"][:8],
                            s["child_path"], s["bytes"]))
        elif op == "clone":
            lines.append("clone %s: freeze snapshot %s's image as %s, new empty image at %s"
                         % (s["disk"], s["name"], s["frozen_path"], s["face_path"]))
        elif op in ("commit", "pull"):
            lines.append("%s %s: merge %s (%s) with its child %s (%s), moving ~%d bytes"
                         % (op, s["disk"], s["node"][:8], s["path"], s["child"][:8],
                            s["child_path"], s["bytes"]))
        elif op == "remove":
            lines.append("remove %s: delete %s (%s)" % (s["disk"], s["node"][:8], s["path"]))
        elif op == "hide" and s.get("users"):
            lines.append("hide %s: %s (%s) is kept: also used by %s"
                         % (s["disk"], s["node"][:8], s["path"], ", ".join(s["users"])))
        elif op == "hide":
            lines.append("hide %s: %s (%s) keeps its children" % (s["disk"], s["node"][:8],
                                                                   s["path"]))
        elif op == "snapshot_state":
            lines.append("snapshot %s: %s" % (s["name"], "forgotten" if s["state"] is None
                                             else "now " + s["state"]))
        elif op == "new_leaf":
            lines.append("new leaf %s: %s on %s" % (s["disk"], s["leaf_path"], s["parent_path"]))
        elif op == "keep_leaf":
            lines.append("keep leaf %s as snapshot %s%s" % (
                s["node"][:8], s["name"], " (%s)" % s["kept_path"] if s.get("kept_path") else ""))
        elif op == "internal_snapshot":
            lines.append("internal snapshot %s: freeze the active image as %s, new leaf %s"
                         % (s["disk"], s["frozen_path"], s["leaf_path"]))
    return lines
