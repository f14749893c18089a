"""Snapshots created and deleted under a running guest that writes and acknowledges records:
every acknowledged write survives, every remaining snapshot reads what it read when taken,
and each merge kind (pull, active commit + pivot, intermediate commit, fallback) is used."""
import os
import random

import pytest

from testguest import verify

from online_helpers import merge_kinds


def test_create_and_delete_every_way_while_the_guest_writes(live):
    live.start()
    g = live.guest
    r = live.create("s1")
    assert r["datapath"] == "libvirt-live" and r["pause_ms"] is not None
    g.wait_acks(120)
    live.create("s2")
    g.wait_acks(3)
    # the active image is small next to s2's image: active commit + pivot
    plan = live.json("snapshot-delete", live.name, "s2", "--dry-run")
    assert merge_kinds(plan) == ["commit", "commit"]
    r = live.delete("s2")
    assert r["action"] == "merged" and r["pause_ms"] is not None
    live.check_snapshots()
    g.wait_acks(5)
    # s1 with one child that is again the active image, which by now has more data than s1
    live.create("s3")
    g.wait_acks(3)
    live.create("s4")
    g.wait_acks(3)
    # s3's only child is s4's image, an intermediate image of the live chain: commit only
    plan = live.json("snapshot-delete", live.name, "s3", "--dry-run")
    assert merge_kinds(plan) == ["commit", "commit"]
    live.delete("s3")
    live.check_snapshots()
    g.wait_acks(5)
    live.stop_and_verify()


def test_pull_into_the_active_image(live):
    live.start()
    live.create("s1")
    live.guest.wait_acks(150)              # the active image outgrows s1's: pull moves less
    plan = live.json("snapshot-delete", live.name, "s1", "--dry-run")
    assert merge_kinds(plan) == ["pull", "pull"]
    r = live.delete("s1")
    assert r["action"] == "merged"
    live.check_snapshots()
    live.guest.wait_acks(5)
    live.stop_and_verify()


def test_active_commit_that_does_not_converge_falls_back_to_pull(live):
    live.start()
    live.guest.wait_acks(120)
    live.create("s1")
    live.guest.wait_acks(3)
    plan = live.json("snapshot-delete", live.name, "s1", "--dry-run")
    assert merge_kinds(plan) == ["commit", "commit"]
    # a zero deadline: the commit cannot be ready in time, livesnap aborts it and pulls
    r = live.json("snapshot-delete", live.name, "s1",
                  env_extra={"LIVESNAP_READY_TIMEOUT": "0"})
    assert [(m["disk"], m["method"], m["fallback"]) for m in r["merges"]] == \
        [("vda", "pull", True), ("vdb", "pull", True)]
    del live.snaps["s1"]
    chains = live.guest.disk_chains()
    for t in ("vda", "vdb"):
        assert all("s1" not in os.path.basename(p) or p == chains[t][0] for p in chains[t])
    live.check_snapshots()
    live.guest.wait_acks(5)
    live.stop_and_verify()


@pytest.mark.slow
def test_random_online_sequence_with_reverts_between_runs(live):
    """>= 30 creates and deletes while the guest writes; between runs the domain is stopped
    and reverted, so trees get several children; hidden snapshots are reclaimed online."""
    rnd = random.Random(7)
    live.start()
    ops = {"create": 0, "delete": 0, "revert": 0}
    actions = set()
    n = 0
    for run in range(3):
        for _ in range(11):
            n += 1
            names = sorted(live.snaps)
            if not names or rnd.random() < 0.55:
                disk = [] if rnd.random() < 0.8 else ["--disk", rnd.choice(["vda", "vdb"])]
                live.create("s%d" % n, *disk)
                ops["create"] += 1
            else:
                r = live.delete(rnd.choice(names))
                actions.add(r["action"])
                ops["delete"] += 1
            live.guest.wait_acks(rnd.choice([1, 3, 20]))
            live.check_snapshots()
        live.stop_and_verify()
        names = sorted(live.snaps)
        if run < 2 and names:
            target = rnd.choice(names)
            keep = ["--keep-current", "k%d" % run] if rnd.random() < 0.5 else []
            before = {t: live.guest.disk_sources()[t] for t in live.guest.targets}
            live.json("snapshot-revert", live.name, target, *keep)
            ops["revert"] += 1
            if keep:
                from testguest import chain_digest
                live.snaps[keep[1]] = {t: chain_digest(before[t]) for t in before}
            live.check_snapshots()
            # the next run starts a fresh ring on the reverted disks
            for t, path in live.guest.disk_sources().items():
                import subprocess
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 0 1M", path],
                               check=True, stdout=subprocess.DEVNULL)
            live.guest.restart()
            live.guest.wait_acks(3)
    assert ops["create"] + ops["delete"] >= 30 and ops["revert"] >= 1
    print("ops %s actions %s" % (ops, sorted(actions)))
    assert "merged" in actions


def test_quiesce_without_a_guest_agent_is_refused_before_anything_changes(live):
    live.start()
    before = live.guest.disk_chains()
    files = sorted(os.listdir(live.dir))
    proc = live.cli("snapshot-create", live.name, "q1", "--quiesce", expect=2)
    assert "guest agent" in proc.stderr
    assert live.guest.disk_chains() == before and sorted(os.listdir(live.dir)) == files
    live.guest.wait_acks(2)
    live.stop_and_verify()
