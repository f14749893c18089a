"""Invariant 1 on real qcow2 chains and a real libvirtd: after every operation of a random
sequence (create, write, delete, revert; two disks; trees with several children) every
remaining snapshot and the live disks read exactly what they read before, and no image file
is left that the catalog does not know."""
import os
import random

import pytest

from livesnap.catalog import Catalog
from livesnap.engine.engine import Engine

from helpers import URI, chain_digest


def catalog_paths(dom):
    db = [f for f in os.listdir(dom.state_dir) if f.endswith(".db")][0]
    cat = Catalog(os.path.join(dom.state_dir, db))
    try:
        return {n.path for n in cat.load_tree().nodes.values()}
    finally:
        cat.close()


def check_invariants(dom, engine, snaps, live):
    listing = engine.snapshot_list(dom.name)
    assert {s["name"] for s in listing["snapshots"]} == set(snaps)
    for s in listing["snapshots"]:
        assert {d["target"]: chain_digest(d["image"]) for d in s["disks"]} == snaps[s["name"]], \
            s["name"]
    assert dom.digests() == live
    files = {os.path.join(dom.dir, f) for f in dom.files()}
    assert files == catalog_paths(dom)
    for path in files:
        if os.path.basename(path).startswith(dom.name):      # made by livesnap
            assert os.stat(path).st_mode & 0o777 == 0o600, path
    assert engine.check(dom.name)["problems"] == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_sequence_keeps_every_snapshot(make_dom, seed):
    rnd = random.Random(seed)
    dom = make_dom(ndisks=2, base=(seed != 2))
    engine = Engine(connect=URI, state_dir=dom.state_dir)
    snaps, live = {}, dom.digests()
    actions = {"deleted": 0, "merged": 0, "hidden": 0, "reclaimed": 0, "revert": 0}
    for i in range(30):
        kind = rnd.choice(["write", "create", "create", "delete", "delete", "revert"])
        if kind == "write" or (kind != "create" and not snaps):
            target = rnd.choice(dom.targets)
            dom.write(target, rnd.randrange(1, 250), rnd.randrange(0, 120) * 64 * 1024,
                      rnd.choice([4096, 65536, 3 * 65536]))
            live = dom.digests()
            continue
        if kind == "create":
            name = "s%d" % i
            disks = None if rnd.random() < 0.8 else [rnd.choice(dom.targets)]
            r = engine.create(dom.name, name, "step %d" % i, disks)
            assert [d["target"] for d in r["disks"]] == sorted(disks or dom.targets)
            snaps[name] = {t: live[t] for t in (disks or dom.targets)}
        elif kind == "delete":
            name = rnd.choice(sorted(snaps))
            r = engine.delete(dom.name, name)
            actions[r["action"]] += 1
            actions["reclaimed"] += len(r["reclaimed"])
            del snaps[name]
        else:
            name = rnd.choice(sorted(snaps))
            keep = "k%d" % i if rnd.random() < 0.5 else None
            engine.revert(dom.name, name, keep_current=keep)
            actions["revert"] += 1
            if keep:
                snaps[keep] = {t: live[t] for t in snaps[name]}
            live = dict(live, **snaps[name])
        check_invariants(dom, engine, snaps, live)
    for name in sorted(snaps):
        engine.delete(dom.name, name)
    check_invariants(dom, engine, {}, live)
    print("seed %d actions: %s" % (seed, actions))
    assert actions["revert"] > 0 and actions["merged"] + actions["deleted"] > 0


def test_branch_hide_and_cascade_on_real_images(make_dom):
    """s1 gets two children by revert; deleting it hides it; once one branch is gone it is
    reclaimed by the one-child rule."""
    dom = make_dom(ndisks=2)
    dom.write("vda", 1, 0)
    s1 = dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 65536)
    dom.json("snapshot-create", dom.name, "s2")
    dom.write("vdb", 3, 0)
    before = dom.digests()
    dom.json("snapshot-revert", dom.name, "s1", "--keep-current", "k")
    r = dom.json("snapshot-delete", dom.name, "s1")
    assert r["action"] == "hidden" and r["reclaimed"] == []
    listing = dom.json("snapshot-list", dom.name, "--all")
    hidden = [s for s in listing["snapshots"] if s["name"] == "s1"]
    assert hidden and hidden[0]["state"] == "hidden"
    assert [d["image"] for d in hidden[0]["disks"]] == [d["image"] for d in s1["disks"]]
    assert all(os.path.exists(d["image"]) for d in s1["disks"])
    assert "s1" not in [s["name"] for s in dom.json("snapshot-list", dom.name)["snapshots"]]
    # reverting to k brings back the state before the first revert; the discarded leaf was
    # s1's other child, so s1 is down to one child and reclaimed by the same command
    r = dom.json("snapshot-revert", dom.name, "k")
    assert r["reclaimed"] == ["s1"]
    assert dom.digests() == before
    r = dom.json("snapshot-delete", dom.name, "s2")
    assert r["action"] == "merged" and r["reclaimed"] == []
    r = dom.json("snapshot-delete", dom.name, "k")
    assert r["action"] == "merged" and r["reclaimed"] == []
    assert dom.digests() == before
    assert not any(os.path.exists(d["image"]) for d in s1["disks"]
                   if not d["image"].endswith("vda.qcow2") and not d["image"].endswith("vdb.qcow2"))
    assert dom.cli("check", dom.name).returncode == 0
    assert len(dom.files()) == 4          # two bases + the two live images
