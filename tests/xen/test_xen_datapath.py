"""The Xen datapath end to end: a domain described by a domain XML file, its two VHD disks
served by real tapdisks (blktap), through which the guest (testxen/guest.py) writes and
acknowledges records over NBD all the time. livesnap creates, deletes and reverts with the
seed's method, driving the real tap-ctl and vhd-util; afterwards every acknowledged write is
there, every remaining snapshot reads (through a fresh real tapdisk) what it read when taken,
every image passes the real ``vhd-util check -p -b`` and the VM's disk paths never changed."""
import json
import os
import random
import subprocess
import time
import uuid

import pytest

from helpers import Cli, listdir_images
from livesnap.tools import lvm, tap_ctl
from testxen import blktap
from testxen.verify import assert_intact

SIZE = 8 << 20


class XenVm(Cli):
    """A VM of two VHD disks: files in a directory, or (``vg``) LVs of an LVHD volume group
    named as XAPI names them (``/dev/VG_XenStorage-<sr>/VHD-<vdi>``)."""

    def __init__(self, xen, tmp_path, vg=None, size=SIZE):
        self.xen = xen
        self.vg = vg
        self.dir = os.path.join("/dev", vg) if vg else str(tmp_path / "sr")
        os.makedirs(self.dir, exist_ok=True)
        self.state_dir = str(tmp_path / "state")
        self.name = "xvm-" + uuid.uuid4().hex[:6]
        self.uuid = str(uuid.uuid4())
        self.paths = {}
        disks = ""
        for t in ("xvda", "xvdb"):
            if vg:
                lv = "VHD-%s" % uuid.uuid4()
                lvm.lvcreate(vg, lv, lvm.full_size(SIZE))
                self.paths[t] = lvm.lv_path(vg, lv)
                source = "<disk type='block' device='disk'><source dev='%s'/>" % self.paths[t]
            else:
                self.paths[t] = os.path.join(self.dir, "%s.vhd" % uuid.uuid4())
                source = "<disk type='file' device='disk'><source file='%s'/>" % self.paths[t]
            blktap.create(self.paths[t], size)
            disks += ("%s<driver name='tap2' type='vhd'/><target dev='%s' bus='xen'/></disk>"
                      % (source, t))
        self.xml = str(tmp_path / "vm.xml")
        with open(self.xml, "w") as f:
            f.write("<domain type='xen'><name>%s</name><uuid>%s</uuid><memory>131072</memory>"
                    "<os><type>hvm</type></os><devices>%s</devices></domain>"
                    % (self.name, self.uuid, disks))
        with open(self.xml) as f:
            self.xml_text = f.read()
        self.tapdisks = {}
        self.snaps = {}

    def start(self):
        for t, p in self.paths.items():
            self.tapdisks[t] = self.xen.create(p)
        for t in self.paths:
            self.xen.wait_acks(self.tapdisks[t], 3)

    def stop_and_verify(self):
        """Close the tapdisks (the guest stops), then every acknowledged write is there."""
        for t, td in self.tapdisks.items():
            log = self.xen.ack_log(td)
            rc, out, err = self.xen.destroy(td)
            assert rc == 0, err
            assert_intact(log, self.paths[t])
            assert blktap.check(self.paths[t]) == []
        self.tapdisks = {}

    def cli(self, *args, **kw):
        return Cli.cli(self, *(args + ("--domain-xml", self.xml)), **kw)

    def inproc(self, *args, **kw):
        return Cli.inproc(self, *(args + ("--domain-xml", self.xml)), **kw)

    def create(self, name, *extra):
        t0 = time.monotonic_ns()
        r = self.json("snapshot-create", self.name, name, *extra)
        self.snaps[name] = {}
        for d in r["disks"]:
            self.snaps[name][d["target"]] = digest(d["image"])
            if d["target"] in self.tapdisks:
                # the frozen image holds every write acknowledged before the call
                assert_intact(self.xen.ack_log(self.tapdisks[d["target"]]), d["image"],
                              until_ns=t0)
        return r

    def delete(self, name):
        r = self.json("snapshot-delete", self.name, name)
        del self.snaps[name]
        return r

    def check(self):
        listing = self.json("snapshot-list", self.name)
        assert {s["name"] for s in listing["snapshots"]} == set(self.snaps)
        for s in listing["snapshots"]:
            got = {d["target"]: digest(d["image"]) for d in s["disks"]}
            assert got == self.snaps[s["name"]], s["name"]
            for d in s["disks"]:
                # a visible snapshot is never VHD-hidden: SM's GC would merge it away
                assert blktap.query(d["image"])["hidden"] == 0, (s["name"], d["image"])
        with open(self.xml) as f:
            assert f.read() == self.xml_text           # the VM's disk paths never change
        for t, td in self.tapdisks.items():
            now = tap_ctl.find(self.paths[t])
            assert now is not None and now.pid == td.pid and not now.state & tap_ctl.PAUSED
        chk = self.json("check", self.name, expect=None)
        assert chk["ok"], chk["problems"]
        for f in listdir_images(self.dir):
            p = os.path.join(self.dir, f)
            if p not in self.paths.values() or not self.tapdisks:
                assert blktap.check(p) == [], p
        if self.vg:
            self.check_lvs()

    def check_lvs(self):
        """LVHD as SM keeps it: a leaf's LV is writable and of its full size; every other
        image's LV is read-only and deflated to its VHD's physical size; no LV is left over."""
        report = lvm_report(self.vg)
        leaves = {os.path.basename(p) for p in self.paths.values()}
        for name, (size, attr) in report.items():
            if name in leaves:
                assert attr[1] == "w" and size == lvm.full_size(SIZE), (name, size, attr)
            else:
                rc, out, err = blktap.vhd_util("query", "-n", lvm.lv_path(self.vg, name), "-s")
                assert rc == 0, (name, out, err)
                phys = int(out)
                assert size == lvm.round_extent(phys), (name, size, phys)
                assert attr[1] == "r", (name, attr)
        known = {os.path.basename(d["image"]) for s in self.json("snapshot-list", self.name)
                 ["snapshots"] for d in s["disks"]}
        assert known <= set(report)


def lvm_report(vg):
    """{lv name: (size in bytes, lv_attr)} as LVM reports them."""
    out = subprocess.run([os.environ["LVM"], "lvs", "--noheadings", "--units", "b",
                          "--nosuffix", "-o", "lv_name,lv_size,lv_attr", vg],
                         stdout=subprocess.PIPE, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {r[0]: (int(r[1]), r[2]) for r in rows}


def digest(path):
    """The chain of ``path`` as a fresh real tapdisk reads it."""
    return blktap.digest(path, SIZE)


@pytest.fixture
def vm(xen, tmp_path):
    return XenVm(xen, tmp_path)


@pytest.fixture
def lvm_vm(xen, lvm_vg, tmp_path):
    return XenVm(xen, tmp_path, vg=lvm_vg.name)


@pytest.fixture(params=["file", "lvm"])
def any_vm(request, xen, tmp_path):
    if request.param == "file":
        return XenVm(xen, tmp_path)
    return XenVm(xen, tmp_path, vg=request.getfixturevalue("lvm_vg").name)


def test_seed_method_create_and_delete_every_way(any_vm):
    vm = any_vm
    vm.start()
    r = vm.create("s1")
    assert r["datapath"] == "tapdisk" and r["pause_ms"] is not None
    # the frozen images were renamed away, the VM's paths now hold new empty leaves
    for d in r["disks"]:
        assert d["image"] != vm.paths[d["target"]]
        stem = os.path.basename(vm.paths[d["target"]])
        stem = stem[:-4] if stem.endswith(".vhd") else stem
        assert os.path.basename(d["image"]).startswith(stem + ".s1")
    vm.xen.wait_acks(vm.tapdisks["xvda"], vm.xen.acked(vm.tapdisks["xvda"]) + 20)
    vm.create("s2")
    vm.check()
    # s2's only child is the active leaf: internal snapshot, online merge, short pause
    plan = vm.json("snapshot-delete", vm.name, "s2", "--dry-run")
    assert [s["op"] for s in plan["steps"]][:2] == ["internal_snapshot", "internal_snapshot"] \
        or [s["op"] for s in plan["steps"]][0] == "internal_snapshot"
    r = vm.delete("s2")
    assert r["action"] == "merged"
    vm.check()
    # s1's only child is now the internal image (an intermediate one): merged online
    r = vm.delete("s1")
    assert r["action"] == "merged"
    vm.check()
    vm.stop_and_verify()
    vm.check()


@pytest.mark.slow
def test_random_sequence_with_the_writer_running(vm):
    random_sequence(vm, runs=3, per_run=11)


@pytest.mark.slow
def test_random_sequence_on_lvhd(lvm_vm):
    """The same on LVs: after every operation leaves are full-size and writable, frozen
    images deflated and read-only, no LV left over (XenVm.check_lvs)."""
    random_sequence(lvm_vm, runs=2, per_run=5, seed=5, minimum=10)


def random_sequence(vm, runs, per_run, seed=11, minimum=30):
    rnd = random.Random(seed)
    vm.start()
    ops = {"create": 0, "delete": 0, "revert": 0}
    actions = set()
    n = 0
    for run in range(runs):
        for _ in range(per_run):
            n += 1
            names = sorted(vm.snaps)
            if not names or rnd.random() < 0.55:
                extra = [] if rnd.random() < 0.8 else ["--disk", rnd.choice(["xvda", "xvdb"])]
                vm.create("s%d" % n, *extra)
                ops["create"] += 1
            else:
                actions.add(vm.delete(rnd.choice(names))["action"])
                ops["delete"] += 1
            vm.check()
        vm.stop_and_verify()
        names = sorted(vm.snaps)
        if names and run < runs - 1:
            target = rnd.choice(names)
            keep = ["--keep-current", "k%d" % run] if rnd.random() < 0.5 else []
            before = {t: digest(p) for t, p in vm.paths.items()}
            vm.json("snapshot-revert", vm.name, target, *keep)
            ops["revert"] += 1
            if keep:
                vm.snaps[keep[1]] = before
            vm.check()
        vm.start()
    vm.stop_and_verify()
    vm.check()
    assert ops["create"] + ops["delete"] >= minimum and ops["revert"] >= 1
    print("ops %s actions %s" % (ops, sorted(actions)))
    assert "merged" in actions


def test_xen_domain_read_from_a_libvirt_connection(xen, tmp_path):
    """A domain that libvirt describes (here libvirt's test driver standing in for
    xen:///system) with VHD disks is driven through tapdisk like the XML-file one."""
    import libvirt
    vm = XenVm(xen, tmp_path)
    conn = libvirt.open("test:///default")
    xml = vm.xml_text.replace("<domain type='xen'>", "<domain type='test'>")
    conn.defineXML(xml)
    vm.start()
    # the test driver's state lives in this process only: run livesnap's engine here
    from livesnap.engine.engine import Engine
    from livesnap.platforms.libvirt_domain import LibvirtPlatform
    platform = LibvirtPlatform("test:///default")
    platform._conn = conn
    engine = Engine(state_dir=vm.state_dir, platform=platform)
    r = engine.create(vm.name, "s1")
    assert r["datapath"] == "tapdisk" and r["pause_ms"] is not None
    for d in r["disks"]:
        assert d["image"] != vm.paths[d["target"]] and d["image"].endswith(".s1.vhd")
    r = engine.delete(vm.name, "s1")
    assert r["action"] == "merged"
    assert engine.check(vm.name)["ok"]
    vm.stop_and_verify()
    conn.lookupByName(vm.name).undefine()


def test_lvhd_no_space_is_refused_before_anything_changes(lvm_vm):
    """A snapshot needs a full-size leaf LV per disk: with less free in the volume group the
    command fails with a space error naming the VG, before any pause, rename or LV."""
    vm = lvm_vm
    vm.start()
    free = lvm.vg_free(vm.vg)
    lvm.lvcreate(vm.vg, "filler", free - lvm.full_size(SIZE))     # room for one leaf, not two
    before = lvm_report(vm.vg)
    acks = {t: vm.xen.acked(td) for t, td in vm.tapdisks.items()}
    p = vm.inproc("snapshot-create", vm.name, "s1", "--output", "json", expect=None)
    assert p.returncode != 0
    err = json.loads(p.stdout)["error"] if p.stdout.strip() else p.stderr
    assert "space" in str(err).lower() and vm.vg in str(err), err
    assert lvm_report(vm.vg) == before
    assert vm.json("snapshot-list", vm.name)["snapshots"] == []
    for t, td in vm.tapdisks.items():
        assert not tap_ctl.find(vm.paths[t]).state & tap_ctl.PAUSED
        vm.xen.wait_acks(td, acks[t] + 5)                        # the guest kept writing
    vm.stop_and_verify()             # (a create once the space is there: the tests above)
