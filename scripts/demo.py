#!/usr/bin/env python3
"""livesnap demo: online snapshots of a running guest that writes all the time.

Boots the project's tiny writer guest (two qcow2 disks), snapshots it while it writes,
branches it by a revert, deletes snapshots all three ways (deleted / merged / hidden, then
reclaimed), verifies that every acknowledged write and every snapshot survived, and prints a
table of the guest-visible IO pauses. The livesnap commands run through a livesnap service
the demo starts (as `livesnap install-service` sets up on a host). Cleans up after itself.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from testguest import WriterGuest, chain_digest, create_qcow2, verify  # noqa: E402

URI = "qemu:///system"
RING_MIB = 1
ROWS = []


def livesnap(guest, *args, quiet=False):
    argv = [sys.executable, "-m", "livesnap"] + list(args) + ["--output", "json", "-c", URI]
    if not quiet:
        print("\n$ livesnap " + " ".join(args))
    t0 = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=HERE)
    t1 = time.monotonic()
    if proc.returncode != 0:
        raise SystemExit("livesnap failed: %s" % proc.stderr.strip())
    result = json.loads(proc.stdout)
    if guest is not None and guest.is_active() and args[0] in ("snapshot-create",
                                                               "snapshot-delete"):
        gap = guest.max_gap(None, t0, t1)
        what = result.get("action") or "created"
        methods = ",".join(sorted({m["method"] for m in result.get("merges", [])})) or "-"
        ROWS.append((" ".join(args[:1] + args[2:3]), what, methods, result.get("pause_ms"),
                     gap * 1000 if gap is not None else None, (t1 - t0) * 1000))
        if not quiet:
            print("  %s; guest-visible IO gap %.1f ms" % (what, (gap or 0) * 1000))
    return result


def tree(name):
    out = subprocess.run([sys.executable, "-m", "livesnap", "snapshot-list", name,
                          "--tree", "--all", "-c", URI], stdout=subprocess.PIPE, text=True,
                         cwd=HERE).stdout
    print("  " + out.rstrip().replace("\n", "\n  "))


def start_service(sock):
    """``livesnap service`` on ``sock``; the livesnap program finds it by LIVESNAP_SERVICE."""
    from livesnap import service
    proc = subprocess.Popen([sys.executable, "-m", "livesnap", "service", "--socket", sock],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if service.wait_listening(sock, proc):
        os.environ["LIVESNAP_SERVICE"] = sock
    return proc          # if it did not start, the commands run in their own processes


def main():
    tmp = tempfile.mkdtemp(prefix="livesnap-demo-")
    os.environ["LIVESNAP_STATE_DIR"] = os.path.join(tmp, "state")
    service = start_service(os.path.join(tmp, "run", "livesnap.sock"))
    disks = [(t, create_qcow2(os.path.join(tmp, t + ".qcow2"), 32), "qcow2") for t in ("vda", "vdb")]
    guest = WriterGuest("livesnap-demo-" + uuid.uuid4().hex[:6], disks, ring_mib=RING_MIB,
                        interval_ms=10)
    name = guest.name
    expected = {}

    def remember(result):
        expected[result["snapshot"]] = {d["target"]: chain_digest(d["image"])
                                        for d in result["disks"]}

    def check_snapshots():
        listing = livesnap(None, "snapshot-list", name, quiet=True)
        for s in listing["snapshots"]:
            got = {d["target"]: chain_digest(d["image"]) for d in s["disks"]}
            assert got == expected[s["name"]], s["name"]
        print("  verified: %d snapshot(s) read what they read when taken"
              % len(listing["snapshots"]))

    def stop_and_verify():
        last = guest.stop()
        for t in guest.targets:
            verify(guest.disk_sources()[t], t, last[t], RING_MIB, guest.run_id)
        print("  guest stopped; verifier: all %s acknowledged writes present"
              % " + ".join(str(last[t] + 1) for t in guest.targets))

    try:
        print("booting the writer guest %s (TCG) with disks vda, vdb in %s" % (name, tmp))
        guest.start()
        guest.wait_acks(20)
        print("guest writes 4 KiB records to both disks and acknowledges each one")
        base_gap = guest.gap_stats()
        remember(livesnap(guest, "snapshot-create", name, "s1", "--description", "first"))
        guest.wait_acks(60)
        remember(livesnap(guest, "snapshot-create", name, "s2"))
        guest.wait_acks(20)
        tree(name)
        check_snapshots()
        stop_and_verify()

        print("\nbranching: revert to s1 (domain shut off), keep the state left as 'left'")
        before = {t: chain_digest(p) for t, p in guest.disk_sources().items()}
        livesnap(guest, "snapshot-revert", name, "s1", "--keep-current", "left")
        expected["left"] = before
        tree(name)
        check_snapshots()
        for t, path in guest.disk_sources().items():     # the new run starts a fresh ring
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -z 0 %dM" % RING_MIB, path],
                           check=True, stdout=subprocess.DEVNULL)
        guest.restart()
        guest.wait_acks(20)

        livesnap(guest, "snapshot-delete", name, "s1")
        print("  s1 has two children (s2's branch and the running one): kept, hidden")
        tree(name)
        livesnap(guest, "snapshot-delete", name, "left")
        print("  'left' had no child: its image is deleted")
        r = livesnap(guest, "snapshot-delete", name, "s2")
        print("  s2 had no child; s1's image is down to one child and reclaimed: %s"
              % r["reclaimed"])
        tree(name)
        guest.wait_acks(20)
        remember(livesnap(guest, "snapshot-create", name, "s3"))
        guest.wait_acks(20)
        livesnap(guest, "snapshot-delete", name, "s3")
        print("  s3 had one child (the running image): merged while the guest writes")
        check_snapshots()
        guest.wait_acks(10)
        stop_and_verify()
        chk = livesnap(None, "check", name, quiet=True)
        print("  livesnap check: %s" % ("ok" if chk["ok"] else chk["problems"]))
        assert chk["ok"]

        print("\nguest IO gaps: baseline median %.1f ms, max %.1f ms between writes"
              % (base_gap["median"] * 1000, base_gap["max"] * 1000))
        print("%-22s %-8s %-7s %12s %14s %10s" % ("operation", "result", "merge", "pause ms",
                                                  "guest gap ms", "wall ms"))
        for op, what, method, pause, gap, wall in ROWS:
            print("%-22s %-8s %-7s %12s %14s %10.0f" % (
                op, what, method, "-" if pause is None else "%.1f" % pause,
                "-" if gap is None else "%.1f" % gap, wall))
        print("\ndemo finished: every acknowledged write and every snapshot verified")
    finally:
        guest.cleanup()
        service.terminate()
        service.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
