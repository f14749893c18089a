"""``recover`` of a live snapshot never removes the overlay the guest writes to, whatever
libvirt's state or the domain's definition says.

A libvirtd that crashes or restarts in the middle of a snapshot (libvirt 9.0 was seen to
crash when reloaded during one) reloads the state it saved before the switch: its live XML
names the image the snapshot froze while QEMU already writes to the overlay. The old
recover took that for "the switch did not happen": it removed the overlay (the file QEMU
writes to) and re-created it empty, losing every write since the switch. Here that state is
made with the real libvirtd and QEMU: livesnap stops after making the overlays
(``snapshot:overlays:0``), then QEMU is switched to them behind libvirt's back through its
monitor (blockdev-add + blockdev-snapshot, what libvirt's own transaction does), so
libvirt's live XML stays on the frozen images, as the restarted libvirtd has it.

The same loss in the offline datapath: a domain stopped with a definition naming the frozen
image (a reload put it back, test_live_persistent.py) had recover re-create the overlay
holding the writes since the switch.

Checked with libvirt 9.0 and a private libvirtd run under gdb, killed right after QEMU
answered the snapshot's transaction and started again: its live and next-boot XML name the
frozen image, QEMU's query-block and open files the overlay.
"""
import json
import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from conftest import RING_MIB, Live
from helpers import URI, qemu_img
from testguest import verify

XML_INACTIVE = 2        # VIR_DOMAIN_XML_INACTIVE


@pytest.fixture
def lv(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.guest.cleanup()


def images(lv):
    return {t: os.path.join(lv.dir, t + ".qcow2") for t in lv.guest.targets}


def overlays(lv):
    """{target: overlay path} of the overlays livesnap made over the disks' images."""
    frozen = {p: t for t, p in images(lv).items()}
    out = {}
    for name in os.listdir(lv.dir):
        path = os.path.join(lv.dir, name)
        info = json.loads(qemu_img("info", "-U", "--output=json", path))
        backing = info.get("full-backing-filename") or info.get("backing-filename")
        if backing in frozen:
            out[frozen[backing]] = path
    return out


def qmp(lv, cmd, **arguments):
    proc = subprocess.run(["virsh", "-c", URI, "qemu-monitor-command", lv.name,
                           json.dumps({"execute": cmd, "arguments": arguments})],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert "error" not in reply, reply
    return reply["return"]


def switch_behind_libvirts_back(lv, overlay):
    """QEMU writes to the overlays from now on; libvirt still names the frozen images."""
    frozen = images(lv)
    tops = {b["inserted"]["file"]: b["inserted"]["node-name"]
            for b in qmp(lv, "query-block") if b.get("inserted")}
    for t, path in sorted(overlay.items()):
        node = "ls-test-%s" % t
        qmp(lv, "blockdev-add", driver="qcow2", **{
            "node-name": node, "backing": None,
            "file": {"driver": "file", "filename": path}})
        qmp(lv, "blockdev-snapshot", node=tops[frozen[t]], overlay=node)


def inode(path):
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def persistent_sources(lv):
    root = ET.fromstring(lv.guest.dom.XMLDesc(XML_INACTIVE))
    return {d.find("target").get("dev"): d.find("source").get("file")
            for d in root.findall("./devices/disk")}


def stop_recover_verify(lv, overlay, next_boot):
    """Stopped cleanly with a definition on ``next_boot``: recover makes the overlays
    (holding every write acknowledged since the switch) the disks' images."""
    last = lv.guest.stop()
    assert lv.guest.clean_stop
    assert persistent_sources(lv) == next_boot
    rec = lv.json("recover", lv.name)
    assert rec["recovered"] is not None
    assert persistent_sources(lv) == overlay
    for t in lv.guest.targets:
        verify(overlay[t], t, last[t], RING_MIB, lv.guest.run_id)
    assert lv.json("check", lv.name)["ok"]


@pytest.mark.parametrize("switched", [("vda", "vdb"), ("vdb",)], ids=["both", "one"])
def test_recover_never_removes_an_overlay_qemu_switched_to(lv, switched):
    """``one``: only vdb's overlay is open in QEMU (vda's is a leftover nobody uses): still
    nothing of the step is redone or rolled back while it runs."""
    lv.start()
    proc = lv.cli("snapshot-create", lv.name, "s1",
                  env_extra={"LIVESNAP_FAULT": "snapshot:overlays:0"}, expect=None)
    assert proc.returncode == -9, proc.stderr
    overlay = overlays(lv)
    assert sorted(overlay) == sorted(lv.guest.targets)
    switch_behind_libvirts_back(lv, {t: overlay[t] for t in switched})
    lv.guest.wait_acks(3)                      # acknowledged in the overlays only
    assert lv.guest.disk_sources() == images(lv)        # libvirt's (stale) view
    held = {t: inode(p) for t, p in overlay.items()}

    proc = lv.cli("recover", lv.name, expect=None)
    assert {t: inode(p) for t, p in overlay.items()} == held, \
        proc.stderr                                # neither removed nor re-created
    assert proc.returncode != 0, proc.stdout
    assert "QEMU switched to it" in proc.stderr and "not removed" in proc.stderr, proc.stderr
    assert lv.guest.is_active()
    # a second recover while it runs: the same refusal, nothing rolled back
    proc = lv.cli("recover", lv.name, expect=None)
    assert proc.returncode != 0 and "not removed" in proc.stderr, proc.stderr
    assert {t: inode(p) for t, p in overlay.items()} == held
    # a restart before recover boots on what QEMU writes to
    next_boot = {t: overlay[t] if t in switched else images(lv)[t] for t in lv.guest.targets}
    assert persistent_sources(lv) == next_boot
    stop_recover_verify(lv, overlay, next_boot)


def test_recover_of_a_stopped_domain_keeps_the_overlay_holding_writes(lv):
    lv.start()
    proc = lv.cli("snapshot-create", lv.name, "s1",
                  env_extra={"LIVESNAP_FAULT": "snapshot:switched:0"}, expect=None)
    assert proc.returncode == -9, proc.stderr
    overlay = lv.guest.disk_sources()
    assert set(overlay.values()).isdisjoint(images(lv).values())
    lv.guest.wait_acks(3)
    # the definition a libvirtd reload puts back: on the frozen images
    root = ET.fromstring(lv.guest.dom.XMLDesc(XML_INACTIVE))
    for d in root.findall("./devices/disk"):
        d.find("source").set("file", images(lv)[d.find("target").get("dev")])
    lv.guest.conn.defineXML(ET.tostring(root, encoding="unicode"))
    held = {t: inode(p) for t, p in overlay.items()}
    stop_recover_verify(lv, overlay, images(lv))
    assert {t: inode(p) for t, p in overlay.items()} == held
