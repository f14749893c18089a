"""Snapshots made with virsh are adopted: livesnap deletes them too, including the cases
libvirt refuses, and libvirt's snapshot list stays in step with livesnap's."""
import os
import subprocess

from helpers import URI, chain_digest, qemu_img


def virsh(*args, check=True):
    return subprocess.run(["virsh", "-q", "-c", URI] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, check=check)


def virsh_tree(dom):
    """{name: parent} from libvirt's own snapshot metadata."""
    out = {}
    for name in virsh("snapshot-list", dom.name, "--name").stdout.split():
        parent = virsh("snapshot-parent", dom.name, name, check=False)
        out[name] = parent.stdout.strip() if parent.returncode == 0 else None
    return out


def livesnap_tree(dom):
    return {s["name"]: s["parent"] for s in dom.json("snapshot-list", dom.name)["snapshots"]}


def test_virsh_snapshot_with_two_children_deleted_logically_then_reclaimed(make_dom):
    dom = make_dom(ndisks=2)
    dom.write("vda", 1, 0)
    virsh("snapshot-create-as", dom.name, "s1", "--disk-only", "--atomic")
    dom.write("vda", 2, 65536)
    virsh("snapshot-create-as", dom.name, "s2", "--disk-only", "--atomic")
    s2_images = dict(dom.sources())
    # revert to s1 as libvirt >= 9.9 does it (9.0 cannot revert external snapshots): new
    # overlays on s1's images, the overlays of the current snapshot deleted, s1 current
    s1_images = {}
    for t in dom.targets:
        s1_images[t] = os.path.join(dom.dir, "%s.qcow2" % t)
        new = os.path.join(dom.dir, "%s.branch2" % t)
        qemu_img("create", "-q", "-f", "qcow2", "-b", s1_images[t], "-F", "qcow2", new)
        os.unlink(s2_images[t])
    xml = dom.dom.XMLDesc(2)
    for t in dom.targets:
        xml = xml.replace(s2_images[t], os.path.join(dom.dir, "%s.branch2" % t))
    dom.conn.defineXML(xml)
    virsh("snapshot-current", dom.name, "s1")
    dom.write("vdb", 3, 0)
    virsh("snapshot-create-as", dom.name, "s3", "--disk-only", "--atomic")
    dom.write("vdb", 4, 65536)
    assert virsh_tree(dom) == {"s1": None, "s2": "s1", "s3": "s1"}
    # libvirt refuses this one ("multiple children" in newer releases; 9.0 fails to find
    # the chain), and changes nothing
    files = dom.files()
    refused = virsh("snapshot-delete", dom.name, "s1", check=False)
    assert refused.returncode != 0 and "Failed to delete snapshot s1" in refused.stderr
    assert dom.files() == files and virsh_tree(dom) == {"s1": None, "s2": "s1", "s3": "s1"}

    # livesnap adopts the tree as it is on disk
    listing = dom.json("snapshot-list", dom.name)
    assert livesnap_tree(dom) == {"s1": None, "s2": "s1", "s3": "s1"}
    expect = {s["name"]: {d["target"]: chain_digest(d["image"]) for d in s["disks"]}
              for s in listing["snapshots"]}
    live = dom.digests()
    assert {d["target"]: d["image"] for d in
            [s for s in listing["snapshots"] if s["name"] == "s1"][0]["disks"]} == s1_images

    r = dom.json("snapshot-delete", dom.name, "s1")
    assert r["action"] == "hidden" and r["reclaimed"] == []
    assert virsh_tree(dom) == livesnap_tree(dom) == {"s2": None, "s3": None}
    all_ = {s["name"]: s["state"] for s in dom.json("snapshot-list", dom.name, "--all")["snapshots"]}
    assert all_["s1"] == "hidden"

    r = dom.json("snapshot-delete", dom.name, "s2")      # s1's image is left with one child
    assert r["action"] == "deleted" and r["reclaimed"] == ["s1"]
    assert virsh_tree(dom) == livesnap_tree(dom) == {"s3": None}
    got = {d["target"]: chain_digest(d["image"])
           for d in dom.json("snapshot-list", dom.name)["snapshots"][0]["disks"]}
    assert got == expect["s3"]
    assert dom.digests() == live
    assert dom.json("check", dom.name)["ok"]
    # what is left on disk: the two bases, s3's images (merged with s1's) and the live ones
    assert len(dom.files()) == 6


def test_livesnap_snapshots_show_in_virsh(make_dom):
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "a", "--description", "first")
    dom.json("snapshot-create", dom.name, "b")
    assert virsh_tree(dom) == {"a": None, "b": "a"}
    assert "first" in virsh("snapshot-dumpxml", dom.name, "a").stdout
    assert virsh("snapshot-current", dom.name, "--name").stdout.strip() == "b"
    dom.json("snapshot-revert", dom.name, "a", "--keep-current", "c")
    assert virsh_tree(dom) == {"a": None, "b": "a", "c": "b"}
    assert virsh("snapshot-current", dom.name, "--name").stdout.strip() == "a"
    dom.json("snapshot-delete", dom.name, "a")          # two children: hidden
    assert virsh_tree(dom) == {"b": None, "c": "b"}
    assert dom.json("check", dom.name)["ok"]


def test_memory_and_internal_snapshots_are_refused(make_dom):
    dom = make_dom(ndisks=1, base=False)
    virsh("snapshot-create-as", dom.name, "internal1")      # internal, in the qcow2
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "x", expect=2)
    assert "internal" in proc.stderr
    assert dom.fingerprint() == before


def test_metadata_rewritten_only_where_it_changed(make_dom):
    """libvirt's definition of a snapshot that an operation leaves as it was is not redefined
    (its file keeps its mtime); one whose parent or current state changes is."""
    dom = make_dom(ndisks=1)
    for name in ("a", "b", "c"):
        dom.json("snapshot-create", dom.name, name)
    files = {n: os.path.join("/var/lib/libvirt/qemu/snapshot", dom.name, n + ".xml")
             for n in ("a", "b", "c")}
    os.utime(files["a"], (1, 1))
    os.utime(files["b"], (1, 1))
    dom.json("snapshot-delete", dom.name, "b")          # c's parent becomes a
    assert os.stat(files["a"]).st_mtime == 1
    assert os.stat(files["c"]).st_mtime > 1
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None, "c": "a"}
    assert virsh("snapshot-current", dom.name, "--name").stdout.strip() == "c"
    os.utime(files["c"], (1, 1))
    dom.json("snapshot-create", dom.name, "d")          # d becomes current: c is rewritten
    assert os.stat(files["a"]).st_mtime == 1
    assert virsh("snapshot-current", dom.name, "--name").stdout.strip() == "d"
    assert virsh_tree(dom) == livesnap_tree(dom) == {"a": None, "c": "a", "d": "c"}
    assert dom.json("check", dom.name)["ok"]


def snapshot_state(dom, name):
    from xml.etree import ElementTree
    return ElementTree.fromstring(virsh("snapshot-dumpxml", dom.name, name).stdout) \
        .findtext("state")


def test_snapshot_taken_shut_off_stays_in_step_once_the_domain_runs(make_dom):
    """libvirt records the state a snapshot was taken in ("shutoff" or "disk-snapshot") and
    refuses a redefinition that changes it; taking one while running makes the shut-off
    one's definition change (it stops being current), and merging it changes its child's."""
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "off1")
    dom.dom.create()                  # no bootable disk: the firmware idles, QEMU runs
    dom.json("snapshot-create", dom.name, "on1")
    assert virsh_tree(dom) == livesnap_tree(dom) == {"off1": None, "on1": "off1"}
    assert virsh("snapshot-current", dom.name, "--name").stdout.strip() == "on1"
    assert (snapshot_state(dom, "off1"), snapshot_state(dom, "on1")) == \
        ("shutoff", "disk-snapshot")
    dom.json("snapshot-create", dom.name, "on2")
    r = dom.json("snapshot-delete", dom.name, "off1")   # merged with its one child, live
    assert r["action"] == "merged"
    assert virsh_tree(dom) == livesnap_tree(dom) == {"on1": None, "on2": "on1"}
    assert dom.json("check", dom.name)["ok"]
    dom.dom.destroy()
    dom.json("snapshot-create", dom.name, "off2")       # shut off again: after on2
    assert virsh_tree(dom) == livesnap_tree(dom) == {"on1": None, "on2": "on1",
                                                      "off2": "on2"}
    assert snapshot_state(dom, "off2") == "shutoff"
