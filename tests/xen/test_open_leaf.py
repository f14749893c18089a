"""livesnap never reads the BAT of a leaf a real tapdisk holds open read-write.

Between two pauses a tapdisk allocates blocks in its leaf: it writes the BAT entry, the
block, and moves the footer only at the next pause or close. A reader that opens the leaf
whole (footer, BAT, layout) can meet a BAT entry pointing past the end of the data it read
and call the leaf corrupt, or decide on a BAT that is stale the next moment. The deterministic
tests below make a running tapdisk's leaf show exactly that state on disk between pauses
(``MidAllocation``: a BAT entry for a block that is not there yet; completed again at each
pause, as tapdisk completes its writes before it acknowledges a pause) and run the commands
that read the leaf: delete (its reparent step), adopt, recover of a create killed after its
step. The last test makes the real race likely instead: a guest that allocates a new block
with every write while deletes run."""
import contextlib
import os
import struct

import pytest

from livesnap import vhd
from livesnap.tools import tap_ctl
from testxen import blktap

from test_xen_datapath import XenVm

UNUSED = 0xFFFFFFFF


@pytest.fixture
def vm(xen, tmp_path):
    """Disks of 16 MiB: the guest writes into the first 8, so a leaf always has unused BAT
    entries (snapshots are compared on their first 8 MiB)."""
    return XenVm(xen, tmp_path, size=16 << 20)


def _bat(f):
    """(offset of the BAT, entries the disk's size needs), from the footer copy at 0 and the
    header (read here by the format's spec, not by livesnap's reader)."""
    f.seek(0)
    footer = f.read(512)
    data_offset, = struct.unpack(">Q", footer[16:24])
    size, = struct.unpack(">Q", footer[48:56])
    f.seek(data_offset)
    header = f.read(1024)
    table_offset, = struct.unpack(">Q", header[16:24])
    block_size, = struct.unpack(">I", header[32:36])
    return table_offset, -(-size // block_size)


def plant_mid_allocation(path):
    """Make the first unused BAT entry of ``path`` point at the end of the file, where its
    block is not written yet (tapdisk's state between its BAT write and its block write).
    Returns the (offset, old bytes) to put back."""
    with open(path, "r+b") as f:
        table, n = _bat(f)
        f.seek(table)
        entries = struct.unpack(">%dI" % n, f.read(4 * n))
        b = entries.index(UNUSED)
        end = os.fstat(f.fileno()).st_size
        f.seek(table + 4 * b)
        f.write(struct.pack(">I", -(-end // 512)))
        f.flush()
        os.fsync(f.fileno())
        return table + 4 * b, struct.pack(">I", UNUSED)


class MidAllocation(object):
    """The running tapdisks' leaves, each caught mid-allocation whenever it is not paused:
    ``tap_ctl.paused`` (livesnap's one way to pause) is wrapped so that the planted entry is
    put back before the real pause and a new one planted after the real unpause (in the
    leaf as it is then: after a snapshot, the new leaf)."""

    def __init__(self, monkeypatch):
        self.planted = {}
        self.pauses = 0
        self.on = True
        real = tap_ctl.paused

        @contextlib.contextmanager
        def paused(pid, minor, path=None, **kw):
            self.complete(path)
            with real(pid, minor, path=path, **kw) as window:
                yield window
            self.pauses += 1
            if self.on:
                self.plant(path)

        monkeypatch.setattr(tap_ctl, "paused", paused)

    def plant(self, path):
        self.complete(path)
        self.planted[path] = plant_mid_allocation(path)
        with pytest.raises(vhd.VhdCorrupt, match="outside the data area"):
            vhd.query(path)                      # what a whole read of the leaf meets

    def stop(self):
        """Every leaf complete again (tapdisk's view: the planted blocks unused), no more
        planting."""
        self.on = False
        self.complete()

    def complete(self, path=None):
        for p in [path] if path is not None else list(self.planted):
            undo = self.planted.pop(p, None)
            if undo is not None:
                with open(p, "r+b") as f:
                    f.seek(undo[0])
                    f.write(undo[1])
                    f.flush()
                    os.fsync(f.fileno())


def quiet(vm):
    """Stop the guests: nothing allocates in the leaves but what the test plants."""
    for td in vm.tapdisks.values():
        vm.xen.tapdisks.stop_guest(td.pid, td.minor)


def test_delete_reparents_a_leaf_caught_mid_allocation(vm, monkeypatch):
    vm.start()
    vm.create("s1")
    vm.create("s2")
    quiet(vm)
    mid = MidAllocation(monkeypatch)
    for p in vm.paths.values():
        mid.plant(p)
    # s2's only child is the active leaf: internal snapshot (pause), then the merge and the
    # reparent of the new leaf, which is mid-allocation between those pauses
    r = vm.inproc("snapshot-delete", vm.name, "s2", "--output", "json", expect=None)
    pauses = mid.pauses
    mid.stop()
    assert r.returncode == 0, r.stderr
    assert pauses >= 2                           # the reparent ran under a pause of its own
    del vm.snaps["s2"]
    r = vm.inproc("snapshot-delete", vm.name, "s1", "--output", "json", expect=None)
    assert r.returncode == 0, r.stderr
    del vm.snaps["s1"]
    vm.check()
    vm.stop_and_verify()
    vm.check()


def test_adopt_a_running_domain_whose_leaf_is_mid_allocation(vm, monkeypatch):
    """The first command on a domain adopts its chains: a running leaf is read from its
    header (its parent), not its BAT."""
    chain_base = vm.paths["xvda"] + ".base.vhd"
    os.rename(vm.paths["xvda"], chain_base)
    rc, out, err = blktap.vhd_util("snapshot", "-n", vm.paths["xvda"], "-p", chain_base)
    assert rc == 0, err
    vm.start()
    quiet(vm)
    mid = MidAllocation(monkeypatch)
    for p in vm.paths.values():
        mid.plant(p)
    listing = vm.inproc("snapshot-list", vm.name, "--output", "json", expect=None)
    create = vm.inproc("snapshot-create", vm.name, "s1", "--output", "json", expect=None)
    mid.stop()
    assert listing.returncode == 0, listing.stderr
    assert create.returncode == 0, create.stderr
    check = vm.json("check", vm.name, expect=None)
    assert check["ok"], check["problems"]
    leaf = vm.json("snapshot-list", vm.name)["snapshots"]
    assert [s["name"] for s in leaf] == ["s1"]
    frozen = [d["image"] for d in leaf[0]["disks"] if d["target"] == "xvda"][0]
    assert vhd.query(frozen).parent == chain_base   # adopted with its parent
    vm.stop_and_verify()


def test_recover_a_create_killed_after_its_step_keeps_the_open_leaf(vm, monkeypatch):
    """create killed after its step (the new leaf made, tapdisk unpaused on it, not yet
    journaled): recover re-runs the step, which must see that the leaf the tapdisk holds is
    already the frozen image's child, even when that leaf is mid-allocation, and not replace
    it (the writes acknowledged since would be gone)."""
    vm.start()
    p = vm.cli("snapshot-create", vm.name, "s1", env_extra={"LIVESNAP_FAULT": "create:after:0"},
               expect=None)
    assert p.returncode == -9, p.stderr
    for td in vm.tapdisks.values():
        vm.xen.settle(td)                        # writes into the new leaves, then quiet
    quiet(vm)
    inodes = {t: os.stat(p).st_ino for t, p in vm.paths.items()}
    mid = MidAllocation(monkeypatch)
    for p in vm.paths.values():
        mid.plant(p)
    rec = vm.inproc("recover", vm.name, "--output", "json", expect=None)
    mid.stop()
    assert rec.returncode == 0, rec.stderr
    assert {t: os.stat(p).st_ino for t, p in vm.paths.items()} == inodes
    vm.stop_and_verify()                         # every acknowledged write is there


def test_deletes_while_the_guest_allocates_a_block_with_every_write(xen, tmp_path):
    """The race itself, made likely: a guest that writes each record into a block of its
    own (one allocation per write, no pause between writes) on a 512 MiB disk, and deletes
    whose reparent reads the leaf the tapdisk is allocating in, several times. A writer
    without pause is also what makes tapdisk leave a finished pause unanswered (docs/xen.md,
    "Two upstream tapdisk behaviours"): this test failed with 'no answer within 30' until
    livesnap's pause nudged tapdisk."""
    xen.tapdisks.slots, xen.tapdisks.stride, xen.tapdisks.interval = 256, 2 << 20, 0
    vm = XenVm(xen, tmp_path, size=512 << 20)     # snapshots compared on their first 8 MiB
    vm.json("snapshot-list", vm.name)             # adopted offline: the race is the deletes'
    vm.start()
    for i in range(6):
        vm.create("a%d" % i)
        vm.create("b%d" % i)
        assert vm.delete("b%d" % i)["action"] == "merged"
        assert vm.delete("a%d" % i)["action"] == "merged"
    vm.check()
    vm.stop_and_verify()
    vm.check()
