"""Bad input gets a clear error (one line on stderr, exit 1; usage errors exit 2) and
changes nothing: image files byte for byte, the domain definition, the catalog."""
import os
import subprocess

import pytest

from livesnap.lock import DomainLock

from helpers import qemu_img


@pytest.fixture
def dom(make_dom):
    d = make_dom(ndisks=2)
    d.write("vda", 1, 0)
    d.json("snapshot-create", d.name, "s1")
    d.write("vda", 2, 65536)
    return d


def refused(dom, args, words, rc=1):
    before = dom.fingerprint()
    proc = dom.cli(*args, expect=rc)
    err = proc.stderr.strip()
    assert err.startswith("error: ") or rc == 2, err
    assert len(err.splitlines()) == 1 or rc == 2, err
    for w in words:
        assert w in err, (w, err)
    assert dom.fingerprint() == before
    return err


def test_unknown_domain(dom):
    refused(dom, ["snapshot-create", "no-such-domain-xyz", "s"], ["no-such-domain-xyz",
                                                                  "not found"])
    refused(dom, ["snapshot-list", "no-such-domain-xyz"], ["not found"])


def test_unknown_snapshot(dom):
    refused(dom, ["snapshot-delete", dom.name, "nope"], ["no snapshot named 'nope'"])
    refused(dom, ["snapshot-revert", dom.name, "nope"], ["no snapshot named 'nope'"])


def test_duplicate_name(dom):
    refused(dom, ["snapshot-create", dom.name, "s1"], ["already has a snapshot named 's1'"])
    refused(dom, ["snapshot-revert", dom.name, "s1", "--keep-current", "s1"], ["'s1'"])


def test_bad_names_are_usage_errors(dom):
    for bad in ["../etc", "a/b", "", ".hidden", "x" * 200, "s1\n", "a b"]:
        refused(dom, ["snapshot-create", dom.name, bad], ["invalid snapshot name"], rc=2)


def test_unknown_disk(dom):
    refused(dom, ["snapshot-create", dom.name, "s9", "--disk", "sdz"], ["sdz"], rc=2)


def test_revert_of_a_running_domain_is_refused(dom):
    dom.dom.create()
    try:
        refused(dom, ["snapshot-revert", dom.name, "s1"], ["running", "virsh shutdown"])
    finally:
        dom.dom.destroy()


def test_corrupt_qcow2_header(dom):
    path = dom.sources()["vda"]
    with open(path, "r+b") as f:
        f.seek(0)
        f.write(b"XXXX")                        # qcow2 magic gone
    refused(dom, ["snapshot-create", dom.name, "s9"], ["bad image", path])
    refused(dom, ["snapshot-delete", dom.name, "s1"], ["bad image", path])


def test_truncated_image(dom):
    s1 = dom.json("snapshot-list", dom.name)["snapshots"][0]["disks"][1]["image"]
    os.truncate(s1, 100)
    refused(dom, ["snapshot-delete", dom.name, "s1"], ["bad image", s1])


def test_corrupt_image_on_first_sight(make_dom):
    d = make_dom(ndisks=1)
    path = d.sources()["vda"]
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(b"\xff\xff\xff\xff")          # absurd qcow2 version
    refused(d, ["snapshot-create", d.name, "s1"], ["bad image"])


def test_backing_chain_with_a_cycle(make_dom):
    d = make_dom(ndisks=1)
    leaf = d.sources()["vda"]
    base = os.path.join(d.dir, "vda-base.qcow2")
    qemu_img("rebase", "-u", "-b", leaf, "-F", "qcow2", base)     # base -> leaf -> base
    err = refused(d, ["snapshot-create", d.name, "s1"], ["bad image"])
    assert "loop" in err or "chain" in err


def test_missing_backing_file(make_dom):
    d = make_dom(ndisks=1)
    os.unlink(os.path.join(d.dir, "vda-base.qcow2"))
    refused(d, ["snapshot-create", d.name, "s1"], ["bad image", "vda-base.qcow2"])


def test_missing_snapshot_image(dom):
    s1 = dom.json("snapshot-list", dom.name)["snapshots"][0]["disks"][0]["image"]
    os.rename(s1, s1 + ".moved")
    refused(dom, ["snapshot-delete", dom.name, "s1"], ["bad image", "missing"])
    os.rename(s1 + ".moved", s1)


def test_wrong_parent(dom):
    """An image whose backing file is not the parent the catalog recorded."""
    leaf = dom.sources()["vdb"]
    other = os.path.join(dom.dir, "other.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, "8M")
    qemu_img("rebase", "-u", "-b", other, "-F", "qcow2", leaf)
    refused(dom, ["snapshot-create", dom.name, "s9"], ["backing file is", other])
    refused(dom, ["snapshot-delete", dom.name, "s1"], ["backing file is", other])


def test_disk_changed_outside_livesnap(dom):
    new = os.path.join(dom.dir, "elsewhere.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", new, "8M")
    xml = dom.dom.XMLDesc(2).replace(dom.sources()["vdb"], new)
    dom.conn.defineXML(xml)
    refused(dom, ["snapshot-create", dom.name, "s9"], ["changed outside livesnap"])
    assert dom.cli("check", dom.name, expect=1).returncode == 1


def test_path_outside_storage(dom):
    refused(dom, ["snapshot-create", dom.name, "s9", "--storage-dir", "/srv/nowhere"],
            ["outside the storage directory"])


def test_chain_too_deep(dom):
    refused(dom, ["snapshot-create", dom.name, "s9", "--max-depth", "3"], ["limit 3"])


def test_concurrent_command_on_the_same_domain(dom):
    uuid = dom.dom.UUIDString()
    with DomainLock(os.path.join(dom.state_dir, uuid + ".lock"), dom.name):
        refused(dom, ["snapshot-create", dom.name, "s9"], ["another livesnap command"])
        refused(dom, ["snapshot-delete", dom.name, "s1"], ["another livesnap command"])
    dom.json("snapshot-create", dom.name, "s9")       # free again


def test_two_real_commands_race(dom):
    """Two livesnap processes at once: exactly one creates, the other is refused."""
    env = dom.env()
    import sys
    procs = [subprocess.Popen([sys.executable, "-m", "livesnap", "snapshot-create",
                               dom.name, "race%d" % i], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    busy = [r for r in results if r[0] == 1]
    assert len(ok) >= 1 and len(ok) + len(busy) == 4
    assert all("another livesnap command" in e for _, e in busy)
    names = [s["name"] for s in dom.json("snapshot-list", dom.name)["snapshots"]]
    assert len(names) == 1 + len(ok)
    assert dom.json("check", dom.name)["ok"]


def test_no_space_for_a_merge(make_dom, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)
    try:
        d = make_dom(ndisks=1, base=False, sub="small/d")
        for i in range(24):                       # 1.5 MiB in the snapshot
            d.write("vda", 1, i * 65536)
        d.json("snapshot-create", d.name, "s1")
        for i in range(40):                       # 2.5 MiB in the child: pull moves 1.5 MiB
            d.write("vda", 2, i * 65536)
        # fill the file system so that the merge cannot fit
        st = os.statvfs(str(mnt))
        free = st.f_bavail * st.f_frsize
        with open(str(mnt / "filler"), "wb") as f:
            f.write(b"\1" * (free - 512 * 1024))
        refused(d, ["snapshot-delete", d.name, "s1"], ["not enough space"])
        os.unlink(str(mnt / "filler"))
        assert d.json("snapshot-delete", d.name, "s1")["action"] == "merged"
        d.destroy()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
