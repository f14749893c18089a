"""The planner against a reference model of what every snapshot and live disk reads.

A simulated datapath executes plans on abstract images (dicts block -> value); the
reference model only remembers, for each snapshot, what each of its disks read when taken.
"""
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livesnap.errors import (ChainTooDeep, DuplicateName, ImageInUse, SnapshotNotFound,
                             UsageError)
from livesnap.model import planner as P
from livesnap.model.tree import ACTIVE, BASE, HIDDEN, SNAPSHOT, Node, Tree

DISKS = ("vda", "vdb")


class Sim(object):
    """A tree plus the data of each image, keyed by path; executes plans like a datapath.

    ``policy`` "libvirt": new images get new paths, merges are free. "tapdisk": the active
    leaf keeps its path (frozen images are renamed away), and a merge with the active leaf
    needs an internal snapshot first (only read-only images may be copied online). "sm":
    tapdisk's rules in SM's layout (a XAPI host): snapshots are empty leaves (faces) on hidden
    base copies, merges into a leaf are folds.
    """

    def __init__(self, disks=DISKS, with_base=True, policy="libvirt"):
        self.policy = policy
        self.counter = itertools.count(1)
        self.data = {}
        nodes = []
        active = {}
        for d in disks:
            parent = None
            if with_base:
                nodes.append(Node("base-" + d, d, None, BASE, "/img/%s-base" % d))
                self.data["/img/%s-base" % d] = {0: "base-%s" % d}
                parent = "base-" + d
            nodes.append(Node("leaf0-" + d, d, parent, ACTIVE, "/img/%s-0" % d))
            self.data["/img/%s-0" % d] = {}
            active[d] = "leaf0-" + d
        self.tree = Tree(nodes, [], active)
        tapdisk = policy in ("tapdisk", "sm")
        self.planner = P.Planner("dom", self.namer, new_id=self.new_id, max_depth=1000,
                                 merge_ops=self.merge_ops if tapdisk else None,
                                 needs_internal=self.needs_internal if tapdisk else None,
                                 faces=policy == "sm", empty=self.empty)

    def new_id(self):
        return "n%d" % next(self.counter)

    def namer(self, tree, disk, purpose, name, keep=None):
        fresh = "/img/%s-%d" % (disk, next(self.counter))
        current = tree.nodes[tree.active[disk]].path
        if self.policy in ("tapdisk", "sm"):
            return {"frozen": fresh, "leaf": current,
                    "kept": "/img/%s-kept-%d" % (disk, next(self.counter)),
                    "face": "/img/%s-face-%d" % (disk, next(self.counter))}
        return {"frozen": current, "leaf": fresh, "kept": None}

    def empty(self, tree, node_id):
        return not self.data[tree.nodes[node_id].path]

    @staticmethod
    def needs_internal(tree, child):
        return tree.nodes[child].state == ACTIVE

    @staticmethod
    def merge_ops(tree, node, child):
        assert tree.nodes[child].state != ACTIVE, "tapdisk cannot merge with the active leaf"
        return ("commit", "pull")

    # reading and writing ---------------------------------------------------------------

    def read(self, node_id, tree=None):
        tree = tree or self.tree
        out = {}
        for nid in reversed(tree.chain(node_id)):
            out.update(self.data[tree.nodes[nid].path])
        return out

    def write(self, disk, block, value):
        node = self.tree.nodes[self.tree.active[disk]]
        self.data[node.path][block] = value
        node.alloc = len(self.data[node.path])

    # executing -----------------------------------------------------------------------------

    def execute(self, plan):
        for step in plan.steps:
            self.run_step(step)
            P.apply(self.tree, step)

    def run_step(self, step):
        t = self.tree
        op = step["op"]
        if op in ("snapshot", "internal_snapshot"):
            for it in step.get("items", [step]):
                old = t.nodes[it["frozen"]].path
                if it["frozen_path"] != old:            # renamed away (tapdisk)
                    assert it["frozen_path"] not in self.data
                    self.data[it["frozen_path"]] = self.data.pop(old)
                assert it["leaf_path"] not in self.data
                self.data[it["leaf_path"]] = {}
                if it.get("face_path"):
                    assert it["face_path"] not in self.data
                    self.data[it["face_path"]] = {}
        elif op == "clone":
            assert t.children(step["node"]) == [] and step["frozen_path"] not in self.data
            self.data[step["frozen_path"]] = self.data.pop(step["path"])
            self.data[step["face_path"]] = {}
        elif op == "new_leaf":
            assert step["leaf_path"] not in self.data
            self.data[step["leaf_path"]] = {}
        elif op == "keep_leaf":
            if step.get("kept_path"):
                self.data[step["kept_path"]] = self.data.pop(t.nodes[step["node"]].path)
        elif op == "remove":
            assert t.children(step["node"]) == [], "removing a node with children"
            assert t.nodes[step["node"]].state != BASE
            del self.data[step["path"]]
        elif op == "commit":
            # Commit writes into the node's image: it must have no other user.
            assert t.children(step["node"]) == [step["child"]]
            assert t.nodes[step["node"]].state in (SNAPSHOT, HIDDEN)
            self.data[step["path"]].update(self.data.pop(step["child_path"]))
        elif op in ("pull", "fold"):
            assert t.children(step["node"]) == [step["child"]]
            if op == "fold":
                assert t.children(step["child"]) == [], "a fold is into a leaf"
            merged = dict(self.data.pop(step["path"]))
            merged.update(self.data[step["child_path"]])
            self.data[step["child_path"]] = merged


def check_invariants(sim, expected_snaps, expected_live):
    t = sim.tree
    assert t.validate() == []
    for name, disks in expected_snaps.items():
        assert name in t.snapshots and t.snapshots[name].state == SNAPSHOT
        nodes = t.snapshot_nodes(name)
        assert sorted(nodes) == sorted(disks)
        for d, content in disks.items():
            assert sim.read(nodes[d]) == content, (name, d)
    visible = {s.name for s in t.visible_snapshots()}
    assert visible == set(expected_snaps)
    for d, content in expected_live.items():
        assert sim.read(t.active[d]) == content
    # no image the tree does not know, none it knows missing
    assert set(sim.data) == {n.path for n in t.nodes.values()}
    if sim.policy == "sm":
        # SM's layout: every visible image a leaf, every interior image a hidden base copy
        # with two or more children (one left is merged at once)
        for n in t.nodes.values():
            kids = t.children(n.id)
            if n.state in (SNAPSHOT, ACTIVE):
                assert kids == [], n
            elif n.state == HIDDEN:
                assert n.snapshot is None and len(kids) >= 2, (n, kids)
        return
    for n in t.nodes.values():
        if n.state == HIDDEN and n.snapshot is None:     # deferred internal node
            kids = t.children(n.id)
            assert len(kids) == 1 and t.nodes[kids[0]].state == ACTIVE
        elif n.state == HIDDEN:
            assert len(t.children(n.id)) >= 2


ops = st.lists(st.tuples(st.sampled_from(["write", "write", "create", "create", "delete",
                                          "delete", "revert", "revert_keep"]),
                         st.integers(0, 1000), st.integers(0, 7)), max_size=60)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans(), st.sampled_from(["libvirt", "tapdisk", "sm"]))
def test_random_sequences_keep_every_snapshot_and_the_live_disks(seq, with_base, policy):
    sim = Sim(with_base=with_base, policy=policy)
    snaps = {}
    live = {d: sim.read(sim.tree.active[d]) for d in DISKS}
    n = 0
    for kind, pick, block in seq:
        n += 1
        names = sorted(snaps)
        if kind == "write":
            d = DISKS[pick % 2]
            sim.write(d, block, "w%d" % n)
            live[d] = sim.read(sim.tree.active[d])
        elif kind == "create":
            name = "s%d" % n
            disks = None if pick % 3 else [DISKS[pick % 2]]
            sim.execute(sim.planner.create(sim.tree, name, n, disks=disks))
            snaps[name] = {d: dict(live[d]) for d in (disks or DISKS)}
        elif kind == "delete" and names:
            name = names[pick % len(names)]
            plan = sim.planner.delete(sim.tree, name)
            sim.execute(plan)
            del snaps[name]
            assert plan.result["action"] in ("deleted", "merged", "hidden")
            for r in plan.result["reclaimed"]:
                assert r not in sim.tree.snapshots
        elif kind in ("revert", "revert_keep") and names:
            name = names[pick % len(names)]
            keep = "k%d" % n if kind == "revert_keep" else None
            sim.execute(sim.planner.revert(sim.tree, name, n, keep_current=keep))
            if keep:
                snaps[keep] = {d: dict(live[d]) for d in snaps[name]}
            for d in snaps[name]:
                live[d] = dict(snaps[name][d])
        check_invariants(sim, snaps, live)
    # Deleting everything leaves only the live disks on their bases: nothing hidden remains.
    for name in sorted(snaps):
        sim.execute(sim.planner.delete(sim.tree, name))
    check_invariants(sim, {}, live)
    assert all(n.state in (ACTIVE, BASE) or (n.state == HIDDEN and n.snapshot is None)
               for n in sim.tree.nodes.values())
    assert sim.tree.snapshots == {}
    if policy == "sm":
        # nothing left but each disk's leaf on its base: the GC would find nothing
        assert len(sim.tree.nodes) == len(DISKS) * (2 if with_base else 1)
    if policy == "tapdisk":
        # at most one deferred internal image per disk, reclaimed by the next snapshot
        assert len(sim.tree.nodes) <= len(DISKS) * (3 if with_base else 2)
        sim.execute(sim.planner.create(sim.tree, "last", 10 ** 6))
        sim.execute(sim.planner.delete(sim.tree, "last"))
        check_invariants(sim, {}, live)


def make_branchy():
    """s1 <- s2 <- live, then revert to s1 (s1 has 2 children: s2 and the new leaf)."""
    sim = Sim()
    sim.write("vda", 1, "a")
    sim.execute(sim.planner.create(sim.tree, "s1", 1))
    sim.write("vda", 2, "b")
    sim.execute(sim.planner.create(sim.tree, "s2", 2))
    sim.execute(sim.planner.revert(sim.tree, "s1", 3, keep_current="k"))
    return sim


def test_delete_with_two_children_hides_then_cascade_reclaims():
    sim = make_branchy()
    plan = sim.planner.delete(sim.tree, "s1")
    assert plan.result["action"] == "hidden"
    assert [s["op"] for s in plan.steps] == ["hide", "hide", "snapshot_state"]
    sim.execute(plan)
    assert sim.tree.snapshots["s1"].state == HIDDEN
    # s2 has one child (k's node): merged; then k is deleted -> s1's node has one child left
    plan = sim.planner.delete(sim.tree, "k")
    sim.execute(plan)
    assert plan.result["action"] == "deleted"
    plan = sim.planner.delete(sim.tree, "s2")
    sim.execute(plan)
    assert plan.result["reclaimed"] == ["s1"]
    assert "s1" not in sim.tree.snapshots
    assert sim.read(sim.tree.active["vda"]) == {0: "base-vda", 1: "a"}


def test_merge_chooses_commit_or_pull_by_bytes():
    sim = Sim(disks=("vda",))
    for b in range(5):
        sim.write("vda", b, "x")
    sim.execute(sim.planner.create(sim.tree, "big", 1))
    sim.write("vda", 9, "y")            # child has 1 block, node has 5: commit moves less
    plan = sim.planner.delete(sim.tree, "big")
    assert [s["op"] for s in plan.steps][0] == "commit"
    sim2 = Sim(disks=("vda",))
    sim2.write("vda", 0, "x")
    sim2.execute(sim2.planner.create(sim2.tree, "small", 1))
    for b in range(5):
        sim2.write("vda", b, "y")       # child has 5 blocks, node 1: pull moves less
    plan = sim2.planner.delete(sim2.tree, "small")
    assert [s["op"] for s in plan.steps][0] == "pull"
    assert plan.result["action"] == "merged"


def test_bad_names_and_limits():
    sim = Sim()
    sim.execute(sim.planner.create(sim.tree, "s1", 1))
    with pytest.raises(DuplicateName):
        sim.planner.create(sim.tree, "s1", 2)
    with pytest.raises(SnapshotNotFound):
        sim.planner.delete(sim.tree, "nope")
    with pytest.raises(SnapshotNotFound):
        sim.planner.revert(sim.tree, "nope", 2)
    with pytest.raises(UsageError):
        sim.planner.create(sim.tree, "s2", 2, disks=["sdz"])
    shallow = P.Planner("dom", sim.namer, sim.new_id, max_depth=3)
    with pytest.raises(ChainTooDeep):
        shallow.create(sim.tree, "s3", 3)       # base + s1 + leaf + new leaf = 4 > 3


def test_snapshot_parent_and_current():
    sim = make_branchy()
    assert sim.tree.snapshot_parent("s2") == "s1"
    assert sim.tree.snapshot_parent("k") == "s2"
    assert sim.tree.snapshot_parent("s1") is None
    assert sim.tree.current_snapshot() == "s1"
    sim.execute(sim.planner.delete(sim.tree, "s1"))     # hidden: visible tree skips it
    assert sim.tree.snapshot_parent("s2") is None


def test_plan_round_trips_through_json():
    import json
    sim = make_branchy()
    plan = sim.planner.delete(sim.tree, "s1")
    again = P.Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()
    assert P.plan_summary(plan)
    tree2 = Tree.from_dict(json.loads(json.dumps(sim.tree.to_dict())))
    assert tree2.to_dict() == sim.tree.to_dict()


def test_tapdisk_merges_with_the_active_leaf_through_an_internal_snapshot():
    sim = Sim(disks=("vda",), policy="tapdisk")
    leaf_path = sim.tree.nodes[sim.tree.active["vda"]].path
    sim.write("vda", 1, "a")
    sim.execute(sim.planner.create(sim.tree, "s1", 1))
    # the active leaf keeps its path, the frozen image was renamed away
    assert sim.tree.nodes[sim.tree.active["vda"]].path == leaf_path
    assert sim.tree.nodes[sim.tree.snapshot_nodes("s1")["vda"]].path != leaf_path
    sim.write("vda", 2, "b")
    plan = sim.planner.delete(sim.tree, "s1")
    assert [s["op"] for s in plan.steps][:1] == ["internal_snapshot"]
    assert [s["op"] for s in plan.steps][1] in ("commit", "pull")
    sim.execute(plan)
    internal = [n for n in sim.tree.nodes.values() if n.state == HIDDEN]
    assert len(internal) == 1 and internal[0].snapshot is None      # deferred
    assert sim.read(sim.tree.active["vda"]) == {0: "base-vda", 1: "a", 2: "b"}
    # the next snapshot freezes the leaf above it: the internal image is reclaimed then
    plan = sim.planner.create(sim.tree, "s2", 2)
    assert [s["op"] for s in plan.steps][0] == "snapshot"
    assert [s["op"] for s in plan.steps][1] in ("commit", "pull")
    sim.execute(plan)
    assert not [n for n in sim.tree.nodes.values() if n.state == HIDDEN]
    # revert keeps the disk's path: the old leaf is renamed (kept) before the new one is made
    plan = sim.planner.revert(sim.tree, "s2", 3, keep_current="k")
    assert [s["op"] for s in plan.steps][:2] == ["keep_leaf", "new_leaf"]
    sim.execute(plan)
    assert sim.tree.nodes[sim.tree.active["vda"]].path == leaf_path


def users_of(sim, targets):
    """{path: [user]} as the engine finds them: each clone reads its image and all below."""
    by_path = {n.path: n.id for n in sim.tree.nodes.values()}
    out = {}
    for i, target in enumerate(targets):
        for nid in sim.tree.chain(by_path[target]):
            out.setdefault(sim.tree.nodes[nid].path, []).append("clone%d" % i)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.lists(st.integers(0, 1000), max_size=8), st.booleans(),
       st.sampled_from(["libvirt", "tapdisk"]))
def test_images_other_users_read_are_never_written_or_deleted(seq, clones, with_base, policy):
    """Images outside the tree (clones) back onto frozen images as the sequence goes: no
    step ever writes or deletes what a clone reads, and the snapshots stay intact."""
    sim = Sim(with_base=with_base, policy=policy)
    snaps, targets, frozen = {}, [], {}
    live = {d: sim.read(sim.tree.active[d]) for d in DISKS}
    clones = list(clones)
    n = 0
    for kind, pick, block in seq:
        n += 1
        names = sorted(snaps)
        candidates = sorted(x.path for x in sim.tree.nodes.values() if x.state != ACTIVE)
        if clones and candidates and pick % 4 == 0:
            target = candidates[clones.pop() % len(candidates)]
            targets.append(target)
            by_path = {x.path: x.id for x in sim.tree.nodes.values()}
            for nid in sim.tree.chain(by_path[target]):
                p = sim.tree.nodes[nid].path
                frozen[p] = dict(sim.data[p])
        sim.planner.users = users_of(sim, targets)
        sim.planner.in_use = []
        if kind == "write":
            d = DISKS[pick % 2]
            sim.write(d, block, "w%d" % n)
            live[d] = sim.read(sim.tree.active[d])
        elif kind == "create":
            name = "s%d" % n
            sim.execute(sim.planner.create(sim.tree, name, n))
            snaps[name] = {d: dict(live[d]) for d in DISKS}
        elif kind == "delete" and names:
            name = names[pick % len(names)]
            plan = sim.planner.delete(sim.tree, name)
            sim.execute(plan)
            del snaps[name]
        elif kind in ("revert", "revert_keep") and names:
            name = names[pick % len(names)]
            keep = "k%d" % n if kind == "revert_keep" else None
            sim.execute(sim.planner.revert(sim.tree, name, n, keep_current=keep))
            if keep:
                snaps[keep] = {d: dict(live[d]) for d in snaps[name]}
            for d in snaps[name]:
                live[d] = dict(snaps[name][d])
        for p, content in frozen.items():
            assert sim.data.get(p) == content, p
        for name, disks in snaps.items():
            nodes = sim.tree.snapshot_nodes(name)
            for d, content in disks.items():
                assert sim.read(nodes[d]) == content, (name, d)
        for d, content in live.items():
            assert sim.read(sim.tree.active[d]) == content
        assert set(sim.data) == {x.path for x in sim.tree.nodes.values()}
    # once the clones are gone, everything kept for them is reclaimed
    sim.planner.users = {}
    for name in sorted(snaps):
        sim.execute(sim.planner.delete(sim.tree, name))
    sim.execute(sim.planner.reclaim(sim.tree))
    assert all(x.state in (ACTIVE, BASE) or (x.state == HIDDEN and x.snapshot is None)
               for x in sim.tree.nodes.values())


def test_a_used_image_is_kept_and_says_by_whom():
    sim = Sim(with_base=False)
    sim.write("vda", 0, "a")
    sim.execute(sim.planner.create(sim.tree, "golden", 1))
    gold = sim.tree.nodes[sim.tree.snapshot_nodes("golden")["vda"]].path
    sim.planner.users = {gold: ["domain 'b' disk vda"]}
    plan = sim.planner.delete(sim.tree, "golden")
    assert plan.result["action"] == "hidden"
    assert plan.result["in_use"] == [{"image": gold, "users": ["domain 'b' disk vda"]}]
    assert "also used by domain 'b' disk vda" in " ".join(P.plan_summary(plan))
    sim.execute(plan)
    assert sim.planner.reclaim(sim.tree).steps == []
    # a revert that would delete a leaf someone reads is refused
    leaf = sim.tree.nodes[sim.tree.active["vda"]].path
    sim.execute(sim.planner.create(sim.tree, "s2", 2))
    leaf = sim.tree.nodes[sim.tree.active["vda"]].path
    sim.planner.users = {leaf: ["image /x"]}
    with pytest.raises(ImageInUse) as e:
        sim.planner.revert(sim.tree, "s2", 3)
    assert leaf in str(e.value) and "image /x" in str(e.value)
