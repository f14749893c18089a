#!/usr/bin/env python3
"""The longest guest-visible pause of deleting a running VM's only snapshot on an XAPI host,
livesnap's fold against SM's own leaf-coalesce of the same chain, in one run: the real tapdisk
and tap-ctl (scripts/build-blktap.sh), a guest writing through each tapdisk over NBD
(testxen/guest.py), the XAPI stand-in (testxen/xapi.py) with one file SR, SM's real GC
(testxen/sm.py: SM v3.2.12's cleanup.py; its tapdisk-pause calls served by SM's own plugin
code, a Python process per call as xapi runs a plugin, testxen/sm_hosts.py ``master``), the
world of tests/xapi (testxen/world.py).

For every size S (MiB written to the leaf since the snapshot), sizes in the order given, SM
first (its GC pass on the world's SR), then livesnap (its VMs on a second file SR, so SM's
passes see only SM's chain):

  livesnap  a halted VM, one disk of 32 + 2*S MiB; A = S MiB written at [16M, 16M+S);
            snapshot_create s1 (the plugin, offline: SM's layout, a hidden base copy under the
            snapshot's VDI and the VM's leaf); B = S MiB written at [16M+S, 16M+2S) into the
            leaf; the VM started (real tapdisk, the guest writing its 8 x 1 MiB ring at 0);
            snapshot_delete s1: the base copy, left with one child (the running leaf), is
            folded into it (rounds of short pauses, one last pause).
  sm        the same chain as SM's FileSR leaves it once a snapshot VDI is deleted
            (testxen.sm.file_layout: A in a hidden base copy made by vhd-util snapshot, B in
            the leaf, records as SM writes them), the leaf attached (sm_config host_<ref>=RW)
            and served by a real tapdisk with the same guest; then one full pass of SM's GC
            (cleanup._gc, immediate): SM leaf-coalesces the leaf into the base copy. Live
            (cleanup.py _liveLeafCoalesce: one pause for the whole copy and the renames) when
            canLiveCoalesce: with no speed log for the SR, the leaf's allocated size under
            LIVE_LEAF_COALESCE_MAX_SIZE (20 MiB); with one (SM records the speed of every
            coalesce it runs, SPEED_LOG_ROOT), allocated / speed under 5 s (half of
            LIVE_LEAF_COALESCE_TIMEOUT). Otherwise first snapshot-coalesce (XAPI VDI.snapshot
            'internal', which the stand-in cannot serve: no SM driver behind it; the pass then
            fails and the result says so). --no-speed-log removes SM's speed log before each
            pass (a fresh SR's decision).

Measured per side: the guest's longest gap between acknowledged writes over the operation's
window (testxen.verify.max_gap: the guest-visible pause), the quiet window's longest gap (the
same guest just before, no operation), the wall time; livesnap: its reported pauses (the
reply's pauses[*].ms, pause_ms, the fold's rounds); SM: what its log says it did, the speed it
used, each tapdisk-pause plugin call as the XAPI stand-in served it (tap_pause_calls; pause
to unpause: sm_pause_ms) and its parts (tap_pause_call_parts_ms: the plugin process's
start-up, Python and SM's imports, to its first SMlog line; SM's plugin code from there to the
call's end). livesnap's
tap-ctl is the real one, as SM's side runs it; with --tapctl-log it is bench/xen.py's logging
wrapper (xen_tapctl.py: about 5 ms more per pause, in livesnap's gap only), and each
pause's parts are reported as its tap-ctl calls took them (tapdisk_pause_parts_ms: tap-ctl
pause, paused between the two commands, tap-ctl unpause) with the tap-ctl list calls that ran
while the tapdisk was paused (tapdisk_paused_lists_ms).

The floor (--floor-cycles N, default 10; 0: none): on livesnap's tapdisk, its guest writing,
its chain as before the delete, just before the delete, N bare pauses of each kind,
interleaved 0.1 s apart, nothing done while paused: ``livesnap`` (livesnap.tools.tap_ctl.paused,
its pause nudged, the state checks, the unpause with -a, through the tap-ctl the fold uses),
``plain`` (``tap-ctl pause``, ``tap-ctl unpause -a``, the real commands; a pause unanswered
after --floor-plain-wait s is woken by ``tap-ctl list`` and counted unanswered); with
--tapctl-log also ``livesnap_direct`` (the real tap-ctl: the wrapper's cost) and the parts of
livesnap's. Per kind the guest's longest gap over each pause, min, median, max. Per size:
floor_gap_ms (the median of livesnap's kind: the least any operation that must pause and
reopen tapdisk's chain this way shows the guest, once), floor_plain_gap_ms, and the ratios
livesnap/SM, livesnap/floor, floor/SM, plain floor/SM: a floor/SM above 0.1 says a typical
pause of tapdisk, however empty, is more than a tenth of SM's at that size here. After each
side: the guest stopped, the tapdisk destroyed, every acknowledged write present
(testxen.verify.assert_intact through a fresh real tapdisk), A and B read back, 'vhd-util
check' of the disk, the chain left (chain_after: one image on each side for a verified
run). Ratio: livesnap's max gap / SM's.

tapdisk's syslog: the test bed has no syslog daemon on /dev/log, so glibc would write every
tapdisk message to /dev/console (tapdisk opens its log with LOG_CONS), synchronously, 2-3 ms
each here, and tapdisk logs several per pause and per unpause (each image closed, opened, its
parent validated): a cost a host's syslog does not have, paid inside every pause of both
sides. The run's tapdisks drop them instead (TESTXEN_TAPDISK_NO_CONSOLE, the test bed's
LD_PRELOAD shim, testxen/preload/memlock_shim.c); --tapdisk-console keeps them.

A livesnap attempt that fails (a 'tap-ctl pause' the real tapdisk never answers: a known
test-bed problem) is reported, the plugin's recover run, and another VM tried (--attempts);
the failed ones are listed in livesnap_failed_attempts, and the run is then not verified if
the last one failed too. Only the tapdisks this run started are destroyed (by pid); the
run's world is removed at the end (also on SIGTERM / Ctrl-C).

    python3 bench/xen_sm.py [--sizes 8,32,128,512] [--quiet-s 1] [--no-speed-log] [--attempts 2]
                            [--floor-cycles 10] [--floor-plain-wait 1] [--tapctl-log]
                            [--tapdisk-console] [--dir DIR] [--out FILE]
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid

import harness  # the checkout on sys.path: first
import xen_tapctl
from harness import BenchError, MiB
from livesnap.tools import tap_ctl as ls_tap_ctl
from testxen import blktap
from testxen import sm as smmod
from testxen import sm_hosts
from testxen import verify as txverify
from testxen import world as txworld

DATA_OFFSET_MIB = 16
A, B = 0x41, 0x42
ACTIONS = (                       # SMlog line -> what SM did
    ("Leaf-coalescing", "leaf_coalesce_candidate"),
    ("Single-snapshotting", "snapshot_coalesce"),
    ("Coalescing parent", "snapshot_coalesce_parent"),
    ("Running VHD coalesce", "vhd_coalesce"),
    ("Calling tap-pause on host", "tap_pause"),
    ("Calling tap-unpause on host", "tap_unpause"),
    ("Leaf-coalesce failed", "leaf_coalesce_failed"),
    ("Speed log missing", "speed_log_missing"),
    ("Coalesce summary", "coalesce_summary"),
    ("Aborted coalesce", "coalesce_aborted"),
)


class Run(object):
    """The world of one run: the stand-in, its file SR, SM's code on it."""

    def __init__(self, base, no_speed_log=False, tapctl_log=False):
        self.base = base
        self.no_speed_log = no_speed_log
        self.tapctl_log = tapctl_log
        lib = txworld.xenapi_lib(os.path.join(base, "xenapi"))
        self.w = txworld.World(os.path.join(base, "w"), lib)
        os.environ["TESTXEN_RUN_DIR"] = self.w.run_dir
        self.bt = smmod.Blktap(blktap.prefix())
        # livesnap's tap-ctl: the real one, as SM's side runs it; with tapctl_log the logging
        # wrapper of bench/xen.py (each call's start and end; a few ms more per call)
        self.tapctl_dir = os.path.join(base, "tapctl")
        os.makedirs(self.tapctl_dir)
        self.tap_ctl_logged = xen_tapctl.make(self.tapctl_dir, blktap.tap_ctl_bin())
        self.tap_ctl = self.tap_ctl_logged if tapctl_log else blktap.tap_ctl_bin()
        x = self.w.xapi
        self.sm = smmod.Sm(smmod.unpack(), self.bt.vhd_util, x, self.w.socket,
                           os.path.join(self.w.base, "sm"), lock_dir=self.w.sm_lock_dir)
        x.scanner = self.sm.scan           # SR.scan (the plugin calls it) is SM's own
        # livesnap's VMs on an SR of their own: SM's GC passes (on self.w.sr) see only SM's
        # chain, whatever a failed livesnap attempt left
        self.ls_sr = x.add_sr("ext")
        os.makedirs(x.sr_dir(self.ls_sr))
        # this host's tapdisk-pause: SM's own plugin, a process per call as xapi runs it
        # (testxen/sm_hosts.py), each call timed (plugin_calls)
        self.master = sm_hosts.master(x, self.sm)

    def close(self):
        try:
            self.w.xapi.stop()
        finally:
            self.w.kill_all()       # only this run's tapdisks and guests, by pid

    # -- helpers ---------------------------------------------------------------------------
    def check_disk(self, path, size, ack_log):
        """Every acknowledged write, A and B read back, vhd-util check, one image."""
        try:
            rep = txverify.assert_intact(ack_log, path)
        except AssertionError as e:
            raise BenchError("acknowledged writes lost: %s" % e)
        with blktap.opened(path) as c:
            for tag, off in ((A, DATA_OFFSET_MIB), (B, DATA_OFFSET_MIB + size)):
                for i in range(size):
                    if c.read((off + i) * MiB, MiB) != bytes([tag]) * MiB:
                        raise BenchError("%s: MiB %d of region %s does not read back"
                                         % (path, i, chr(tag)))
        problem = blktap.check(path)
        if problem:
            raise BenchError("vhd-util check %s: %s" % (path, problem))
        return rep.acked

    def quiet(self, ack_log, quiet_s):
        t0 = time.monotonic_ns()
        time.sleep(quiet_s)
        return round(txverify.max_gap(ack_log, t0, time.monotonic_ns()), 1)

    # -- livesnap --------------------------------------------------------------------------
    def livesnap(self, size, quiet_s, floor_cycles=0, plain_wait=1.0):
        w, bt = self.w, self.bt
        vm = w.add_vm("ls%d-%s" % (size, uuid.uuid4().hex[:6]), ndisks=1, sr=self.ls_sr,
                      size=(2 * DATA_OFFSET_MIB + 2 * size) * MiB)
        disk = vm.paths["xvda"]
        bt.write(disk, DATA_OFFSET_MIB * MiB, size * MiB, A)
        w.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
        bt.write(disk, (DATA_OFFSET_MIB + size) * MiB, size * MiB, B)
        vm.start()
        log = vm.ack_log("xvda")
        out = {"quiet_max_gap_ms": self.quiet(log, quiet_s)}
        td = vm.tapdisks["xvda"]
        if floor_cycles:
            out["floor"] = self.floor(td.pid, td.minor, disk, log, floor_cycles, plain_wait)
        t0 = time.monotonic_ns()
        reply = w.run_plugin("snapshot_delete", {"vm_uuid": vm.uuid, "name": "s1"},
                             TAP_CTL=self.tap_ctl)
        t1 = time.monotonic_ns()
        # the real tapdisk's pauses as livesnap ran them: [tap-ctl pause ms, paused between
        # the two commands ms, tap-ctl unpause ms] (an unanswered pause ends at the unpause)
        pauses = [p for p in xen_tapctl.pauses(self.tapctl_dir, td.pid, td.minor)
                  if p[0] >= t0] if self.tapctl_log else []
        out_parts = [_parts(p) for p in pauses]
        # the tap-ctl list calls (nudges, state checks) that ran while the tapdisk was paused
        # and its caller worked: [start, end] ms after the pause command returned
        lists = [[[round((s - b) / 1e6, 1), round((e - b) / 1e6, 1)]
                  for s, e, rc, args in xen_tapctl.calls(self.tapctl_dir)
                  if args[:1] == ["list"] and s < c and e > b]
                 for a, b, c, d in pauses]
        time.sleep(0.2)                 # the acks right after the window
        out["max_gap_ms"] = round(txverify.max_gap(log, t0, t1), 1)
        out["wall_ms"] = round((t1 - t0) / 1e6, 1)
        if reply["Status"] != "Success":
            # e.g. a 'tap-ctl pause' the real tapdisk never answered (a known test-bed
            # problem): said as it is, the fold finished by the plugin's recover
            out["error"] = reply["ErrorDescription"][:2]
            rec = w.run_plugin("recover", {"vm_uuid": vm.uuid})
            out["recover"] = rec["Status"]
            r = {}
        else:
            r = json.loads(reply["Value"])
        out["action"] = r.get("action")
        out["datapath"] = r.get("datapath")
        out["pause_ms"] = None if r.get("pause_ms") is None else round(r["pause_ms"], 1)
        out["pauses_ms"] = [round(p["ms"], 1) for p in r.get("pauses", [])]
        out["tapdisk_pause_parts_ms"] = out_parts if self.tapctl_log else None
        out["tapdisk_paused_lists_ms"] = lists if self.tapctl_log else None
        # where the longest gap was: the guest's longest gap over each logged pause, and
        # its longest gap that touches none of them (the fold's work between its pauses)
        out["gap_per_pause_ms"], out["gap_between_pauses_ms"] = (
            _gaps_in_and_out(log, t0, t1, pauses) if self.tapctl_log else (None, None))
        out["merges"] = [{k: m.get(k) for k in ("method", "rounds", "fallback")}
                         for m in r.get("merges", [])]
        w.tapdisks.stop_guest(td.pid, td.minor)
        rc, o, e = w.tapdisks.destroy(td.pid, td.minor)
        if rc != 0:
            raise BenchError("tap-ctl destroy failed (%d): %s %s" % (rc, o, e))
        vm.tapdisks = {}
        out["acked_writes"] = self.check_disk(disk, size, log)
        out["chain_after"] = _chain(disk)
        out["verified"] = True
        return out

    # -- the floor: a bare pause and unpause of the same tapdisk ----------------------------
    def floor(self, pid, minor, path, log, cycles, plain_wait):
        """``cycles`` bare pauses of tapdisk ``pid``/``minor`` (its image ``path``, its guest's
        ack log ``log``) of each kind, interleaved, ``FLOOR_SPACING_S`` apart, with nothing
        done while paused: {kind: summary} (``_floor_summary``). Kinds: ``livesnap`` (its
        pause through the tap-ctl its fold uses), ``plain`` (the real commands); with
        tapctl_log also ``livesnap_direct`` (the real tap-ctl: what the wrapper costs), and
        ``livesnap``'s pauses as the wrapper logged them (``parts_ms``)."""
        kinds = {"livesnap": lambda: self._floor_livesnap(pid, minor, path, self.tap_ctl),
                 "plain": lambda: _floor_plain(pid, minor, path, plain_wait)}
        if self.tapctl_log:
            kinds["livesnap_direct"] = lambda: self._floor_livesnap(pid, minor, path,
                                                                    blktap.tap_ctl_bin())
        names = [k for k in FLOOR_KINDS if k in kinds]
        runs = {k: [] for k in names}
        for _ in range(cycles):
            for kind in names:
                time.sleep(FLOOR_SPACING_S)
                t0 = time.monotonic_ns()
                facts = kinds[kind]()
                runs[kind].append((t0, time.monotonic_ns(), facts))
        time.sleep(0.2)                 # the acks right after the last window
        out = {k: _floor_summary(log, runs[k]) for k in names}
        if self.tapctl_log:
            logged = xen_tapctl.pauses(self.tapctl_dir, pid, minor)
            out["livesnap"]["parts_ms"] = [_parts(p) for t0, t1, _ in runs["livesnap"]
                                           for p in logged if t0 <= p[0] and p[3] <= t1]
        return out

    def _floor_livesnap(self, pid, minor, path, tapctl):
        """livesnap's pause as its fold takes it, with nothing in it: tap_ctl.paused (the
        pause, nudged; the state check; the unpause with -a, its state check) through
        ``tapctl``."""
        old = os.environ.get("TAP_CTL")
        os.environ["TAP_CTL"] = tapctl
        try:
            with ls_tap_ctl.paused(pid, minor, path=path) as w:
                pass
        except ls_tap_ctl.TapCtlError as e:        # said, as a failed fold would be
            raise BenchError("the floor's pause of tapdisk %d/%d: %s" % (pid, minor, e))
        finally:
            if old is None:
                del os.environ["TAP_CTL"]
            else:
                os.environ["TAP_CTL"] = old
        return {"pause_ms": round(w.pause_ms, 1), "window_ms": round(w.window_ms, 1)}

    # -- SM ----------------------------------------------------------------------------------
    def sm_gc(self, size, quiet_s):
        w, bt, x = self.w, self.bt, self.w.xapi
        ref, bases = smmod.file_layout(
            x, w.sr, bt, (2 * DATA_OFFSET_MIB + 2 * size) * MiB,
            [[(DATA_OFFSET_MIB * MiB, size * MiB, A)]],
            [((DATA_OFFSET_MIB + size) * MiB, size * MiB, B)])
        leaf_uuid = x.record("VDI", ref)["uuid"]
        path = x.vdi_path(ref)
        self.master.plug(ref, path)                     # attached here: its tap device
        pid, minor = w.tapdisks.create(path)
        w.tapdisks.wait_acks(pid, minor, 3)
        log = w.tapdisks.ack_log(pid, minor)
        out = {"quiet_max_gap_ms": self.quiet(log, quiet_s)}
        speed_log = os.path.join(self.sm.state, "%s.speed_log" % x.record("SR", w.sr)["uuid"])
        if self.no_speed_log and os.path.exists(speed_log):
            os.unlink(speed_log)
        out["speed_before_mib_s"] = _speed(speed_log)
        out["leaf_allocated_mib"] = _allocated_mib(bt, path)
        mark = len(self.sm.log())
        del self.master.plugin_calls[:]
        error = None
        t0 = time.monotonic_ns()
        try:
            after = self.sm.gc(w.sr)
        except smmod.SmError as e:
            after, error = None, (e.err or e.out)[-1500:]
        t1 = time.monotonic_ns()
        time.sleep(0.2)
        out["max_gap_ms"] = round(txverify.max_gap(log, t0, t1), 1)
        out["wall_ms"] = round((t1 - t0) / 1e6, 1)
        smlog = self.sm.log()[mark:]
        out["sm_did"] = _what_sm_did(smlog)
        out["sm_error"] = error
        calls = [(fn, a, b, w) for plugin, fn, a, b, w in self.master.plugin_calls
                 if plugin == "tapdisk-pause"]
        out["tap_pause_calls"] = [[fn, round((b - a) / 1e6, 1)] for fn, a, b, _ in calls]
        out["tap_pause_call_parts_ms"] = _plugin_parts(smlog, calls)
        out["sm_pause_ms"] = _pause_windows([c[:3] for c in calls])
        out["speed_after_mib_s"] = _speed(speed_log)
        merged = after is not None and after["vdis"].get(leaf_uuid, {}).get("parent") is None \
            and not [b for b in bases if b in after["vdis"]]
        out["merged"] = merged
        out["left_coalesceable"] = None if after is None else after["leaf_coalesceable"]
        rc, o, e = w.tapdisks.destroy(pid, minor)
        if rc != 0:
            raise BenchError("tap-ctl destroy failed (%d): %s %s" % (rc, o, e))
        if merged:
            out["acked_writes"] = self.check_disk(path, size, log)
        else:                                     # the chain as left: still intact
            try:
                out["acked_writes"] = txverify.assert_intact(log, path).acked
            except AssertionError as e:
                raise BenchError("acknowledged writes lost: %s" % e)
        out["chain_after"] = _chain(path)
        out["verified"] = True
        return out


FLOOR_KINDS = ("livesnap", "livesnap_direct", "plain")
FLOOR_SPACING_S = 0.1


def _floor_plain(pid, minor, path, wait):
    """``tap-ctl pause`` then ``tap-ctl unpause -a vhd:PATH``, the real commands, nothing
    else. A pause not answered within ``wait`` s (tapdisk can leave a finished pause
    unanswered until an event wakes it: docs/xen.md) is then woken by ``tap-ctl list -p PID``
    every 0.1 s, and said (``unanswered``)."""
    tc = blktap.tap_ctl_bin()
    t0 = time.monotonic_ns()
    p = subprocess.Popen([tc, "pause", "-p", str(pid), "-m", str(minor)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    unanswered = False
    try:
        out, err = p.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        unanswered = True
        deadline = time.monotonic() + 30
        while True:
            blktap.tap_ctl("list", "-p", str(pid))
            try:
                out, err = p.communicate(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    p.kill()
                    p.communicate()
                    blktap.tap_ctl("unpause", "-p", str(pid), "-m", str(minor),
                                   "-a", "vhd:" + path)
                    raise BenchError("tap-ctl pause of %d/%d: no answer in 30 s"
                                     % (pid, minor))
    t1 = time.monotonic_ns()
    if p.returncode != 0:
        raise BenchError("tap-ctl pause of %d/%d failed (%d): %s %s"
                         % (pid, minor, p.returncode, out, err))
    rc, out, err = blktap.tap_ctl("unpause", "-p", str(pid), "-m", str(minor),
                                  "-a", "vhd:" + path)
    t2 = time.monotonic_ns()
    if rc != 0:
        raise BenchError("tap-ctl unpause of %d/%d failed (%d): %s %s"
                         % (pid, minor, rc, out, err))
    return {"pause_ms": round((t1 - t0) / 1e6, 1), "unpause_ms": round((t2 - t1) / 1e6, 1),
            "window_ms": round((t2 - t0) / 1e6, 1), "unanswered": unanswered}


def _floor_summary(log, runs):
    """Of one kind's bare pauses [(t0, t1, facts)]: the guest's longest gap over each
    window, their min, median and max, each pause's own facts, how many went unanswered."""
    gaps = [round(txverify.max_gap(log, t0, t1), 1) for t0, t1, _ in runs]
    return {"gaps_ms": gaps,
            "min_ms": min(gaps) if gaps else None,
            "median_ms": round(statistics.median(gaps), 1) if gaps else None,
            "max_ms": max(gaps) if gaps else None,
            "window_ms": [f["window_ms"] for _, _, f in runs],
            "pause_ms": [f["pause_ms"] for _, _, f in runs],
            "unanswered": sum(1 for _, _, f in runs if f.get("unanswered"))}


def _gaps_in_and_out(log, t0, t1, pauses):
    """The guest's longest gap (ms) over each pause [(a, b, c, d)] (a gap touching [a, d]),
    and its longest gap over [t0, t1] touching none of them: {"ms", "after_pause": how many
    pauses had ended before it began, "ms_after": since the last of them ended (since t0 if
    none; 0 for a gap that began before t0)}."""
    times = [t for _, t in txverify.acks(log)]
    inside = [round(txverify.max_gap(log, a, d), 1) for a, b, c, d in pauses]
    best = (0, t0, t0)
    for x, y in zip(times, times[1:]):
        if y >= t0 and x <= t1 and not any(y >= a and x <= d for a, b, c, d in pauses) \
                and y - x > best[0]:
            best = (y - x, x, y)
    ends = [d for a, b, c, d in pauses if d <= best[1]]
    return inside, {"ms": round(best[0] / 1e6, 1), "after_pause": len(ends),
                    "ms_after": round(max(0, best[1] - max(ends + [t0])) / 1e6, 1)}


def _parts(pause):
    """A logged pause (xen_tapctl.pauses) as [tap-ctl pause ms, paused between the two
    commands ms, tap-ctl unpause ms]."""
    a, b, c, d = pause
    return [round((b - a) / 1e6, 1), round((c - b) / 1e6, 1), round((d - c) / 1e6, 1)]


def _floor_figures(floor, ls_gap, sm_gap):
    """The per-size figures of the floor (``Run.floor``'s summary, or None): its median gap
    for livesnap's pause and for plain tap-ctl, its max, and the ratios livesnap/SM,
    livesnap/floor, floor/SM (floor: livesnap's kind, median), plain floor/SM."""
    if not floor:
        return {}
    f, plain = floor["livesnap"], floor["plain"]
    return {"floor_gap_ms": f["median_ms"], "floor_max_gap_ms": f["max_ms"],
            "floor_direct_gap_ms": floor.get("livesnap_direct", f)["median_ms"],
            "floor_plain_gap_ms": plain["median_ms"],
            "floor_plain_unanswered": plain["unanswered"],
            "ratio_livesnap_floor": harness.ratio(ls_gap, f["median_ms"]),
            "ratio_floor_sm": harness.ratio(f["median_ms"], sm_gap),
            "ratio_floor_plain_sm": harness.ratio(plain["median_ms"], sm_gap)}


def _shim(prefix):
    return os.path.join(prefix, "lib", "memlock_shim.so")


def _shim_knows(prefix, name):
    """Whether the test bed's LD_PRELOAD shim reads the environment variable ``name``."""
    try:
        with open(_shim(prefix), "rb") as f:
            return name in f.read()
    except OSError:
        return False


def _chain(path):
    """The images of ``path``'s chain below it (file names), as vhd-util reads them."""
    out = []
    while path:
        out.append(os.path.basename(path))
        path = blktap.query(path)["parent"]
    return out


def _speed(path):
    """SM's storage speed for the SR (the mean of its speed log, MiB/s), None without one."""
    try:
        with open(path) as f:
            vals = [float(v) for v in f.read().split()]
    except OSError:
        return None
    return round(sum(vals) / len(vals) / MiB, 1) if vals else None


def _allocated_mib(bt, path):
    """vhd-util query -a (allocated blocks) x 2 MiB, as SM's getAllocatedSize."""
    p = bt.vhd("query", "-n", path, "-a", check=False)
    try:
        return int(p.stdout.strip()) * 2
    except ValueError:
        return None


def _what_sm_did(smlog):
    """Counts of the SMlog lines that say what the GC did, and a one-word verdict."""
    seen = {}
    for line in smlog.splitlines():
        for text, key in ACTIONS:
            if text in line:
                seen[key] = seen.get(key, 0) + 1
    if seen.get("snapshot_coalesce"):
        verdict = "snapshot-coalesce"
    elif seen.get("leaf_coalesce_candidate") and seen.get("tap_pause"):
        verdict = "live leaf-coalesce"
    else:
        verdict = "nothing"
    if seen.get("leaf_coalesce_failed"):
        verdict += " (failed)"
    return {"verdict": verdict, "lines": seen,
            "messages": [ln.split("] ", 1)[-1] for ln in smlog.splitlines()
                         if re.search(r"Leaf-coalesc|Single-snapshot|speed|Speed|Aborted|"
                                      r"failed|Failure", ln)][:12]}


def _plugin_parts(smlog, calls):
    """Each tapdisk-pause call [(fn, start, end, wall start)] in two parts (ms): from the
    call to its plugin process's first SMlog line (the process started, Python and SM's
    imports, the plugin loaded: what xapi's run of a plugin costs before SM's code acts),
    and from there to the call's end (SM's Tapdisk: its VDI lock, tap-ctl list and pause or
    unpause, the XAPI calls of the CBT question). The plugin processes are the SMlog pids
    that log "Pause for" / "Unpause for", taken in order."""
    first, order = {}, []
    for line in smlog.splitlines():
        m = re.match(r"(\d+\.\d+) SM\[(\d+)\] (.*)", line)
        if not m:
            continue
        pid = m.group(2)
        first.setdefault(pid, float(m.group(1)))
        if re.match(r"(Pause|Unpause) for ", m.group(3)) and pid not in order:
            order.append(pid)
    out = []
    for (fn, a, b, w), pid in zip(calls, order):
        start = round((first[pid] - w) * 1e3, 1)
        out.append([fn, start, round((b - a) / 1e6 - start, 1)])
    return out


def _pause_windows(calls):
    """Each pause of the tapdisk as the plugin saw it: pause call start to the next unpause
    call's end (ms); a refresh is a pause of its own."""
    out, start = [], None
    for fn, a, b in calls:
        if fn == "pause" and start is None:
            start = a
        elif fn == "unpause" and start is not None:
            out.append(round((b - start) / 1e6, 1))
            start = None
        elif fn == "refresh":
            out.append(round((b - a) / 1e6, 1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,32,128,512",
                    help="MiB written to the leaf since the snapshot, comma separated")
    ap.add_argument("--quiet-s", type=float, default=1.0, help="quiet window per disk")
    ap.add_argument("--no-speed-log", action="store_true",
                    help="remove SM's speed log before each GC pass (a fresh SR's decision)")
    ap.add_argument("--attempts", type=int, default=2,
                    help="livesnap attempts per size when one fails (an unanswered pause)")
    ap.add_argument("--floor-cycles", type=int, default=10,
                    help="bare pauses of each kind (livesnap's pause, plain tap-ctl) on "
                         "livesnap's tapdisk before its delete, per size (0: none)")
    ap.add_argument("--floor-plain-wait", type=float, default=1.0,
                    help="seconds a plain 'tap-ctl pause' of the floor may go unanswered "
                         "before it is woken by 'tap-ctl list' (and counted unanswered)")
    ap.add_argument("--tapctl-log", action="store_true",
                    help="livesnap's tap-ctl through bench/xen.py's logging wrapper (each "
                         "pause's parts; a few ms more per call), not the real one directly")
    ap.add_argument("--tapdisk-console", action="store_true",
                    help="let tapdisk's syslog go to /dev/console, as it does in the test bed "
                         "without a syslog daemon (2-3 ms per message, inside the pauses)")
    harness.add_output_options(ap)
    a = ap.parse_args(argv)
    sizes = harness.sizes_of(a)
    try:
        prefix = blktap.prefix()
    except blktap.MissingBuild as e:
        print("bench/xen_sm.py: %s" % e, file=sys.stderr)
        return 2
    console = a.tapdisk_console
    if not console and not _shim_knows(prefix, b"TESTXEN_TAPDISK_NO_CONSOLE"):
        print("bench/xen_sm.py: the blktap build's shim (%s) predates "
              "TESTXEN_TAPDISK_NO_CONSOLE (run scripts/build-blktap.sh): tapdisk logs to the "
              "console in this run" % _shim(prefix), file=sys.stderr)
        console = "kept: the shim predates TESTXEN_TAPDISK_NO_CONSOLE"
    harness.unwind_on_sigterm()
    os.environ.update(blktap.env())
    if not console:
        os.environ["TESTXEN_TAPDISK_NO_CONSOLE"] = "1"     # the tapdisks started below
    # short and without "_" (XenAPI's UNIX-socket URL naming)
    base = os.path.join(a.dir or "/tmp", "xsb" + uuid.uuid4().hex[:10])
    os.makedirs(base)
    started = time.monotonic()
    results = []
    run = None
    try:
        run = Run(base, a.no_speed_log, a.tapctl_log)
        for size in sizes:
            sm = run.sm_gc(size, a.quiet_s)
            print("# sm       %4d MiB: max gap %s ms, %s, pauses %s, plugin calls [fn, "
                  "start-up, code] %s" % (
                      size, sm["max_gap_ms"], sm["sm_did"]["verdict"], sm["sm_pause_ms"],
                      sm["tap_pause_call_parts_ms"]), file=sys.stderr)
            attempts = []
            for _ in range(a.attempts):
                ls = run.livesnap(size, a.quiet_s, a.floor_cycles, a.floor_plain_wait)
                attempts.append(ls)
                print("# livesnap %4d MiB: max gap %s ms, pauses %s %s" % (
                    size, ls["max_gap_ms"], ls["pauses_ms"], ls.get("error") or ""),
                    file=sys.stderr)
                if "error" not in ls:
                    break
            ls = attempts[-1]
            fl = _floor_figures(ls.get("floor"), ls["max_gap_ms"], sm["max_gap_ms"])
            if fl:
                print("# floor    %4d MiB: median gap %s ms (plain tap-ctl %s ms), "
                      "livesnap/floor %s, floor/SM %s" % (
                          size, fl["floor_gap_ms"], fl["floor_plain_gap_ms"],
                          fl["ratio_livesnap_floor"], fl["ratio_floor_sm"]), file=sys.stderr)
            row = {"mib": size, "livesnap_max_gap_ms": ls["max_gap_ms"],
                   "sm_max_gap_ms": sm["max_gap_ms"],
                   "ratio": harness.ratio(ls["max_gap_ms"], sm["max_gap_ms"]),
                   "livesnap_did": ("%s, %s rounds" % (ls["merges"][0]["method"],
                                                       ls["merges"][0]["rounds"])
                                    if ls["merges"] else "error: %s" % ls.get("error")),
                   "livesnap_failed_attempts": attempts[:-1],
                   "sm_did": sm["sm_did"]["verdict"]}
            row.update(fl)
            row.update({"livesnap": ls, "sm": sm})
            results.append(row)
    except BenchError as e:
        print("bench/xen_sm.py: %s" % e, file=sys.stderr)
        return 1
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if run is not None:
                run.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    doc = {
        "benchmark": "xen_sm",
        "host": {"python": platform.python_version(), "nproc": os.cpu_count(),
                 "tapdisk": "real blktap tapdisk and tap-ctl (%s), the guest writing over NBD"
                            % prefix, "sm": os.path.basename(smmod.archive())},
        "params": {"sizes_mib": sizes, "quiet_s": a.quiet_s, "no_speed_log": a.no_speed_log,
                   "tapdisk_console": console, "tapctl_log": a.tapctl_log,
                   "data_offset_mib": DATA_OFFSET_MIB,
                   "disk_mib": {str(s): 2 * DATA_OFFSET_MIB + 2 * s for s in sizes},
                   "max_gap": "longest gap between acknowledged guest writes over the "
                              "operation's window (snapshot_delete; SM's GC pass)",
                   "ratio": "livesnap max gap / SM max gap",
                   "floor_cycles": a.floor_cycles, "floor_plain_wait_s": a.floor_plain_wait,
                   "floor": "bare pauses of livesnap's tapdisk (its guest writing, its chain "
                            "before the delete), nothing done while paused, %d of each kind "
                            "interleaved: livesnap (tap_ctl.paused through the tap-ctl the "
                            "fold uses), livesnap_direct (with --tapctl-log: the same through "
                            "the real tap-ctl), plain (tap-ctl pause, then tap-ctl unpause "
                            "-a); floor_gap_ms: the median over livesnap's kind of the guest's "
                            "longest gap per pause, floor_plain_gap_ms the same for plain"
                            % a.floor_cycles},
        "sizes": results,
        "verified": bool(results) and all(
            r["livesnap"]["verified"] and r["sm"]["verified"] and "error" not in r["livesnap"]
            and r["sm"]["merged"] and len(r["livesnap"]["chain_after"]) == 1
            and len(r["sm"]["chain_after"]) == 1 for r in results),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return harness.emit(doc, a.out)


if __name__ == "__main__":
    sys.exit(main())
