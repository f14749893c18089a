"""An image something else uses is never written or deleted (issue 16, class 1).

Another domain's linked clone onto a snapshot's image (the golden image), an image in the
storage directory that backs onto it, a user further down the chain: livesnap keeps the
shared image (its node hidden) instead of merging into it or deleting it, and says so; one
image twice in a domain's chains is refused before anything changes; ``check`` names the
users. Real libvirtd, real qemu-img and qemu-io."""
import hashlib
import os
import subprocess
import uuid

import pytest

from helpers import Dom, domain_xml, qemu_img


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def reads(path, pattern, offset, length):
    """The image reads ``pattern`` over [offset, offset+length) through its chain."""
    proc = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c",
                           "read -P %d %d %d" % (pattern, offset, length), path],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    return proc.returncode == 0 and "verification failed" not in proc.stdout and \
        "error" not in proc.stdout.lower()


def write(path, pattern, offset, length):
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %d %d"
                    % (pattern, offset, length), path], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture
def domains(conn, tmp_path):
    """define(disks, directory, start=False, transient=False) -> a Dom over existing images:
    ``disks`` is [(target, path)]; every domain is removed in teardown."""
    made = []

    def define(disks, directory, start=False, transient=False):
        d = Dom.__new__(Dom)
        d.conn = conn
        d.dir = str(directory)
        d.state_dir = str(tmp_path / ("state-%d" % len(made)))
        d.name = "lst-" + uuid.uuid4().hex[:8]
        d.targets = [t for t, _ in disks]
        xml = domain_xml(d.name, [(t, p, "qcow2") for t, p in disks])
        if transient:
            d.dom = conn.createXML(xml, 0)
        else:
            d.dom = conn.defineXML(xml)
            if start:
                d.dom.create()
        made.append(d)
        return d
    yield define
    for d in made:
        d.destroy()


@pytest.fixture
def golden(tmp_path, domains):
    """The issue's example up to the delete: domain A on gold.qcow2 (0x11 over 8 MiB),
    snapshot 'golden' of A, A writes 0x22 over its first MiB."""
    img = tmp_path / "img"
    img.mkdir()
    gold = str(img / "gold.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", gold, "256M")
    write(gold, 0x11, 0, 8 << 20)
    a = domains([("vda", gold)], img)
    a.json("snapshot-create", a.name, "golden")
    leaf = a.sources()["vda"]
    assert leaf != gold
    write(leaf, 0x22, 0, 1 << 20)
    return a, gold, img


def linked_clone(path, backing):
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
    return path


def a_reads_its_own(a):
    leaf = a.sources()["vda"]
    return reads(leaf, 0x22, 0, 1 << 20) and reads(leaf, 0x11, 1 << 20, 7 << 20)


@pytest.mark.parametrize("how", ["defined", "running", "transient"])
def test_golden_image_clone_of_another_domain_keeps_its_data(golden, domains, how):
    a, gold, img = golden
    b_img = linked_clone(str(img / "b.qcow2"), gold)
    b = domains([("vda", b_img)], img, start=how == "running", transient=how == "transient")
    before = sha(gold)
    r = a.json("snapshot-delete", a.name, "golden")
    assert r["action"] == "hidden"
    assert [k["image"] for k in r["in_use"]] == [gold]
    assert any(b.name in u for u in r["in_use"][0]["users"]), r
    assert sha(gold) == before                      # never written
    assert reads(b_img, 0x11, 0, 8 << 20)           # B reads the golden data, not A's
    assert a_reads_its_own(a)
    listing = a.json("snapshot-list", a.name)
    assert listing["snapshots"] == []
    # still listed as hidden
    text = a.cli("snapshot-list", a.name, "--all").stdout
    assert "golden" in text


def test_golden_image_issue_example_text(golden, domains):
    """The issue's commands, with the text output."""
    a, gold, img = golden
    b_img = linked_clone(str(img / "b.qcow2"), gold)
    domains([("vda", b_img)], img)
    before = sha(gold)
    plan = a.cli("snapshot-delete", a.name, "golden", "--dry-run").stdout
    assert "is kept: also used by domain" in plan, plan
    assert sha(gold) == before
    out = a.cli("snapshot-delete", a.name, "golden").stdout
    assert "kept %s: also used by domain" % gold in out, out
    assert reads(b_img, 0x11, 0, 1 << 20)
    assert not reads(b_img, 0x22, 0, 1 << 20)
    assert a_reads_its_own(a)


@pytest.mark.parametrize("where", ["image-dir", "storage-dir"])
def test_unregistered_image_backing_onto_it(golden, tmp_path, where):
    """No domain uses it: an image file in the storage directories backs onto the
    snapshot's image (through another unregistered image, for --storage-dir)."""
    a, gold, img = golden
    args = ()
    if where == "image-dir":
        clone = linked_clone(str(img / "clone.qcow2"), gold)
    else:
        other = tmp_path / "pool"
        other.mkdir()
        mid = linked_clone(str(other / "mid.qcow2"), gold)
        clone = linked_clone(str(other / "top.qcow2"), mid)
        args = ("--storage-dir", str(img), "--storage-dir", str(other))
    before = sha(gold)
    r = a.json("snapshot-delete", a.name, "golden", *args)
    assert r["action"] == "hidden"
    assert any(clone in u for u in r["in_use"][0]["users"]), r
    assert sha(gold) == before
    assert reads(clone, 0x11, 0, 8 << 20)
    assert a_reads_its_own(a)


def test_user_further_down_the_chain(tmp_path, domains):
    """A's chain gold (s1) <- mid (s2) <- leaf. B backs onto mid: deleting s1 would commit
    mid into gold and delete mid (B's backing file) or write mid; C backs onto gold:
    deleting s2 then s1 must never write gold."""
    img = tmp_path / "img"
    img.mkdir()
    gold = str(img / "gold.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", gold, "64M")
    write(gold, 0x11, 0, 4 << 20)
    a = domains([("vda", gold)], img)
    a.json("snapshot-create", a.name, "s1")
    mid = a.sources()["vda"]
    write(mid, 0x33, 1 << 20, 1 << 20)
    a.json("snapshot-create", a.name, "s2")
    write(a.sources()["vda"], 0x22, 0, 1 << 20)
    b_img = linked_clone(str(img / "b.qcow2"), mid)
    domains([("vda", b_img)], img)
    sums = {p: sha(p) for p in (gold, mid)}
    r = a.json("snapshot-delete", a.name, "s1")
    assert r["action"] == "hidden", r
    assert {p: sha(p) for p in (gold, mid)} == sums
    assert reads(b_img, 0x11, 0, 1 << 20) and reads(b_img, 0x33, 1 << 20, 1 << 20)
    # s2 (mid, which B reads) cannot be merged either; gold stays under it
    r = a.json("snapshot-delete", a.name, "s2")
    assert r["action"] == "hidden", r
    assert {p: sha(p) for p in (gold, mid)} == sums
    assert reads(b_img, 0x11, 0, 1 << 20) and reads(b_img, 0x33, 1 << 20, 1 << 20)
    leaf = a.sources()["vda"]
    assert reads(leaf, 0x22, 0, 1 << 20) and reads(leaf, 0x33, 1 << 20, 1 << 20) and \
        reads(leaf, 0x11, 2 << 20, 2 << 20)
    assert a.json("check", a.name)["ok"]


def test_user_of_an_ancestor_when_merging_above_it(tmp_path, domains):
    """C backs onto gold, the bottom of A's chain gold (s1) <- mid (s2) <- leaf: s2 merges
    (gold is not touched), s1 stays hidden under it."""
    img = tmp_path / "img"
    img.mkdir()
    gold = str(img / "gold.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", gold, "64M")
    write(gold, 0x11, 0, 4 << 20)
    a = domains([("vda", gold)], img)
    a.json("snapshot-create", a.name, "s1")
    write(a.sources()["vda"], 0x33, 1 << 20, 1 << 20)
    a.json("snapshot-create", a.name, "s2")
    write(a.sources()["vda"], 0x22, 0, 1 << 20)
    c_img = linked_clone(str(img / "c.qcow2"), gold)
    c = domains([("vda", c_img)], img)
    before = sha(gold)
    assert a.json("snapshot-delete", a.name, "s2")["action"] == "merged"
    r = a.json("snapshot-delete", a.name, "s1")
    assert r["action"] == "hidden" and any(c.name in u for u in r["in_use"][0]["users"])
    assert sha(gold) == before and os.path.exists(gold)
    assert reads(c_img, 0x11, 0, 4 << 20)
    leaf = a.sources()["vda"]
    assert reads(leaf, 0x22, 0, 1 << 20) and reads(leaf, 0x33, 1 << 20, 1 << 20) and \
        reads(leaf, 0x11, 2 << 20, 2 << 20)


def test_hidden_node_with_a_user_is_never_reclaimed(golden, domains):
    a, gold, img = golden
    b_img = linked_clone(str(img / "b.qcow2"), gold)
    b = domains([("vda", b_img)], img)
    before = sha(gold)
    a.json("snapshot-delete", a.name, "golden")
    r = a.json("reclaim", a.name)
    assert r["reclaimed"] == [] and [k["image"] for k in r["in_use"]] == [gold]
    a.json("snapshot-create", a.name, "later")      # the cascade runs here too
    a.json("snapshot-delete", a.name, "later")
    assert sha(gold) == before and reads(b_img, 0x11, 0, 8 << 20)
    assert a.json("check", a.name)["reclaimable"] == []
    # once the user is gone, the hidden node is reclaimed
    b.destroy()
    os.unlink(b_img)
    assert a.json("check", a.name)["reclaimable"] == ["golden"]
    r = a.json("reclaim", a.name)
    assert r["reclaimed"] == ["golden"]
    assert not os.path.exists(gold) or gold == a.sources()["vda"]
    assert a_reads_its_own(a)


def test_check_names_the_users(golden, domains):
    a, gold, img = golden
    b_img = linked_clone(str(img / "b.qcow2"), gold)
    b = domains([("vda", b_img)], img)
    r = a.json("check", a.name)
    assert r["ok"], r
    assert any(gold in n and b.name in n for n in r["notes"]), r
    text = a.cli("check", a.name).stdout
    assert "note:" in text and b.name in text
    # a domain reading the image A writes is a problem
    leaf = a.sources()["vda"]
    c_img = linked_clone(str(img / "c.qcow2"), leaf)
    c = domains([("vda", c_img)], img)
    proc = a.cli("check", a.name, expect=1)
    assert c.name in proc.stdout and leaf in proc.stdout, proc.stdout


def test_revert_would_delete_a_leaf_another_domain_reads(golden, domains):
    a, gold, img = golden
    leaf = a.sources()["vda"]
    c = domains([("vda", linked_clone(str(img / "c.qcow2"), leaf))], img)
    before = a.fingerprint()
    proc = a.cli("snapshot-revert", a.name, "golden", expect=1)
    assert proc.stderr.startswith("error: ") and c.name in proc.stderr and leaf in proc.stderr
    assert a.fingerprint() == before
    # keeping the current state keeps the leaf where it is: allowed
    leaf_sum = sha(leaf)
    a.json("snapshot-revert", a.name, "golden", "--keep-current", "mine")
    assert sha(leaf) == leaf_sum and reads(c.sources()["vda"], 0x22, 0, 1 << 20)


@pytest.mark.parametrize("how", ["same-path", "hardlink", "symlink", "overlay"])
def test_same_image_twice_in_one_domain_is_refused(tmp_path, domains, how):
    img = tmp_path / "img"
    img.mkdir()
    x = str(img / "x.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", x, "16M")
    write(x, 0x11, 0, 1 << 20)
    y = str(img / "y.qcow2")
    if how == "same-path":
        y = x
    elif how == "hardlink":
        os.link(x, y)
    elif how == "symlink":
        os.symlink(x, y)
    else:
        linked_clone(y, x)                  # vdb's chain holds vda's image
    a = domains([("vda", x), ("vdb", y)], img)
    before = a.fingerprint()
    for args in (["snapshot-create", a.name, "s1"], ["snapshot-list", a.name]):
        proc = a.cli(*args, expect=1)
        err = proc.stderr.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        assert "vda" in err and "vdb" in err and x in err, err
        assert a.fingerprint() == before


def test_two_disks_on_one_template_are_accepted(tmp_path, domains):
    """Two disks over one base image (a template livesnap never writes) stay allowed."""
    img = tmp_path / "img"
    img.mkdir()
    base = str(img / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    write(base, 0x11, 0, 1 << 20)
    a = domains([("vda", linked_clone(str(img / "a.qcow2"), base)),
                 ("vdb", linked_clone(str(img / "b.qcow2"), base))], img)
    before = sha(base)
    a.json("snapshot-create", a.name, "s1")
    a.json("snapshot-delete", a.name, "s1")
    assert sha(base) == before
    assert a.json("check", a.name)["ok"]


def test_another_disk_of_the_same_domain_that_livesnap_does_not_manage(golden):
    """A read-only disk of A itself (not snapshottable, not in the catalog) backs onto the
    snapshot's image."""
    from lxml import etree
    a, gold, img = golden
    clone = linked_clone(str(img / "ro.qcow2"), gold)
    root = etree.fromstring(a.dom.XMLDesc(2))
    disk = etree.fromstring("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                            "<source file='%s'/><target dev='vdb' bus='virtio'/><readonly/>"
                            "</disk>" % clone)
    root.find("devices").append(disk)
    a.dom = a.conn.defineXML(etree.tostring(root, encoding="unicode"))
    before = sha(gold)
    r = a.json("snapshot-delete", a.name, "golden")
    assert r["action"] == "hidden"
    assert any("disk vdb" in u and a.name in u for u in r["in_use"][0]["users"]), r
    assert sha(gold) == before and reads(clone, 0x11, 0, 8 << 20)
    assert a_reads_its_own(a)


def test_golden_image_while_the_domain_runs(golden, domains):
    """The same on the live datapath (block jobs in A's QEMU): nothing is committed into
    the image B's clone reads."""
    a, gold, img = golden
    b_img = linked_clone(str(img / "b.qcow2"), gold)
    b = domains([("vda", b_img)], img)
    a.dom.create()
    before = sha(gold)
    r = a.json("snapshot-delete", a.name, "golden")
    assert r["datapath"] == "libvirt-live" and r["action"] == "hidden", r
    assert any(b.name in u for u in r["in_use"][0]["users"]), r
    assert sha(gold) == before and reads(b_img, 0x11, 0, 8 << 20)
    a.dom.destroy()
    assert a_reads_its_own(a)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_clone_through_another_name_of_the_image(golden, domains, tmp_path, link):
    """B's clone names the golden image by a symlink or a hard link in a directory livesnap
    does not scan: the same file all the same."""
    a, gold, img = golden
    other = tmp_path / "elsewhere"
    other.mkdir()
    alias = str(other / "template.qcow2")
    (os.symlink if link == "symlink" else os.link)(gold, alias)
    b_img = linked_clone(str(other / "b.qcow2"), alias)
    b = domains([("vda", b_img)], other)
    before = sha(gold)
    r = a.json("snapshot-delete", a.name, "golden")
    assert r["action"] == "hidden" and any(b.name in u for u in r["in_use"][0]["users"]), r
    assert sha(gold) == before and reads(b_img, 0x11, 0, 8 << 20)
    assert a_reads_its_own(a)


def test_check_is_quiet_about_a_shared_template(tmp_path, domains):
    """Two domains over one template: a base livesnap never writes, no note."""
    img = tmp_path / "img"
    img.mkdir()
    base = str(img / "base.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    a = domains([("vda", linked_clone(str(img / "a.qcow2"), base))], img)
    domains([("vda", linked_clone(str(img / "b.qcow2"), base))], img)
    a.json("snapshot-create", a.name, "s1")
    r = a.json("check", a.name)
    assert r["ok"] and r["notes"] == [], r
