"""Other tools' work on a domain: a block job livesnap did not start (a user's blockcopy,
blockcommit, blockpull, on any disk), libvirt checkpoints and persistent dirty bitmaps. A
changing command refuses them before anything changes, and never pivots or aborts a job
that is not its own.

The running domains here have no bootable disk: the firmware idles, QEMU runs (a live
QEMU for block jobs without a guest to boot)."""
import os
import subprocess
import time

import pytest

from helpers import URI, qemu_img


def virsh(*args, check=True):
    # a timeout: a virsh waiting on an event libvirtd never sends fails the test, not the run
    return subprocess.run(["virsh", "-q", "-c", URI] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, check=check,
                          timeout=120)


def everything(dom):
    """What a refused command must leave as it was: image files (names, bytes), the
    domain's live and persistent XML, libvirt's snapshot definitions, the state directory's
    files but the lock, and the catalog's rows."""
    fp = dom.fingerprint()
    fp["live_xml"] = dom.dom.XMLDesc(0)
    names = virsh("snapshot-list", dom.name, "--name").stdout.split()
    fp["libvirt_snapshots"] = {n: virsh("snapshot-dumpxml", dom.name, n).stdout for n in names}
    # (the domain's lock file may be made: the command takes the lock to look)
    fp["state_dir"] = sorted(n for n in os.listdir(dom.state_dir) if not n.endswith(".lock")) \
        if os.path.isdir(dom.state_dir) else []
    return fp


def job(dom, disk):
    return dom.dom.blockJobInfo(disk, 0)


def mirror_ready(dom, disk):
    """Wait until the live XML shows the user's mirror ready (libvirt marks it when it
    handles QEMU's event). The jobs are started without virsh's --wait, which waits for
    libvirt's ready event with no timeout: in one CI run three such virsh never returned
    although their jobs showed 100 %, and the run hung."""
    from xml.etree import ElementTree
    for _ in range(1200):
        root = ElementTree.fromstring(dom.dom.XMLDesc(0))
        for d in root.findall("./devices/disk"):
            m = d.find("mirror")
            if d.find("target").get("dev") == disk and m is not None and \
                    m.get("ready") == "yes":
                return
        time.sleep(0.05)
    raise AssertionError("the mirror of %s/%s never became ready" % (dom.name, disk))


@pytest.fixture
def running(make_dom):
    """A running domain with two disks, each on a base image, livesnap snapshots s1 and s2
    (s1 taken shut off, s2 live: snapshot-delete s1 is a live merge)."""
    made = []

    def make():
        dom = make_dom(ndisks=2)
        dom.json("snapshot-create", dom.name, "s1")
        dom.write("vda", 7, 0, 1 << 20)      # a MiB for a slow pull to stream
        dom.dom.create()
        dom.json("snapshot-create", dom.name, "s2")
        made.append(dom)
        return dom
    yield make
    for dom in made:
        for t in dom.targets:
            try:
                dom.dom.blockJobAbort(t, 0)
            except Exception:
                pass


def refused(dom, args, *words, moving=None):
    """``moving``: an image the user's job itself writes meanwhile (a pull's target)."""
    def state():
        fp = everything(dom)
        fp["files"].pop(moving, None)
        return fp
    before = state()
    proc = dom.cli(*args, expect=1)
    assert proc.stderr.startswith("error: ") and "did not start" in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert state() == before
    return proc


def test_users_blockcopy_is_not_taken_for_livesnaps_commit(running, tmp_path):
    dom = running()
    dest = str(tmp_path / "copy.qcow2")
    # mirror_ready: the copy is in its mirroring phase (ready, until the user pivots or aborts
    # it) before livesnap looks, so the live XML does not change under the comparison
    virsh("blockcopy", dom.name, "vda", dest, "--transient-job")
    mirror_ready(dom, "vda")
    assert job(dom, "vda")["type"] == 2
    for args in (("snapshot-delete", dom.name, "s1"), ("snapshot-delete", dom.name, "s2"),
                 ("snapshot-create", dom.name, "s3"), ("reclaim", dom.name),
                 ("snapshot-delete", dom.name, "s1", "--dry-run")):
        refused(dom, args, "copy job on disk vda", "destination %s" % dest)
    # the user's copy runs on, untouched; once it is gone, livesnap merges
    assert job(dom, "vda")["type"] == 2
    dom.dom.blockJobAbort("vda", 0)
    live = dom.digests()
    assert dom.json("snapshot-delete", dom.name, "s1")["action"] == "merged"
    r = dom.json("snapshot-delete", dom.name, "s2")      # into the active image: its own jobs
    assert r["action"] == "merged" and len(r["merges"]) == 2
    assert not any(m["fallback"] for m in r["merges"])
    assert dom.digests() == live
    assert dom.json("check", dom.name)["ok"]


def test_users_commit_and_pull_with_a_bandwidth_limit_are_refused(running):
    dom = running()
    # an active commit of vdb's top image (s2's overlay) into s2's image: it stays until
    # the user pivots or aborts it
    virsh("blockcommit", dom.name, "vdb", "--active", "--shallow", "--bandwidth", "1")
    mirror_ready(dom, "vdb")
    assert job(dom, "vdb")["type"] == 4
    refused(dom, ("snapshot-delete", dom.name, "s1"), "active commit job on disk vdb")
    assert job(dom, "vdb")["type"] == 4
    dom.dom.blockJobAbort("vdb", 0)
    # a pull of a MiB of data at 512 bytes a second: still running while livesnap looks
    virsh("blockpull", dom.name, "vda", "--bandwidth", "512", "--bytes")
    assert job(dom, "vda")["type"] == 1
    refused(dom, ("snapshot-delete", dom.name, "s2"), "pull job on disk vda",
            moving=os.path.basename(dom.sources()["vda"]))
    assert job(dom, "vda")["type"] == 1


def test_a_job_on_another_disk_than_the_merged_one_is_refused(running, tmp_path):
    dom = running()
    dom.json("snapshot-create", dom.name, "only-vda", "--disk", "vda")
    dest = str(tmp_path / "vdb-copy.qcow2")
    virsh("blockcopy", dom.name, "vdb", dest, "--transient-job")
    mirror_ready(dom, "vdb")
    # the merge touches vda alone; the user's copy of vdb refuses it all the same
    refused(dom, ("snapshot-delete", dom.name, "only-vda"), "copy job on disk vdb", dest)
    assert job(dom, "vdb")["type"] == 2


def node_bitmaps(dom):
    """{image file: [bitmap names]} of the running domain's images, as QEMU holds them."""
    import json
    out = json.loads(virsh("qemu-monitor-command", dom.name,
                           '{"execute":"query-named-block-nodes","arguments":{"flat":true}}'
                           ).stdout)["return"]
    return {n["file"]: sorted(b["name"] for b in n.get("dirty-bitmaps", []))
            for n in out if n["drv"] == "qcow2"}


def test_checkpoints_do_not_refuse_a_merge_libvirt_keeps_their_bitmaps(running):
    """libvirt 9.0 merges the bitmaps of the images a block job merges: a domain with
    checkpoints is merged, and the checkpoint's bitmaps stay in the images that remain
    (tests/online/test_bitmaps_live.py reads an incremental backup after such merges)."""
    dom = running()
    virsh("checkpoint-create-as", dom.name, "cp1")
    dom.json("snapshot-create", dom.name, "s3")
    assert dom.json("snapshot-delete", dom.name, "s1")["action"] == "merged"
    assert dom.json("snapshot-delete", dom.name, "s3")["action"] == "merged"
    held = node_bitmaps(dom)
    for t, top in dom.sources().items():
        assert held[top] == ["cp1"], (t, held)
    assert virsh("checkpoint-list", dom.name, "--name").stdout.split() == ["cp1"]


def test_a_bitmap_missing_from_the_upper_image_refuses_a_live_merge(make_dom):
    """A bitmap of the lower image removed by hand from the one above it, an intermediate
    image of the running chain, and found again in the active image: the changes made in
    the middle image are in no bitmap (libvirt calls the chain broken). A commit would make
    the bitmap's chain look whole without them: refused, nothing changed."""
    dom = make_dom(ndisks=2)
    lower = dom.sources()["vdb"]
    qemu_img("bitmap", "--add", lower, "b")
    dom.json("snapshot-create", dom.name, "s1")           # carries b into the overlay
    upper = dom.sources()["vdb"]
    qemu_img("bitmap", "--remove", upper, "b")
    dom.json("snapshot-create", dom.name, "s2")
    qemu_img("bitmap", "--add", dom.sources()["vdb"], "b")
    dom.dom.create()
    try:
        for args in (("snapshot-delete", dom.name, "s1"),
                     ("snapshot-delete", dom.name, "s1", "--dry-run")):
            before = everything(dom)
            proc = dom.cli(*args, expect=1)
            assert "dirty bitmap b in %s is missing from %s above it" % (lower, upper) \
                in proc.stderr, proc.stderr
            assert everything(dom) == before
    finally:
        dom.dom.destroy()


def test_a_qcow2_bitmap_in_a_merged_image_is_kept_offline(make_dom):
    """A bitmap added by hand to the lower image of a shut-off domain's merge: the merge
    goes ahead and the image that remains carries it (tests/engine/test_bitmaps_offline.py
    reads what it marks)."""
    dom = make_dom(ndisks=2)
    dom.json("snapshot-create", dom.name, "s1")
    dom.json("snapshot-create", dom.name, "s2")
    s1 = {d["target"]: d["image"] for d in
          dom.json("snapshot-list", dom.name)["snapshots"][0]["disks"]}
    qemu_img("bitmap", "--add", s1["vdb"], "backup-0")
    # the merge moves the lower image's bitmap into the image that remains of the two
    assert dom.json("snapshot-delete", dom.name, "s1")["action"] == "merged"
    import json
    chain = json.loads(qemu_img("info", "-U", "--output=json", "--backing-chain",
                                dom.sources()["vdb"]))
    held = {e["filename"]: [b["name"] for b in (e.get("format-specific") or {}).get(
        "data", {}).get("bitmaps") or []] for e in chain}
    assert sorted(held.values()) == [[], [], ["backup-0"]], held
    assert held[s1["vdb"]] == ["backup-0"] or not os.path.exists(s1["vdb"]), held


def test_recover_never_pivots_or_aborts_a_job_it_did_not_start(running, tmp_path):
    """An interrupted delete is continued by ``recover``, which looks for the job livesnap
    started: a user's copy found on the disk instead is named, never pivoted or aborted."""
    dom = running()
    proc = dom.cli("snapshot-delete", dom.name, "s2",
                   env_extra={"LIVESNAP_FAULT": "delete:before:0"}, expect=None)
    assert proc.returncode != 0
    copies = {}
    for t in dom.targets:
        copies[t] = str(tmp_path / ("%s-copy.qcow2" % t))
        virsh("blockcopy", dom.name, t, copies[t], "--transient-job")
        mirror_ready(dom, t)
    before = everything(dom)
    proc = dom.cli("recover", dom.name, expect=1)
    assert "copy job on disk vd" in proc.stderr and "did not start" in proc.stderr, proc.stderr
    assert {t: job(dom, t)["type"] for t in dom.targets} == {"vda": 2, "vdb": 2}
    after = everything(dom)
    # the recover journaled its failure (the catalog's operation row), nothing else changed
    for key in ("files", "xml", "live_xml", "libvirt_snapshots", "state_dir"):
        assert after[key] == before[key], key
    # once the user's copies are gone, recover finishes the delete
    for t in dom.targets:
        dom.dom.blockJobAbort(t, 0)
    live = dom.digests()
    dom.json("recover", dom.name)
    assert dom.digests() == live
    assert [s["name"] for s in dom.json("snapshot-list", dom.name)["snapshots"]] == ["s1"]
    assert dom.json("check", dom.name)["ok"]


def test_a_first_seen_domain_with_a_users_copy_gets_no_catalog(make_dom, tmp_path):
    dom = make_dom(ndisks=1)
    virsh("snapshot-create-as", dom.name, "v1", "--disk-only", "--atomic")
    dom.dom.create()
    try:
        dest = str(tmp_path / "copy.qcow2")
        virsh("blockcopy", dom.name, "vda", dest, "--transient-job")
        mirror_ready(dom, "vda")
        for args in (("snapshot-create", dom.name, "s1"), ("snapshot-delete", dom.name, "v1"),
                     ("reclaim", dom.name)):
            refused(dom, args, "copy job on disk vda")
            assert not [n for n in os.listdir(dom.state_dir) if not n.endswith(".lock")]
        assert job(dom, "vda")["type"] == 2
        dom.dom.blockJobAbort("vda", 0)
    finally:
        dom.dom.destroy()


def test_an_interrupted_operation_is_named_before_a_job(running):
    """livesnap's own job left by a crash is not called foreign by the other commands: they
    name 'livesnap recover', which continues it."""
    dom = running()
    proc = dom.cli("snapshot-delete", dom.name, "s2",
                   env_extra={"LIVESNAP_FAULT": "job:started:0"}, expect=None)
    assert proc.returncode != 0
    proc = dom.cli("snapshot-create", dom.name, "s3", expect=1)
    assert "livesnap recover" in proc.stderr and "did not start" not in proc.stderr, \
        proc.stderr
    live = dom.digests()
    dom.json("recover", dom.name)
    assert dom.digests() == live
    assert dom.json("check", dom.name)["ok"]


def test_a_backup_job_is_refused(running, tmp_path):
    """A pull-mode backup (virsh backup-begin: NBD export of the disks, running until the
    backup tool says it is done) is another tool's job too."""
    dom = running()
    sock = str(tmp_path / "nbd.sock")
    xml = ("<domainbackup mode='pull'><server transport='unix' socket='%s'/><disks>"
           "<disk name='vda' backup='yes' type='file'><scratch file='%s'/></disk>"
           "<disk name='vdb' backup='no'/></disks></domainbackup>"
           % (sock, tmp_path / "scratch.qcow2"))
    path = tmp_path / "backup.xml"
    path.write_text(xml)
    virsh("backup-begin", dom.name, str(path))
    try:
        proc = refused(dom, ("snapshot-delete", dom.name, "s1"))
        assert "backup job" in proc.stderr, proc.stderr
    finally:
        virsh("domjobabort", dom.name, check=False)


def bitmap_flags(path):
    import json
    data = json.loads(qemu_img("info", "-U", "--output=json", path))
    return {b["name"]: b["flags"] for b in
            (data.get("format-specific") or {}).get("data", {}).get("bitmaps") or []}


def test_a_snapshot_of_a_shut_off_domain_carries_enabled_bitmaps_into_the_overlay(make_dom):
    """As libvirt does for a live external snapshot: the new overlay gets an empty bitmap
    of each enabled one of the frozen image, so the writes after the snapshot are tracked
    for the next incremental backup; a disabled one is not carried."""
    dom = make_dom(ndisks=2)
    qemu_img("bitmap", "--add", "-g", "131072", dom.sources()["vda"], "backup-0")
    qemu_img("bitmap", "--add", "--disable", dom.sources()["vda"], "old")
    r = dom.json("snapshot-create", dom.name, "s1")
    leaf = dom.sources()
    assert bitmap_flags(leaf["vda"]) == {"backup-0": ["auto"]}
    assert bitmap_flags(leaf["vdb"]) == {}
    frozen = {d["target"]: d["image"] for d in r["disks"]}
    assert set(bitmap_flags(frozen["vda"])) == {"backup-0", "old"}
    import json
    info = json.loads(qemu_img("info", "--output=json", leaf["vda"]))
    assert info["format-specific"]["data"]["bitmaps"][0]["granularity"] == 131072
