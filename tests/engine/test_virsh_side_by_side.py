"""livesnap side by side with virsh (issue 14, items 2 and 3): libvirt's own snapshot-delete
works on livesnap's snapshots, and what virsh does after livesnap's first use (snapshots
made or deleted) is followed by livesnap the next time it looks, with the checks of the
first adoption; ``check --repair`` brings a catalog out of step back from libvirt's
metadata and the images, refusing what they do not explain."""
import os
import sqlite3
from xml.etree import ElementTree

from helpers import chain_digest, qemu_img
from test_virsh_adopt import livesnap_tree, virsh, virsh_tree


def virsh_ok(*args):
    r = virsh(*args, check=False)
    assert r.returncode == 0, (args, r.stderr)
    return r


def snapshot_digests(dom):
    """{snapshot: {disk: digest of what its image reads}} as livesnap lists them."""
    return {s["name"]: {d["target"]: chain_digest(d["image"]) for d in s["disks"]}
            for s in dom.json("snapshot-list", dom.name)["snapshots"]}


def three_snapshots(dom):
    for i, name in enumerate(("a", "b", "c")):
        for t in dom.targets:
            dom.write(t, 0x10 + i, i * 65536)
        dom.json("snapshot-create", dom.name, name)
    for t in dom.targets:
        dom.write(t, 0x20, 4 * 65536)


def test_virsh_snapshot_delete_of_livesnap_snapshots_shut_off(make_dom):
    dom = make_dom(ndisks=2)
    three_snapshots(dom)
    digests, live = snapshot_digests(dom), dom.digests()
    # libvirt's model: <disks> names the overlay the snapshot made, <domain> its image
    xml = ElementTree.fromstring(virsh("snapshot-dumpxml", dom.name, "b").stdout)
    listed = {s["name"]: {d["target"]: d["image"] for d in s["disks"]}
              for s in dom.json("snapshot-list", dom.name)["snapshots"]}
    assert {d.get("name"): d.find("source").get("file") for d in xml.findall("disks/disk")} \
        == listed["c"]
    assert {d.find("target").get("dev"): d.find("source").get("file")
            for d in xml.findall("domain/devices/disk")} == listed["b"]

    # libvirt 9.0 cannot merge a snapshot below the current one of a shut-off domain (its
    # own ones neither: "could not find base disk source"); it changes nothing
    files = dom.files()
    refused = virsh("snapshot-delete", dom.name, "b", check=False)
    if refused.returncode != 0:
        assert dom.files() == files and dom.json("check", dom.name)["ok"]
        assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None, "b": "a", "c": "b"}

    virsh_ok("snapshot-delete", dom.name, "c")          # current: merged with the live disks
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None, "b": "a"}
    assert dom.json("check", dom.name)["ok"]
    assert snapshot_digests(dom) == {"a": digests["a"], "b": digests["b"]}
    assert dom.digests() == live

    virsh_ok("snapshot-delete", dom.name, "b")          # current now
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None}
    assert dom.json("check", dom.name)["ok"]
    assert snapshot_digests(dom) == {"a": digests["a"]} and dom.digests() == live

    # livesnap goes on from there
    dom.json("snapshot-create", dom.name, "d")
    assert dom.json("snapshot-delete", dom.name, "a")["action"] == "merged"
    assert virsh_tree(dom) == livesnap_tree(dom) == {"d": None}
    assert dom.json("check", dom.name)["ok"] and dom.digests() == live


def test_virsh_snapshot_delete_of_livesnap_snapshots_running(make_dom):
    dom = make_dom(ndisks=1)
    dom.dom.create()                  # no bootable disk: the firmware idles, QEMU runs
    dom.json("snapshot-create", dom.name, "a")
    dom.json("snapshot-create", dom.name, "b")
    dom.json("snapshot-create", dom.name, "c")
    digests = snapshot_digests(dom)
    virsh_ok("snapshot-delete", dom.name, "b")          # intermediate commit
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None, "c": "a"}
    assert dom.json("check", dom.name)["ok"]
    virsh_ok("snapshot-delete", dom.name, "c")          # active commit and pivot
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None}
    assert dom.json("check", dom.name)["ok"]
    assert snapshot_digests(dom) == {"a": digests["a"]}
    dom.json("snapshot-create", dom.name, "d")
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None, "d": "a"}


def test_virsh_snapshot_after_first_use_is_adopted_and_deleted_by_livesnap(make_dom):
    dom = make_dom(ndisks=2)
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "a")
    dom.write("vda", 2, 65536)
    virsh("snapshot-create-as", dom.name, "v1", "--disk-only", "--atomic")
    dom.write("vdb", 3, 0)
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, "v1": "a"}
    assert dom.json("check", dom.name)["ok"]
    digests, live = snapshot_digests(dom), dom.digests()
    r = dom.json("snapshot-delete", dom.name, "v1")
    assert r["action"] == "merged"
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None}
    assert snapshot_digests(dom) == {"a": digests["a"]} and dom.digests() == live
    assert dom.json("check", dom.name)["ok"]


def test_virsh_snapshot_of_a_running_domain_after_first_use(make_dom):
    dom = make_dom(ndisks=2)
    dom.dom.create()
    dom.json("snapshot-create", dom.name, "a")
    virsh_ok("snapshot-create-as", dom.name, "v1", "--disk-only", "--atomic")
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, "v1": "a"}
    dom.json("snapshot-create", dom.name, "b")
    digests = snapshot_digests(dom)
    assert dom.json("snapshot-delete", dom.name, "v1")["action"] == "merged"
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, "b": "a"}
    assert snapshot_digests(dom) == {"a": digests["a"], "b": digests["b"]}
    assert dom.json("check", dom.name)["ok"]


def test_two_virsh_snapshots_then_livesnap_then_the_first_deleted_by_livesnap(make_dom):
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "a")
    dom.write("vda", 1, 0)
    virsh("snapshot-create-as", dom.name, "v1", "--disk-only", "--atomic")
    dom.write("vda", 2, 65536)
    virsh("snapshot-create-as", dom.name, "v2", "--disk-only", "--atomic")
    dom.write("vda", 3, 2 * 65536)
    r = dom.json("snapshot-create", dom.name, "b")
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, "v1": "a", "v2": "v1",
                                                      "b": "v2"}
    digests, live = snapshot_digests(dom), dom.digests()
    assert r["disks"]
    dom.json("snapshot-delete", dom.name, "v1")
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, "v2": "a", "b": "v2"}
    assert snapshot_digests(dom) == {k: v for k, v in digests.items() if k != "v1"}
    assert dom.digests() == live
    assert dom.json("check", dom.name)["ok"]
    # virsh deletes livesnap's current snapshot, then the one it made (current then)
    virsh_ok("snapshot-delete", dom.name, "b")
    virsh_ok("snapshot-delete", dom.name, "v2")
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None}
    assert snapshot_digests(dom) == {"a": digests["a"]}
    assert dom.json("check", dom.name)["ok"] and dom.digests() == live


def test_virsh_internal_snapshot_after_first_use_is_refused_by_name(make_dom):
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "a")
    virsh("snapshot-create-as", dom.name, "int1")     # internal, inside the active qcow2
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "b", expect=2)
    assert "int1" in proc.stderr and "internal" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before
    chk = dom.cli("check", dom.name, expect=1)
    assert "int1" in chk.stdout and "internal" in chk.stdout, chk.stdout
    proc = dom.cli("check", dom.name, "--repair", expect=2)
    assert "int1" in proc.stderr and "internal" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before


def catalog_db(dom):
    return sqlite3.connect(os.path.join(dom.state_dir, dom.dom.UUIDString() + ".db"))


def test_check_repair_adopts_a_snapshot_made_without_metadata(make_dom):
    """No metadata says what happened: commands refuse, check points at --repair."""
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "a")
    dom.write("vda", 1, 0)
    virsh("snapshot-create-as", dom.name, "nometa", "--disk-only", "--atomic", "--no-metadata")
    live = dom.digests()
    refused = dom.cli("snapshot-create", dom.name, "b", expect=1)
    assert "changed outside livesnap" in refused.stderr
    chk = dom.cli("check", dom.name, expect=1)
    assert "check --repair %s" % dom.name in chk.stdout, chk.stdout
    r = dom.json("check", dom.name, "--repair")
    assert r["ok"] and len(r["repaired"]["adopted"]) == 1 and r["repaired"]["gone"] == []
    adopted = r["repaired"]["adopted"][0]
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, adopted: "a"}
    dom.json("snapshot-delete", dom.name, adopted)
    assert livesnap_tree(dom) == {"a": None} and dom.digests() == live


def test_check_repair_brings_back_a_catalog_edited_by_hand(make_dom):
    dom = make_dom(ndisks=2)
    three_snapshots(dom)
    digests, live = snapshot_digests(dom), dom.digests()
    db = catalog_db(dom)
    with db:
        db.execute("UPDATE nodes SET snapshot = NULL, state = 'base' WHERE snapshot = 'b'")
        db.execute("DELETE FROM snapshots WHERE name = 'b'")
    db.close()
    chk = dom.cli("check", dom.name, expect=1)
    assert "check --repair %s" % dom.name in chk.stdout, chk.stdout
    r = dom.json("check", dom.name, "--repair")
    assert r["ok"] and r["repaired"] == {"adopted": ["b"], "gone": []}
    assert livesnap_tree(dom) == virsh_tree(dom) == {"a": None, "b": "a", "c": "b"}
    assert snapshot_digests(dom) == digests and dom.digests() == live


def test_check_repair_refuses_what_it_cannot_explain(make_dom):
    dom = make_dom(ndisks=2)
    dom.json("snapshot-create", dom.name, "a")
    new = os.path.join(dom.dir, "elsewhere.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", new, "8M")
    dom.conn.defineXML(dom.dom.XMLDesc(2).replace(dom.sources()["vdb"], new))
    before = dom.fingerprint()
    chk = dom.cli("check", dom.name, expect=1)
    assert "'livesnap check --repair %s' cannot" % dom.name in chk.stdout, chk.stdout
    proc = dom.cli("check", dom.name, "--repair", expect=1)
    assert "chains do not match" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before


def test_virsh_cannot_merge_a_hidden_image_other_snapshots_read(make_dom):
    """x's image has one child, a hidden image (a, deleted logically: two children). libvirt
    must not commit it into x's image (b and k read it): its metadata names no overlay for
    x, so virsh snapshot-delete refuses and nothing changes."""
    dom = make_dom(ndisks=1)
    for i, name in enumerate(("x", "a", "b")):
        dom.write("vda", 0x30 + i, i * 65536)
        dom.json("snapshot-create", dom.name, name)
    dom.write("vda", 0x40, 0)
    dom.json("snapshot-revert", dom.name, "a", "--keep-current", "k")
    dom.write("vda", 0x41, 65536)
    assert dom.json("snapshot-delete", dom.name, "a")["action"] == "hidden"
    assert livesnap_tree(dom) == virsh_tree(dom) == {"x": None, "b": "x", "k": "b"}
    digests = snapshot_digests(dom)
    dom.dom.create()
    live = dom.digests()
    files = dom.files()
    refused = virsh("snapshot-delete", dom.name, "x", check=False)
    assert refused.returncode != 0, refused.stdout
    assert dom.files() == files and dom.digests() == live
    assert snapshot_digests(dom) == digests
    assert livesnap_tree(dom) == virsh_tree(dom) == {"x": None, "b": "x", "k": "b"}
    assert dom.json("check", dom.name)["ok"]
    dom.json("snapshot-delete", dom.name, "x")
    assert snapshot_digests(dom) == {k: v for k, v in digests.items() if k != "x"}
