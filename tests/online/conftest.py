"""A running writer guest with two qcow2 disks (vdb on a base image), driven by the CLI."""
import os
import secrets

import pytest

from helpers import Cli, qemu_img
from testguest import WriterGuest, chain_digest, verify

DISK_MIB = 16
RING_MIB = 1


class Live(Cli):
    def __init__(self, tmp_path, interval_ms=10):
        self.dir = str(tmp_path / "images")
        os.makedirs(self.dir)
        self.state_dir = str(tmp_path / "state")
        disks = []
        for t in ("vda", "vdb"):
            path = os.path.join(self.dir, t + ".qcow2")
            if t == "vdb":
                base = os.path.join(self.dir, "vdb-base.qcow2")
                qemu_img("create", "-q", "-f", "qcow2", base, "%dM" % DISK_MIB)
                qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path)
            else:
                qemu_img("create", "-q", "-f", "qcow2", path, "%dM" % DISK_MIB)
            disks.append((t, path, "qcow2"))
        self.guest = WriterGuest("lsg-test-" + secrets.token_hex(4), disks, ring_mib=RING_MIB,
                                 interval_ms=interval_ms)
        self.name = self.guest.name
        self.snaps = {}          # name -> {target: digest of the frozen chain}

    def start(self):
        self.guest.start()
        self.guest.wait_acks(3)

    def create(self, name, *extra):
        before = {t: self.guest.last_acked(t) for t in self.guest.targets}
        r = self.json("snapshot-create", self.name, name, *extra)
        # what the frozen images read as the call returned (check_snapshots compares)
        self.snaps[name] = {d["target"]: chain_digest(d["image"]) for d in r["disks"]}
        # every ACK the guest printed before now (the console lags behind the guest: the
        # frozen image may hold writes whose ACK lines the host has not read yet)
        after = self.guest.sync_acks() if self.guest.is_active() else None
        for d in r["disks"]:
            t = d["target"]
            if after is not None:
                # the frozen image holds every write acked before the call, maybe some after
                verify(d["image"], t, before[t], RING_MIB, self.guest.run_id,
                       inflight=after[t] - before[t] + 1)
        return r

    def delete(self, name):
        r = self.json("snapshot-delete", self.name, name)
        del self.snaps[name]
        return r

    def check_snapshots(self):
        """Every remaining snapshot reads what it read when taken; nothing unknown is left."""
        listing = self.json("snapshot-list", self.name)
        assert {s["name"] for s in listing["snapshots"]} == set(self.snaps)
        for s in listing["snapshots"]:
            got = {d["target"]: chain_digest(d["image"]) for d in s["disks"]}
            assert got == self.snaps[s["name"]], s["name"]
        chk = self.json("check", self.name, expect=None)
        assert chk["ok"], chk["problems"]

    def stop_and_verify(self):
        last = self.guest.stop()
        assert self.guest.clean_stop
        for t in self.guest.targets:
            verify(self.guest.disk_sources()[t], t, last[t], RING_MIB, self.guest.run_id)
        return last


@pytest.fixture
def live(tmp_path):
    lv = Live(tmp_path)
    yield lv
    lv.guest.cleanup()
