#!/usr/bin/env python3
"""Pause window and guest-visible IO stall of livesnap's create and of each kind of delete on
the tapdisk datapath, against the seed / XAPI way of merging the active leaf (pause the
tapdisk for the whole copy), on the real tapdisk and tap-ctl (blktap built by
scripts/build-blktap.sh, testxen/blktap.py) with a guest writing through the tapdisk over NBD
(testxen/guest.py).

For every size S (MiB to move) and repeat, four scenarios, each on a fresh VM: one VHD disk
xvda of 32 + 2*S MiB described by a domain XML file, the guest's ring (8 slots x 1 MiB) at
offset 0, bulk data written with livesnap.vhd while no tapdisk runs, at offsets after the ring
(A = S MiB at [16M, 16M+S), B = S MiB at [16M+S, 16M+2S)), the snapshots taken by livesnap
offline (so the catalog knows them), then a real tapdisk started on the leaf (tap-ctl create),
the guest writing 4 KiB records through it and acknowledging each one after its write returned,
a quiet window measured (the gap distribution of the same guest without any operation):

  delete_intermediate  s1(A) <- s2(B) <- leaf     livesnap snapshot-delete s1: s1's only child
                                                  is an intermediate image (online merge of
                                                  read-only images, pause only to reparent);
                       then livesnap snapshot-create c1 (pause, rename, new leaf, unpause -a)
                       and a null pause (tap_ctl.paused() around nothing: the floor of any
                       pause with this tap-ctl), on the same VM
  delete_active        s1(A) <- leaf(B)           livesnap snapshot-delete s1: the only child is
                                                  the active leaf (internal snapshot, online
                                                  merge, pause to reparent)
  delete_hide          s1(A) <- {k(B), leaf}      livesnap snapshot-delete s1 with two children
                                                  (made by an offline revert --keep-current k):
                                                  hidden, no pause expected
  xapi_leaf_coalesce   s1(A) <- leaf(B)           the baseline, same setup as delete_active:
                                                  tap_ctl.paused() around vhd.coalesce(leaf)
                                                  (S MiB into s1) and XAPI's swap (leaf ->
                                                  OLD_, s1 -> the leaf's path), unpause -a leaf

Per operation: wall time; livesnap's own pause_ms (its JSON, and merges[*].pause_ms; for the
baseline: tap_ctl.paused's window_ms, pause command to unpause returned); the tapdisk's pauses
(tapdisk_paused_ms: per pause, from the start of 'tap-ctl pause' to the end of 'tap-ctl
unpause', whoever ran them: every tap-ctl call goes through a logging wrapper, xen_tapctl.py);
the guest-visible stall = testxen.verify.max_gap of the ack log over the command's window (the
longest gap between two acknowledged writes), stall_vs_quiet = stall / the quiet window's
longest gap, and excess_ms = stall - the quiet window's median gap. Every scenario ends with
the guest stopped and tap-ctl destroy, testxen.verify.assert_intact of the disk read through a
fresh real tapdisk (no acknowledged write lost), a read-back of A and B through a real tapdisk
on the chain that must hold them, and the real 'vhd-util check -p -b' of every image.

Per size the summary takes, over repeats, the median wall time and the worst (max) stall and
pause. Ratios are livesnap / baseline (delete vs xapi_leaf_coalesce, create vs null pause);
"scaling" compares the stall at the largest size with the smallest. A real tapdisk's 'tap-ctl
pause' sometimes gets no answer (a known test-bed problem under investigation): the run then
stops with that error (exit 1 and a message, no JSON); run it again. Only the tapdisks the
benchmark started are ever destroyed or killed (by pid), others' run on.

--storage lvm runs the same scenarios with the disk on logical volumes (XAPI's LVHD): one volume
group VG_XenStorage-<uuid> of the LVM stand-in (testxen/lvm: real lvm metadata on a sparse
loop-device PV, a loop device per LV at /dev/<vg>/<lv>) per run, destroyed at the end (also on
SIGTERM / Ctrl-C). The leaf VHD-<uuid> is an LV at lvm.full_size; livesnap deflates and sets
read-only what it freezes. The baseline does what SM's live leaf-coalesce does on LVHD inside its
pause (cleanup.py _doCoalesceLeaf with LVHD's _prepareCoalesceLeaf / _finishCoalesceLeaf):
parent LV writable, the leaf deflated, the parent inflated by what the coalesce can add
(vhd_storage.merge_extra), coalesce, lvrename leaf -> OLD_<name> and parent -> the leaf's name,
the new leaf inflated to its full size (inflateFully); unpause -a; OLD_ lvremoved after it. Not
done (so the baseline's pause is a lower bound of SM's): SM's inflate journal LVs, refcounts,
vhd-util checks and the plugin calls to other hosts. Every LVM command goes through a logging
wrapper of the stand-in (same code, one interpreter): per operation the number of LVM commands
and those that ran inside the tapdisk's pauses (lvm_in_pauses); a probe at start measures what
one stand-in command costs. Every scenario also checks the LVs as SM keeps them: the leaf
writable at full size, every other image read-only and deflated, no LV left over.

    python3 bench/xen.py [--sizes 16,64,256] [--repeat 2] [--quick] [--storage file|lvm]
                         [--out FILE]
"""
import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid

import harness  # the checkout on sys.path: first
import xen_tapctl
from harness import BenchError, MiB
from livesnap.tools import lvm
from testxen import blktap
from xen_lvm import probe_lvm, setup_vg, teardown_vg
from xen_summary import scaling, summarize
from xen_vm import DATA_OFFSET_MIB, SCENARIOS, SLOTS, STRIDE, Vm


def vg_size(sizes):
    """Two disks' full sizes at the biggest size (at least 256 MiB to move) plus a margin."""
    disk = (2 * DATA_OFFSET_MIB + 2 * max(sizes + [256])) * MiB
    return lvm.round_extent(2 * lvm.full_size(disk) + 256 * MiB)


def tool_env(run_dir):
    """The variables that point livesnap (and the baseline, in this process) at the real
    blktap: TAP_CTL the logging wrapper (xen_tapctl) of the real tap-ctl, VHD_UTIL the real
    vhd-util. MissingBuild when scripts/build-blktap.sh has not built it."""
    env = blktap.env()
    env["TAP_CTL"] = xen_tapctl.make(run_dir, blktap.tap_ctl_bin())
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_options(ap, "scenario")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 MiB, one repeat, a short quiet window")
    ap.add_argument("--interval-ms", type=float, default=3.0,
                    help="the guest's pause between writes")
    ap.add_argument("--quiet-s", type=float, default=2.0, help="baseline window per VM")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=argparse.SUPPRESS)
    ap.add_argument("--storage", choices=("file", "lvm"), default="file",
                    help="the disk's images: VHD files in a directory, or LVs of a volume "
                         "group of the LVM stand-in (LVHD)")
    harness.add_output_options(ap)
    a = ap.parse_args(argv)
    sizes = harness.sizes_of(a)
    repeat = a.repeat
    if a.quick:
        sizes, repeat, a.quiet_s = [16], 1, min(a.quiet_s, 0.5)
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error("unknown scenario %r" % s)

    try:
        prefix = blktap.prefix()
    except blktap.MissingBuild as e:
        print("bench/xen.py: %s" % e, file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: guests stopped, tapdisks destroyed, images removed
    harness.unwind_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="lsb-xen-", dir=a.dir)
    # the guests' ack logs, the tap-ctl and LVM wrappers and their logs
    run_dir = tempfile.mkdtemp(prefix="run-", dir=workdir)
    os.environ.update(tool_env(run_dir))
    started = time.monotonic()
    runs = []
    vg = vg_root = lvm_info = None
    try:
        if a.storage == "lvm":
            vg_root = tempfile.mkdtemp(prefix="lsbvg", dir="/tmp")
            vg = "VG_XenStorage-%s" % uuid.uuid4()
            lvm_info = {"vg_mib": vg_size(sizes) // MiB, "root": vg_root}
            setup_vg(run_dir, vg_root, vg, vg_size(sizes))
            lvm_info["probe"] = probe_lvm(vg)
            print("# LVM stand-in: VG %s, %s" % (vg, json.dumps(lvm_info)), file=sys.stderr)
        for rep in range(repeat):
            for size in sizes:
                for kind in scenarios:
                    r = Vm(kind, size, workdir, a.quiet_s, run_dir, a.interval_ms / 1000.0,
                           vg=vg).run()
                    r["rep"] = rep
                    runs.append(r)
                    print("# %-20s %4d MiB rep %d: %s" % (kind, size, rep, json.dumps(r["op"])),
                          file=sys.stderr)
    except BenchError as e:
        print("bench/xen.py: %s" % e, file=sys.stderr)
        return 1
    finally:
        # a second Ctrl-C / SIGTERM must not stop the cleanup (delivered after it); every
        # tapdisk and guest of a VM is gone already (Vm.run)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if vg_root:
                teardown_vg(vg_root, vg)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    summary = [summarize(s, [r for r in runs if r["mib"] == s]) for s in sizes]
    doc = {
        "benchmark": "xen",
        "host": {"python": platform.python_version(), "nproc": os.cpu_count(),
                 "tapdisk": "real blktap tapdisk and tap-ctl (%s), the guest writing over "
                            "NBD (testxen/guest.py)" % prefix},
        "params": {"storage": a.storage,
                   "sizes_mib": sizes, "repeat": repeat, "interval_ms": a.interval_ms,
                   "quiet_s": a.quiet_s, "slots": SLOTS, "stride": STRIDE,
                   "data_offset_mib": DATA_OFFSET_MIB, "scenarios": scenarios,
                   "disk_mib": {str(s): 2 * DATA_OFFSET_MIB + 2 * s for s in sizes},
                   "stall": "max gap between acknowledged guest writes over the operation's "
                            "window; per size the max over repeats, wall time the median",
                   "pause_ms": "livesnap: its JSON pause_ms (max over its pauses); baseline "
                               "and null_pause: tap_ctl.paused window_ms (pause command until "
                               "unpause returned)",
                   "tapdisk_paused_ms": "per pause of the real tapdisk: from the start of "
                                        "'tap-ctl pause' to the end of 'tap-ctl unpause' "
                                        "(a logging wrapper around the real tap-ctl)",
                   "tapdisk_pause_parts_ms": "per pause: [tap-ctl pause (tapdisk's drain and "
                                             "close), between the two commands, tap-ctl "
                                             "unpause (its reopen)]",
                   "stall_vs_quiet": "stall / the longest gap of the same guest in the quiet "
                                     "window (no operation) of the same VM",
                   "baseline": "xapi_leaf_coalesce: tapdisk paused for coalesce(leaf) + swap"},
        "sizes": summary,
        "scaling": scaling(summary),
        "verified": bool(runs) and all(r.get("verified") is True for r in runs),
        "runs": runs,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if lvm_info:
        doc["params"]["lvm"] = dict(
            lvm_info, vg=vg,
            standin="testxen/lvm: real lvm metadata (activation off) on a sparse loop-device "
                    "PV, a loop device per LV; every command a Python process running lvm",
            lvm_in_pauses="per tapdisk pause, the LVM commands that ended inside it",
            baseline_lvhd="SM live leaf-coalesce on LVHD inside the pause: parent RW, leaf "
                          "deflated, parent inflated by merge_extra, coalesce, 2x lvrename, "
                          "inflateFully; OLD_ lvremoved after the unpause")
    return harness.emit(doc, a.out)


if __name__ == "__main__":
    sys.exit(main())
