"""The next-boot (persistent) definition after a live snapshot names the new overlays, even
when libvirt put back a stale one. A libvirtd reload (SIGHUP) overlapping the snapshot call
replaces the definition libvirt had just updated with the one it read from its file before
the switch (libvirt 9.0; seen in test_quiesce after tests/hooks reloaded libvirtd): the
domain, once stopped, would boot on the images the snapshot froze, without any write
acknowledged since. Here that stale definition is put back at the point where livesnap has
made the switch (``snapshot:switched:0``), as the reload leaves it; after a clean stop the
definition must name the overlays and hold every acknowledged write."""
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from conftest import Live
from helpers import ROOT, qemu_img

XML_INACTIVE = 2        # VIR_DOMAIN_XML_INACTIVE


class AgentLive(Live):
    def __init__(self, tmp_path):
        super(AgentLive, self).__init__(tmp_path)
        self.guest.agent = True


@pytest.fixture
def make_live(tmp_path):
    made = []

    def make(agent):
        lv = (AgentLive if agent else Live)(tmp_path)
        made.append(lv)
        return lv
    yield make
    for lv in made:
        lv.guest.cleanup()


def persistent_sources(lv):
    root = ET.fromstring(lv.guest.dom.XMLDesc(XML_INACTIVE))
    return {d.find("target").get("dev"): d.find("source").get("file")
            for d in root.findall("./devices/disk")}


def redefine(lv, sources):
    """Rewrite the persistent definition's disk sources ({target: path}) as a libvirtd
    reload does when it puts back the definition read from its file: one defineXML of the
    running domain (its live definition is not touched)."""
    root = ET.fromstring(lv.guest.dom.XMLDesc(XML_INACTIVE))
    for d in root.findall("./devices/disk"):
        t = d.find("target").get("dev")
        if t in sources:
            d.find("source").set("file", sources[t])
    lv.guest.conn.defineXML(ET.tostring(root, encoding="unicode"))


def images(lv):
    return {t: os.path.join(lv.dir, t + ".qcow2") for t in lv.guest.targets}


def create_with_stale_definition(lv, name, extra, stale_targets):
    """snapshot-create, stopped right after the switch: the guest writes a little more into
    the overlays, the persistent definition of ``stale_targets`` is set back to the images
    the snapshot froze, then livesnap goes on. Returns the live sources after the switch."""
    run = os.path.join(os.path.dirname(lv.state_dir), "fault-" + name)
    reached, release = run + "-reached", run + "-release"
    env = dict(lv.env(), LIVESNAP_FAULT="snapshot:switched:0:wait",
               LIVESNAP_FAULT_REACHED=reached, LIVESNAP_FAULT_RELEASE=release)
    proc = subprocess.Popen([sys.executable, "-m", "livesnap", "snapshot-create", lv.name, name]
                            + list(extra) + ["--output", "json"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(reached):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        switched = lv.guest.disk_sources()
        lv.guest.wait_acks(3)                  # acknowledged in the overlays only
        frozen = images(lv)
        redefine(lv, {t: frozen[t] for t in stale_targets})
        assert all(persistent_sources(lv)[t] == frozen[t] for t in stale_targets)
    finally:
        open(release, "w").close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (proc.returncode, out, err)
    return switched


@pytest.mark.parametrize("quiesce", [False, True], ids=["plain", "quiesced"])
@pytest.mark.parametrize("disks", [("vda",), ("vda", "vdb")], ids=["one-disk", "two-disks"])
def test_a_stale_definition_after_the_switch_is_repointed_at_the_overlays(make_live, quiesce,
                                                                          disks):
    lv = make_live(agent=quiesce)
    lv.start()
    extra = (["--quiesce"] if quiesce else []) + [a for t in disks for a in ("--disk", t)]
    switched = create_with_stale_definition(lv, "s1", extra, disks)
    before = images(lv)
    want = {t: switched[t] if t in disks else before[t] for t in lv.guest.targets}
    assert all(switched[t] != before[t] for t in disks)
    assert persistent_sources(lv) == want
    lv.stop_and_verify()                      # stopped right after: nothing acked is lost
    assert persistent_sources(lv) == want     # what the next boot uses


def test_a_stale_definition_left_by_a_crash_after_the_switch_is_repaired_by_recover(make_live):
    lv = make_live(agent=False)
    lv.start()
    proc = lv.cli("snapshot-create", lv.name, "s1",
                  env_extra={"LIVESNAP_FAULT": "snapshot:switched:0"}, expect=None)
    assert proc.returncode == -9, proc.stderr
    switched = lv.guest.disk_sources()
    lv.guest.wait_acks(3)
    redefine(lv, images(lv))
    rec = lv.json("recover", lv.name)
    assert rec["recovered"] is not None
    assert persistent_sources(lv) == switched
    lv.stop_and_verify()
    assert persistent_sources(lv) == switched


def test_a_definition_changed_to_another_image_is_left_alone(make_live):
    """A disk whose next boot was set to another image before the snapshot keeps it, as
    libvirt keeps it (it updates only a definition on the image the disk runs on)."""
    lv = make_live(agent=False)
    lv.start()
    other = os.path.join(lv.dir, "other-vdb.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", other, "16M")
    redefine(lv, {"vdb": other})
    lv.create("s1")
    switched = lv.guest.disk_sources()
    assert persistent_sources(lv) == {"vda": switched["vda"], "vdb": other}
    lv.guest.stop()
    assert persistent_sources(lv) == {"vda": switched["vda"], "vdb": other}


def test_check_reports_a_next_boot_on_a_snapshot_image(make_live):
    """A stale definition put back after livesnap's own look (by a 'virsh define' of an old
    XML, or a reload overlapping a change livesnap did not make) is named by 'livesnap
    check' while the domain still runs, disk by disk, with the image to define instead."""
    lv = make_live(agent=False)
    lv.start()
    lv.create("s1")
    switched = lv.guest.disk_sources()
    assert lv.json("check", lv.name)["ok"]
    redefine(lv, images(lv))
    chk = lv.json("check", lv.name, expect=None)
    assert not chk["ok"]
    named = [p for p in chk["problems"] if "next boot" in p]
    assert len(named) == 2, chk["problems"]
    for t, frozen in images(lv).items():
        assert [p for p in named if " disk %s on %s (snapshot s1 image)" % (t, frozen) in p
                and switched[t] in p], named
    redefine(lv, switched)
    assert lv.json("check", lv.name)["ok"]
    lv.stop_and_verify()
