"""VHD file names too long for the file system are refused before anything is journaled
(issue 16, class 4, on the VHD datapath): a frozen image renamed to ``<stem>.<name>.vhd``,
a leaf kept by ``snapshot-revert --keep-current``."""
import hashlib
import os
import shutil
import sqlite3
import tempfile
import uuid

from helpers import Cli, listdir_images
from livesnap import vhd

SIZE = 8 << 20


class LongVhdVm(Cli):
    """A stopped Xen VM (vhd-offline datapath) whose one disk has a 200-byte file name."""

    def __init__(self, tmp_path, stem=196, sr_dir=None):
        self.dir = sr_dir or str(tmp_path / "sr")
        os.makedirs(self.dir, exist_ok=True)
        self.state_dir = str(tmp_path / "state")
        self.name = "xvm-" + uuid.uuid4().hex[:6]
        self.uuid = str(uuid.uuid4())
        self.path = os.path.join(self.dir, "v" * stem + ".vhd")
        vhd.create(self.path, SIZE)
        self.xml = str(tmp_path / "vm.xml")
        with open(self.xml, "w") as f:
            f.write("<domain type='xen'><name>%s</name><uuid>%s</uuid><memory>131072</memory>"
                    "<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
                    "<source file='%s'/><driver name='tap2' type='vhd'/>"
                    "<target dev='xvda' bus='xen'/></disk></devices></domain>"
                    % (self.name, self.uuid, self.path))

    def cli(self, *args, **kw):
        return Cli.cli(self, *(args + ("--domain-xml", self.xml)), **kw)

    def inproc(self, *args, **kw):
        return Cli.inproc(self, *(args + ("--domain-xml", self.xml)), **kw)

    def fingerprint(self):
        files = {}
        for f in sorted(listdir_images(self.dir)):
            with open(os.path.join(self.dir, f), "rb") as fh:
                files[f] = hashlib.sha256(fh.read()).hexdigest()
        db = sqlite3.connect(os.path.join(self.state_dir, self.uuid + ".db"))
        try:
            ops = db.execute("SELECT id, status FROM operations").fetchall()
        finally:
            db.close()
        return files, ops


def refused(vm, args):
    before = vm.fingerprint()
    proc = vm.cli(*args, expect=1)
    err = proc.stderr.strip()
    assert err.startswith("error: cannot create an image at") and len(err.splitlines()) == 1, \
        proc.stderr
    assert vm.fingerprint() == before


def test_vhd_names_too_long_are_refused_before_anything(xen, tmp_path):
    vm = LongVhdVm(tmp_path)
    vm.json("snapshot-create", vm.name, "s" * 30)      # 196 + 1 + 30 + 4: fits
    refused(vm, ["snapshot-create", vm.name, "s" * 100])
    refused(vm, ["snapshot-revert", vm.name, "s" * 30, "--keep-current", "k" * 100])
    vm.json("snapshot-revert", vm.name, "s" * 30, "--keep-current", "k")
    names = sorted(s["name"] for s in vm.json("snapshot-list", vm.name)["snapshots"])
    assert names == ["k", "s" * 30]
    assert vm.json("check", vm.name)["ok"]


def test_internal_image_name_too_long_is_refused_on_tapdisk(xen, tmp_path):
    """Variant: on tapdisk a merge with the active leaf first freezes it as an internal
    image ``<stem>.internal-<8 hex>.vhd``, 256 bytes here (the snapshot's image 240): the
    delete is refused before any pause or rename, the guest keeps writing. The SR is a short
    directory: the real tapdisk takes paths of at most 256 bytes (``vhd:`` included)."""
    sr = tempfile.mkdtemp(prefix="s", dir="/")
    try:
        _internal_image_name_too_long(xen, LongVhdVm(tmp_path, stem=234, sr_dir=sr))
    finally:
        shutil.rmtree(sr)


def _internal_image_name_too_long(xen, vm):
    td = xen.create(vm.path)
    xen.wait_acks(td, 3)
    vm.json("snapshot-create", vm.name, "s")                 # 234 + 1 + 1 + 4 = 240: fits
    frozen = vm.json("snapshot-list", vm.name)["snapshots"][0]["disks"][0]["image"]
    before_files = sorted(os.listdir(vm.dir))
    acks = xen.acked(td)
    proc = vm.cli("snapshot-delete", vm.name, "s", expect=1)
    assert proc.stderr.startswith("error: cannot create an image at") and \
        "internal-" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert sorted(os.listdir(vm.dir)) == before_files
    assert [s["name"] for s in vm.json("snapshot-list", vm.name)["snapshots"]] == ["s"]
    assert os.path.exists(frozen)
    xen.wait_acks(td, acks + 3)                                # not left paused
    assert vm.json("check", vm.name)["ok"]
