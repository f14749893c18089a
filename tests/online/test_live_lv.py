"""qcow2 on logical volumes under a running guest: the writer guest's vda is a qcow2 on an LV
(a ``type='block'`` disk, over a base LV), vdb a qcow2 file. Snapshots are new thick LVs
QEMU switches to in one drained transaction; deletes merge with block jobs and lvremove the
LV merged away once QEMU let go of it; every acknowledged write survives."""
import os
import secrets
import subprocess
import xml.etree.ElementTree as ET

from helpers import Cli, qemu_img
from testguest import WriterGuest, chain_digest, verify

MiB = 1 << 20
RING_MIB = 1


class LvWriterGuest(WriterGuest):
    """The writer guest, its disks on block devices given as ``type='block'``."""

    def xml(self):
        root = ET.fromstring(super(LvWriterGuest, self).xml())
        for d in root.findall("./devices/disk"):
            s = d.find("source")
            if s.get("file", "").startswith("/dev/"):
                d.set("type", "block")
                s.set("dev", s.attrib.pop("file"))
        return ET.tostring(root, encoding="unicode")

    def disk_chains(self):
        root = ET.fromstring(self.dom.XMLDesc(0))
        out = {}
        for disk in root.findall("./devices/disk"):
            chain, node = [], disk
            while node is not None:
                src = node.find("source")
                if src is None or not (src.get("file") or src.get("dev")):
                    break
                chain.append(src.get("file") or src.get("dev"))
                node = node.find("backingStore")
            out[disk.find("target").get("dev")] = chain
        return out


def lvs(vg):
    out = subprocess.run([os.environ["LVM"], "lvs", "--noheadings", "-o", "lv_name,lv_tags", vg],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_snapshots_on_lvs_while_the_guest_writes(kvm_lvm_vg, tmp_path):
    vg = kvm_lvm_vg.name
    cli = Cli()
    cli.state_dir = str(tmp_path / "state")
    name = "lsg-lv-" + secrets.token_hex(4)
    lvm = os.environ["LVM"]
    for lv in ("vda-base", "vda"):
        subprocess.run([lvm, "lvcreate", "-n", "%s-%s" % (name, lv), "-L", "32m", vg], check=True,
                       stdout=subprocess.DEVNULL)
    base, top = "/dev/%s/%s-vda-base" % (vg, name), "/dev/%s/%s-vda" % (vg, name)
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    os.makedirs(str(tmp_path / "images"))
    vdb = str(tmp_path / "images" / "vdb.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", vdb, "16M")
    g = LvWriterGuest(name, [("vda", top, "qcow2"), ("vdb", vdb, "qcow2")], ring_mib=RING_MIB,
                      interval_ms=10)
    snaps = {}
    try:
        g.start()
        g.wait_acks(3)

        def create(snap):
            before = {t: g.last_acked(t) for t in g.targets}
            r = cli.json("snapshot-create", name, snap)
            after = {t: g.last_acked(t) for t in g.targets}
            assert r["datapath"] == "libvirt-live"
            for d in r["disks"]:
                verify(d["image"], d["target"], before[d["target"]], RING_MIB, g.run_id,
                       inflight=after[d["target"]] - before[d["target"]] + 1)
            snaps[snap] = {d["target"]: (d["image"], chain_digest(d["image"]))
                           for d in r["disks"]}
            return r

        create("s1")
        leaf1 = "/dev/%s/%s-vda.s1.qcow2" % (vg, name)
        assert g.disk_chains()["vda"] == [leaf1, top, base]
        assert lvs(vg)["%s-vda.s1.qcow2" % name] == ["livesnap"]
        g.wait_acks(60)
        create("s2")
        leaf2 = "/dev/%s/%s-vda.s2.qcow2" % (vg, name)
        assert g.disk_chains()["vda"] == [leaf2, leaf1, top, base]
        g.wait_acks(30)
        # s2's only child is the active image: active commit + pivot (or a pull); the LV
        # merged away goes once QEMU closed it
        r = cli.json("snapshot-delete", name, "s2")
        del snaps["s2"]
        assert r["merges"][0]["disk"] == "vda" or r["merges"][1]["disk"] == "vda"
        chain = g.disk_chains()["vda"]
        assert len(chain) == 3 and chain[1:] == [top, base], chain
        assert len([p for p in (leaf1, leaf2) if os.path.exists(p)]) == 1
        g.wait_acks(30)
        create("s3")
        g.wait_acks(30)
        # s1's only child is an intermediate image of the live chain: commit
        r = cli.json("snapshot-delete", name, "s1")
        del snaps["s1"]
        assert [m["method"] for m in r["merges"] if m["disk"] == "vda"] == ["commit"]
        chain = g.disk_chains()["vda"]
        assert len(chain) == 3 and chain[-1] == base, chain
        names = set(lvs(vg))
        assert {os.path.basename(p) for p in chain} == {n for n in names if n.startswith(name)}
        # every snapshot left reads what it read when taken (from the images it has now: a
        # commit leaves a snapshot's data in the image below)
        listing = cli.json("snapshot-list", name)["snapshots"]
        assert [s["name"] for s in listing] == ["s3"]
        for s in listing:
            for d in s["disks"]:
                assert chain_digest(d["image"]) == snaps[s["name"]][d["target"]][1], s
        chk = cli.json("check", name, expect=None)
        assert chk["ok"], chk["problems"]
        g.wait_acks(10)
        last = g.stop()
        assert g.clean_stop
        for t, chain in g.disk_chains().items():
            verify(chain[0], t, last[t], RING_MIB, g.run_id)
    finally:
        g.cleanup()
