"""Disks livesnap cannot snapshot (raw, block devices, network, read-only, shareable) are
named: a create is refused unless the user leaves them out with --disk or says
--skip-unsupported, and the result lists what was left out."""
import os

import pytest

from helpers import qemu_img


def add_disks(dom, xml_disks):
    """Add disks to the shut-off domain's definition."""
    xml = dom.dom.XMLDesc(2).replace("</devices>", xml_disks + "</devices>")
    dom.dom = dom.conn.defineXML(xml)


def raw_disk(dom, target="vdb", extra=""):
    path = os.path.join(dom.dir, "%s.raw" % target)
    qemu_img("create", "-q", "-f", "raw", path, "4M")
    return ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            "<source file='%s'/><target dev='%s' bus='virtio'/>%s</disk>"
            % (path, target, extra))


def qcow2_disk(dom, target, device="disk", bus="virtio", extra=""):
    path = os.path.join(dom.dir, "%s-extra.qcow2" % target)
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    return ("<disk type='file' device='%s'><driver name='qemu' type='qcow2'/>"
            "<source file='%s'/><target dev='%s' bus='%s'/>%s</disk>"
            % (device, path, target, bus, extra))


def snapshot_targets(dom, name):
    snaps = {s["name"]: s for s in dom.json("snapshot-list", dom.name)["snapshots"]}
    return [d["target"] for d in snaps[name]["disks"]]


def test_mixed_qcow2_and_raw_refused_naming_the_raw_disk(make_dom):
    dom = make_dom(ndisks=1)
    add_disks(dom, raw_disk(dom))
    before = dom.fingerprint()
    for args in ((), ("--dry-run",)):
        proc = dom.cli("snapshot-create", dom.name, "s1", *args, expect=1)
        assert proc.stderr.startswith("error: ") and "vdb (raw image" in proc.stderr, proc.stderr
        assert "--skip-unsupported" in proc.stderr
        assert dom.fingerprint() == before

    r = dom.json("snapshot-create", dom.name, "s1", "--skip-unsupported")
    assert [d["target"] for d in r["disks"]] == ["vda"]
    assert r["skipped"] == [{"target": "vdb", "reason": "raw image (livesnap snapshots qcow2 "
                                                        "images only)"}]
    text = dom.cli("snapshot-create", dom.name, "s2", "--skip-unsupported").stdout
    assert "left out vdb: raw image" in text
    assert snapshot_targets(dom, "s1") == ["vda"]


def test_disk_option_leaves_the_raw_disk_out(make_dom):
    dom = make_dom(ndisks=1)
    add_disks(dom, raw_disk(dom))
    r = dom.json("snapshot-create", dom.name, "s1", "--disk", "vda")
    assert [d["target"] for d in r["disks"]] == ["vda"]
    assert r["skipped"] == [{"target": "vdb", "reason": "raw image (livesnap snapshots qcow2 "
                                                        "images only)"}]
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "s2", "--disk", "vdb", expect=2)
    assert "disk vdb" in proc.stderr and "raw image" in proc.stderr, proc.stderr
    assert dom.fingerprint() == before


def test_a_supported_disk_left_out_with_disk_is_listed(make_dom):
    dom = make_dom(ndisks=2)
    r = dom.json("snapshot-create", dom.name, "s1", "--disk", "vdb")
    assert r["skipped"] == [{"target": "vda", "reason": "left out with --disk"}]
    r = dom.json("snapshot-create", dom.name, "s2")
    assert r["skipped"] == []


@pytest.mark.parametrize("kind", ["cdrom", "readonly", "shareable", "block", "network"])
def test_read_only_shareable_block_and_network_disks_are_named(make_dom, kind):
    dom = make_dom(ndisks=1)
    if kind == "cdrom":
        iso = os.path.join(dom.dir, "media.iso")
        with open(iso, "wb") as f:
            f.write(b"\0" * 65536)
        xml = ("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
               "<source file='%s'/><target dev='sda' bus='sata'/><readonly/></disk>" % iso)
        target, why = "sda", "cdrom device"
    elif kind == "readonly":
        xml = qcow2_disk(dom, "vdb", extra="<readonly/>")
        target, why = "vdb", "read-only disk"
    elif kind == "shareable":
        xml = raw_disk(dom, "vdb", extra="<shareable/>")
        target, why = "vdb", "shareable disk"
    elif kind == "block":
        xml = ("<disk type='block' device='disk'><driver name='qemu' type='qcow2'/>"
               "<source dev='/dev/null'/><target dev='vdb' bus='virtio'/></disk>")
        target, why = "vdb", "qcow2 on a block device that is not a logical volume"
    else:
        xml = ("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
               "<source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/>"
               "</source><target dev='vdb' bus='virtio'/></disk>")
        target, why = "vdb", "network disk (nbd)"
    add_disks(dom, xml)
    before = dom.fingerprint()
    proc = dom.cli("snapshot-create", dom.name, "s1", expect=1)
    assert "%s (" % target in proc.stderr and why in proc.stderr, proc.stderr
    assert dom.fingerprint() == before
    r = dom.json("snapshot-create", dom.name, "s1", "--skip-unsupported")
    assert [d["target"] for d in r["disks"]] == ["vda"]
    assert [d["target"] for d in r["skipped"]] == [target] and why in r["skipped"][0]["reason"]


def test_an_empty_cdrom_drive_is_not_named(make_dom):
    dom = make_dom(ndisks=1)
    add_disks(dom, "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                   "<target dev='sda' bus='sata'/><readonly/></disk>")
    r = dom.json("snapshot-create", dom.name, "s1")
    assert r["skipped"] == []
