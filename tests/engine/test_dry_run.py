"""--dry-run changes nothing anywhere: no catalog is made for a domain seen for the first
time, libvirt's snapshot metadata is not rewritten, no file is touched. (The state
directory and the domain's lock file may be made: the lock is taken to plan on a stable
state.)"""
import hashlib
import os
import subprocess

import pytest

from helpers import URI

LIBVIRT_SNAPSHOTS = "/var/lib/libvirt/qemu/snapshot"


def virsh(*args, check=True):
    return subprocess.run(["virsh", "-q", "-c", URI] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, check=check)


def files_in(directory, skip=lambda name: False):
    """{name: (sha256, mtime_ns, size)} of the files in ``directory``."""
    out = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        p = os.path.join(directory, name)
        if skip(name) or not os.path.isfile(p):
            continue
        with open(p, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        st = os.stat(p)
        out[name] = (digest, st.st_mtime_ns, st.st_size)
    return out


def everything(dom):
    names = virsh("snapshot-list", dom.name, "--name").stdout.split()
    return {
        "images": files_in(dom.dir),
        "state_dir": files_in(dom.state_dir, skip=lambda n: n.endswith(".lock")),
        "libvirt_snapshot_files": files_in(os.path.join(LIBVIRT_SNAPSHOTS, dom.name)),
        "libvirt_snapshots": {n: virsh("snapshot-dumpxml", dom.name, n).stdout
                              for n in names},
        "current": virsh("snapshot-current", dom.name, "--name", check=False).stdout,
        "xml": dom.dom.XMLDesc(2),
    }


def dry_runs(dom, snapshot):
    return [("snapshot-create", dom.name, "new", "--dry-run"),
            ("snapshot-delete", dom.name, snapshot, "--dry-run"),
            ("snapshot-revert", dom.name, snapshot, "--dry-run"),
            ("snapshot-revert", dom.name, snapshot, "--keep-current", "k", "--dry-run"),
            ("reclaim", dom.name, "--dry-run")]


def check_nothing_changes(dom, snapshot):
    for args in dry_runs(dom, snapshot):
        before = everything(dom)
        r = dom.json(*args)
        assert r.get("dry_run") or args[0] == "reclaim", (args, r)
        assert everything(dom) == before, args
        assert not any(n.endswith(".db") for n in os.listdir(dom.state_dir)
                       if os.path.isdir(dom.state_dir)) or before["state_dir"], args


@pytest.mark.parametrize("known", [False, True], ids=["first-seen", "known"])
def test_dry_runs_on_a_domain_with_virsh_snapshots_to_adopt(make_dom, known):
    dom = make_dom(ndisks=2)
    virsh("snapshot-create-as", dom.name, "v1", "--disk-only", "--atomic")
    dom.write("vda", 5, 0)
    virsh("snapshot-create-as", dom.name, "v2", "--disk-only", "--atomic")
    if known:
        dom.json("snapshot-list", dom.name)         # adopted: the catalog exists
        assert any(n.endswith(".db") for n in os.listdir(dom.state_dir))
    check_nothing_changes(dom, "v1")
    if not known:
        assert not os.path.isdir(dom.state_dir) or \
            not any(n.endswith(".db") for n in os.listdir(dom.state_dir))
    # the real commands still adopt and work after the dry runs
    assert dom.json("snapshot-delete", dom.name, "v1")["action"] == "merged"
    assert dom.json("check", dom.name)["ok"]


@pytest.mark.parametrize("known", [False, True], ids=["first-seen", "known"])
def test_dry_runs_on_a_domain_without_snapshots(make_dom, known):
    dom = make_dom(ndisks=1)
    if known:
        dom.json("snapshot-create", dom.name, "s1")
        dom.json("snapshot-create", dom.name, "s2")
        check_nothing_changes(dom, "s1")
    else:
        before = everything(dom)
        r = dom.json("snapshot-create", dom.name, "new", "--dry-run")
        assert r["dry_run"] and everything(dom) == before
        assert not any(n.endswith(".db") for n in os.listdir(dom.state_dir))
        before = everything(dom)
        dom.json("reclaim", dom.name, "--dry-run")
        assert everything(dom) == before


def test_dry_runs_on_a_running_domain(make_dom):
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "s1")
    dom.dom.create()
    try:
        dom.json("snapshot-create", dom.name, "s2")
        for args in (("snapshot-create", dom.name, "new", "--dry-run"),
                     ("snapshot-delete", dom.name, "s1", "--dry-run"),
                     ("snapshot-delete", dom.name, "s2", "--dry-run"),
                     ("reclaim", dom.name, "--dry-run")):
            before = everything(dom)
            before["live"] = dom.dom.XMLDesc(0)
            dom.json(*args)
            after = everything(dom)
            after["live"] = dom.dom.XMLDesc(0)
            assert after == before, args
    finally:
        dom.dom.destroy()
