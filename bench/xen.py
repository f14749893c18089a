#!/usr/bin/env python3
"""Pause window and guest-visible IO stall of livesnap's create and of each kind of delete on
the tapdisk datapath, against the seed / XAPI way of merging the active leaf (pause the
tapdisk for the whole copy), with the tapdisk stand-in (testxen) and its writer guest.

For every size S (MiB to move) and repeat, five scenarios, each on a fresh VM: one VHD disk
xvda of 32 + 2*S MiB described by a domain XML file, the writer's ring (TESTXEN_SLOTS x
TESTXEN_STRIDE = 8 x 1 MiB) at offset 0, bulk data written with livesnap.vhd while no tapdisk
runs, at offsets after the ring (A = S MiB at [16M, 16M+S), B = S MiB at [16M+S, 16M+2S)), the
snapshots taken by livesnap offline (so the catalog knows them), then a stand-in tapdisk
started on the leaf, its writer running, a quiet window measured (baseline gap distribution):

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
baseline: tap_ctl.paused's window_ms, pause command to unpause returned); the stand-in's own
paused intervals (its ack log's STATE paused / STATE running lines: what the guest really
waited for, per pause); the guest-visible stall = testxen.verify.max_gap of the ack log over the
command's window, and excess_ms = stall - the quiet window's median gap. Every scenario ends
with tap-ctl close, testxen.verify.assert_intact of the disk (no acknowledged write lost), a
read-back of A and B through the chain that must hold them, and vhd.check of every image.

Per size the summary takes, over repeats, the median wall time and the worst (max) stall and
pause. Ratios are livesnap / baseline (delete vs xapi_leaf_coalesce, create vs null pause);
"scaling" compares the stall at the largest size with the smallest. The stand-in's tap-ctl is a
Python program (~50-100 ms per call, two calls per pause and two per unpause), so every pause
here has a floor far above real tapdisk's; null_pause measures it.

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
import glob
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from livesnap import vhd  # noqa: E402
from livesnap.datapaths import vhd_storage  # noqa: E402
from livesnap.tools import lvm, tap_ctl  # noqa: E402
from testxen import lvm as txlvm  # noqa: E402
from testxen import tapctl  # noqa: E402
from testxen import verify as txverify  # noqa: E402

TAP_CTL = os.path.join(ROOT, "testxen", "tap-ctl")
MiB = 1 << 20
SLOTS, STRIDE = 8, MiB                 # the writer's ring: 8 MiB at offset 0
DATA_OFFSET_MIB = 16                   # bulk data starts here, after the ring
SCENARIOS = ("delete_intermediate", "delete_active", "delete_hide", "xapi_leaf_coalesce")
DEV = "/dev/xen/blktap-2/tapdev"
LVM_STANDIN = os.path.join(ROOT, "testxen", "lvm")


class BenchError(RuntimeError):
    pass


def chunk(tag, i):
    """MiB number i of region ``tag`` (A or B): 8-byte units naming region and MiB."""
    return (b"%s%07d" % (tag, i)) * (MiB // 8)


def ms(ns):
    return round(ns / 1e6, 1)


class Vm(object):
    """One fresh Xen VM: one VHD disk, a domain XML file, livesnap's state dir, and (once
    started) one stand-in tapdisk whose writer is the guest."""

    def __init__(self, kind, size_mib, workdir, quiet_s, vg=None):
        self.kind, self.size, self.quiet_s = kind, size_mib, quiet_s
        self.vg = vg
        self.dir = tempfile.mkdtemp(prefix="%s-%d-" % (kind[:10], size_mib), dir=workdir)
        self.state_dir = os.path.join(self.dir, "state")
        self.name = "lsbx-" + uuid.uuid4().hex[:8]
        self.virtual_size = (2 * DATA_OFFSET_MIB + 2 * size_mib) * MiB
        if vg:
            # the images are LVs of the run's VG: this VM's are those it did not have before
            self.img_dir = os.path.join("/dev", vg)
            self.lvs_before = set(vg_report())
            self.leaf = lvm.lv_path(vg, "VHD-%s" % uuid.uuid4())
            disk = ("<disk type='block' device='disk'><driver name='tap2' type='vhd'/>"
                    "<source dev='%s'/>" % self.leaf)
        else:
            self.img_dir = self.dir
            self.leaf = os.path.join(self.dir, "%s.vhd" % uuid.uuid4())
            disk = ("<disk type='file' device='disk'>"
                    "<driver name='tap2' type='vhd'/><source file='%s'/>" % self.leaf)
        self.xml = os.path.join(self.dir, "vm.xml")
        with open(self.xml, "w") as f:
            f.write("<domain type='xen'><name>%s</name><uuid>%s</uuid><memory>131072</memory>"
                    "<os><type>hvm</type></os><devices>%s"
                    "<target dev='xvda' bus='xen'/></disk></devices></domain>"
                    % (self.name, uuid.uuid4(), disk))
        self.td = None
        self.ack_log = None
        self.pids = set()
        self.images = {}          # snapshot name -> image path (from livesnap's JSON)
        self.result = {"scenario": kind, "mib": size_mib, "domain": self.name}

    # -- commands ---------------------------------------------------------------------------
    def livesnap(self, *args):
        env = dict(os.environ, LIVESNAP_STATE_DIR=self.state_dir)
        env.pop("LIVESNAP_FAULT", None)
        p = subprocess.run([sys.executable, "-m", "livesnap.cli.main"] + list(args)
                           + ["--domain-xml", self.xml, "--output", "json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, env=env, cwd=ROOT)
        if p.returncode != 0:
            raise BenchError("livesnap %s failed (%d): %s %s" % (" ".join(args), p.returncode,
                                                                 p.stdout.strip(),
                                                                 p.stderr.strip()[-2000:]))
        return json.loads(p.stdout)

    def snapshot(self, name):
        out = self.livesnap("snapshot-create", self.name, name)
        (d,) = out["disks"]
        self.images[name] = d["image"]
        return out

    def fill(self, path, tag, offset_mib):
        with vhd.open_image(path, writable=True) as img:
            for i in range(self.size):
                img.write((offset_mib + i) * MiB, chunk(tag, i))

    def image_names(self):
        """The VM's images in its directory: ``*.vhd`` files, or the LVs in /dev/<vg> (one VM
        at a time uses the VG; dot names are the stand-in's links being made)."""
        if self.vg:
            return [f for f in os.listdir(self.img_dir) if not f.startswith(".")]
        return [f for f in os.listdir(self.dir) if f.endswith(".vhd")]

    # -- setup (no tapdisk runs) ------------------------------------------------------------
    def prepare(self):
        s = self.size
        if self.vg:
            lvm.lvcreate(self.vg, os.path.basename(self.leaf), lvm.full_size(self.virtual_size))
        vhd.create(self.leaf, self.virtual_size)
        self.fill(self.leaf, b"A", DATA_OFFSET_MIB)
        self.snapshot("s1")                                  # s1 holds A
        self.fill(self.leaf, b"B", DATA_OFFSET_MIB + s)      # the leaf holds B
        if self.kind == "delete_intermediate":
            self.snapshot("s2")                              # s2 holds B, a new empty leaf
        elif self.kind == "delete_hide":
            before = set(self.image_names())
            out = self.livesnap("snapshot-revert", self.name, "s1", "--keep-current", "k")
            if out.get("kept") != "k":
                raise BenchError("revert kept %r" % out.get("kept"))
            new = sorted(set(self.image_names()) - before)
            if len(new) != 1:
                raise BenchError("revert --keep-current: unexpected new files %s" % new)
            self.images["k"] = os.path.join(self.img_dir, new[0])   # k holds B
        self.result["chain_before"] = [os.path.basename(p) for p in vhd.chain_paths(self.leaf)]

    def start(self):
        p = subprocess.run([TAP_CTL, "create", "-a", "vhd:%s" % self.leaf],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
        if p.returncode != 0 or not p.stdout.startswith(DEV):
            raise BenchError("tap-ctl create failed (%d): %s" % (p.returncode, p.stderr))
        minor = int(p.stdout.strip()[len(DEV):])
        (self.td,) = tap_ctl.list_(minor=minor)
        self.pids.add(self.td.pid)
        self.ack_log = os.path.join(os.environ["TESTXEN_RUN_DIR"],
                                    "tapdisk%d.%d.ack" % (self.td.pid, self.td.minor))
        self.wait_acks(20)
        t0 = time.monotonic_ns()
        time.sleep(self.quiet_s)
        t1 = time.monotonic_ns()
        gaps = sorted(b - a for a, b in self.ack_pairs(t0, t1))
        if not gaps:
            raise BenchError("no acks in the quiet window")
        self.result["baseline_gap"] = {
            "n": len(gaps), "median_ms": ms(statistics.median(gaps)),
            "p99_ms": ms(gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]),
            "max_ms": ms(gaps[-1])}

    # -- the ack log ------------------------------------------------------------------------
    def acked(self):
        return len(txverify.acks(self.ack_log))

    def wait_acks(self, n, timeout=30.0):
        """Wait for ``n`` more acks than now."""
        want = self.acked() + n
        deadline = time.monotonic() + timeout
        while self.acked() < want:
            if time.monotonic() > deadline:
                raise BenchError("the guest stopped acknowledging writes (%s)" % self.ack_log)
            time.sleep(0.01)

    def ack_pairs(self, t0, t1):
        times = [t for _, t in txverify.acks(self.ack_log)]
        return [(a, b) for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]

    def paused_intervals(self, t0, t1):
        """The stand-in's own pauses that began in [t0, t1]: [ms paused]."""
        return [ms(b - a) for a, b in self.paused_spans(t0, t1)]

    def paused_spans(self, t0, t1):
        """The stand-in's own pauses that began in [t0, t1]: [(paused ns, running ns)]."""
        out, since = [], None
        with open(self.ack_log) as f:
            for line in f:
                if not line.startswith("STATE "):
                    continue
                parts = line.split()
                ns = int(parts[2])
                if parts[1] == "paused":
                    since = ns
                elif parts[1] == "running" and since is not None:
                    if t0 <= since <= t1:
                        out.append((since, ns))
                    since = None
        return out

    # -- measuring --------------------------------------------------------------------------
    def timed(self, fn):
        """Run fn() with the guest writing: wall time, guest stall, the stand-in's pauses."""
        t0 = time.monotonic_ns()
        out = fn()
        t1 = time.monotonic_ns()
        self.wait_acks(3)                      # the gap that spans t1 must have closed
        pairs = self.ack_pairs(t0, t1)
        worst = max(pairs, key=lambda p: p[1] - p[0]) if pairs else None
        spans = self.paused_spans(t0, t1)
        paused = [ms(b - a) for a, b in spans]
        m = {"wall_ms": ms(t1 - t0),
             "stall_ms": round(txverify.max_gap(self.ack_log, t0, t1), 1),
             "stall_at_ms": ms(worst[0] - t0) if worst else None,
             "acks_in_window": len(pairs),
             "pauses": len(paused),
             "tapdisk_paused_ms": paused,
             "tapdisk_paused_max_ms": max(paused) if paused else 0.0,
             "tapdisk_paused_total_ms": round(sum(paused), 1)}
        m["excess_ms"] = round(max(0.0, m["stall_ms"] - self.result["baseline_gap"]["median_ms"]),
                               1)
        if self.vg:
            # LVM commands that ended in the window; per stand-in pause, those that ended in it
            cmds = [c for c in lvm_log() if t0 <= c[1] <= t1]
            m["lvm_commands"] = len(cmds)
            m["lvm_in_pauses"] = [[verb for _, end, verb in cmds if a <= end <= b]
                                  for a, b in spans]
            m["lvm_commands_in_pause"] = sum(len(x) for x in m["lvm_in_pauses"])
        return out, m

    def livesnap_op(self, *args):
        out, m = self.timed(lambda: self.livesnap(*args))
        m["pause_ms"] = None if out.get("pause_ms") is None else round(out["pause_ms"], 1)
        m["action"] = out.get("action")
        m["datapath"] = out.get("datapath")
        if "merges" in out:
            m["merges"] = [{"method": x["method"], "fallback": x["fallback"],
                            "pause_ms": None if x.get("pause_ms") is None
                            else round(x["pause_ms"], 1)} for x in out["merges"]]
        return m

    def null_pause(self):
        """tap_ctl.paused() around nothing: the floor of a pause with this tap-ctl."""
        def op():
            with tap_ctl.paused(self.td.pid, self.td.minor, path=self.leaf) as win:
                pass
            return win
        win, m = self.timed(op)
        m["pause_ms"] = round(win.window_ms, 1)
        m["pause_command_ms"] = round(win.pause_ms, 1)
        return m

    def xapi_leaf_coalesce(self):
        """The baseline: the tapdisk paused for the whole merge of the active leaf into s1
        (vhd.coalesce) and XAPI's swap (cleanup.py _doCoalesceLeaf: child -> OLD_, parent ->
        the child's name), unpause -a on the leaf path; OLD_ is removed after the unpause."""
        if self.vg:
            return self.xapi_leaf_coalesce_lvhd()
        parent = self.images["s1"]
        old = os.path.join(self.dir, "OLD_" + os.path.basename(self.leaf))
        info = {}

        def op():
            with tap_ctl.paused(self.td.pid, self.td.minor, path=self.leaf) as win:
                c0 = time.monotonic()
                info["sectors"] = vhd.coalesce(self.leaf)
                info["copy_ms"] = round((time.monotonic() - c0) * 1000.0, 1)
                os.rename(self.leaf, old)
                os.rename(parent, self.leaf)
                fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.unlink(old)
            return win
        win, m = self.timed(op)
        m["pause_ms"] = round(win.window_ms, 1)
        m["pause_command_ms"] = round(win.pause_ms, 1)
        m["copy_ms"] = info["copy_ms"]
        m["moved_mib"] = round(info["sectors"] * 512.0 / MiB, 1)
        m["action"] = "merged"
        return m

    def xapi_leaf_coalesce_lvhd(self):
        """The baseline on LVHD, as SM's live leaf-coalesce (cleanup.py _liveLeafCoalesce /
        _doCoalesceLeaf, LVHD _prepareCoalesceLeaf and _finishCoalesceLeaf), all inside the
        pause: the parent's LV writable, the leaf deflated, the parent inflated by what the
        coalesce can add; coalesce; lvrename leaf -> OLD_<name>, parent -> the leaf's name; the
        new leaf inflated to its full size (inflateFully); unpause -a. OLD_ is lvremoved after
        the unpause. The footer moves are in-process (vhd_storage.LvmStorage, as livesnap's own
        pauses do them) rather than vhd-util runs."""
        st = vhd_storage.for_path(self.leaf)
        parent = self.images["s1"]
        leaf_lv, parent_lv = os.path.basename(self.leaf), os.path.basename(parent)
        old = lvm.lv_path(self.vg, "OLD_" + leaf_lv)
        info = {}

        def step(key, t):
            info[key] = round((time.monotonic() - t) * 1000.0, 1)

        def op():
            with tap_ctl.paused(self.td.pid, self.td.minor, path=self.leaf) as win:
                t = time.monotonic()                            # SM step 3
                lvm.set_readonly(self.vg, parent_lv, False)
                st._deflate(self.leaf)
                with vhd.open_image(parent, chain=False) as img:
                    physical = img.physical_size
                info["inflate_by"] = vhd_storage.merge_extra(self.leaf)
                st._inflate(parent, physical + info["inflate_by"])
                step("lvm_prepare_ms", t)
                t = time.monotonic()                            # step 6
                info["sectors"] = vhd.coalesce(self.leaf)
                step("copy_ms", t)
                t = time.monotonic()                            # step 8
                lvm.lvrename(self.vg, leaf_lv, "OLD_" + leaf_lv)
                lvm.lvrename(self.vg, parent_lv, leaf_lv)
                step("rename_ms", t)
                t = time.monotonic()                            # step 10: inflateFully
                st._inflate(self.leaf, lvm.full_size(self.virtual_size))
                step("inflate_full_ms", t)
            t = time.monotonic()                                # after ensureUnpaused
            st.remove(old)
            step("old_remove_ms", t)
            return win
        win, m = self.timed(op)
        m["pause_ms"] = round(win.window_ms, 1)
        m["pause_command_ms"] = round(win.pause_ms, 1)
        for k in ("lvm_prepare_ms", "copy_ms", "rename_ms", "inflate_full_ms", "old_remove_ms"):
            m[k] = info[k]
        m["inflate_by_mib"] = round(info["inflate_by"] / float(MiB), 1)
        m["moved_mib"] = round(info["sectors"] * 512.0 / MiB, 1)
        m["action"] = "merged"
        return m

    # -- the end ----------------------------------------------------------------------------
    def finish(self):
        """Close the tapdisk; every acknowledged write, A and B, and every image are intact."""
        self.wait_acks(5)
        td = tap_ctl.find(self.leaf)
        if td is None or td.pid != self.td.pid:
            raise BenchError("the tapdisk of %s is gone or changed: %s" % (self.leaf, td))
        if td.state & tap_ctl.PAUSED:
            raise BenchError("the tapdisk of %s was left paused" % self.leaf)
        p = subprocess.run([TAP_CTL, "close", "-p", str(td.pid), "-m", str(td.minor)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=120)
        if p.returncode != 0:
            raise BenchError("tap-ctl close failed (%d): %s" % (p.returncode, p.stderr))
        rep = txverify.assert_intact(self.ack_log, self.leaf, via="livesnap")
        self.result["acked_writes"] = rep.acked
        b_holder = self.images["k"] if self.kind == "delete_hide" else self.leaf
        self.check_region(self.leaf, b"A", DATA_OFFSET_MIB)
        self.check_region(b_holder, b"B", DATA_OFFSET_MIB + self.size)
        problems = {}
        for f in sorted(self.image_names()):
            pr = vhd.check(os.path.join(self.img_dir, f))
            if pr:
                problems[f] = pr
        if problems:
            raise BenchError("vhd check failed: %s" % problems)
        if self.vg:
            self.check_lvhd()
        self.result["chain_after"] = [os.path.basename(x) for x in vhd.chain_paths(self.leaf)]
        self.result["verified"] = True

    def check_lvhd(self):
        """The LVs as SM keeps them: the leaf writable and of its full size, every other image
        read-only and deflated to its VHD's physical size, no OLD_ left."""
        report = vg_report()
        problems = {}
        for name in sorted(set(report) - self.lvs_before):
            size, attr = report[name]
            path = lvm.lv_path(self.vg, name)
            if path == self.leaf:
                want, perm = lvm.full_size(self.virtual_size), "w"
            else:
                want, perm = lvm.round_extent(vhd.query(path).physical_size), "r"
            if size != want or attr[1] != perm or name.startswith("OLD_"):
                problems[name] = {"size": size, "want": want, "attr": attr, "want_perm": perm}
        if problems:
            raise BenchError("LVs not as SM keeps them: %s" % problems)
        self.result["lvs_after"] = {n: [s, a] for n, (s, a) in sorted(report.items())
                                    if n not in self.lvs_before}

    def check_region(self, path, tag, offset_mib):
        with vhd.open_image(path) as img:
            for i in range(self.size):
                if img.read((offset_mib + i) * MiB, MiB) != chunk(tag, i):
                    raise BenchError("%s: MiB %d of region %s does not read back"
                                     % (path, i, tag.decode()))

    def cleanup(self):
        pids = set(self.pids)
        for p in glob.glob(os.path.join(os.environ["TESTXEN_RUN_DIR"], "tapdisk*.json")):
            try:
                with open(p) as f:
                    entry = json.load(f)
            except (OSError, ValueError):
                continue
            prefix = self.img_dir + os.sep if self.vg else self.dir
            if os.path.normpath(entry.get("path", "")).startswith(prefix):
                pids.add(entry["pid"])
        kill(pids)
        if self.vg:
            # the LVs made for this VM, never the VG's directory (the VG goes at the end)
            try:
                for name in sorted(set(vg_report()) - self.lvs_before):
                    try:
                        lvm.lvremove(self.vg, name)
                    except lvm.LvNotFound:
                        pass
            except Exception as e:          # the VG is destroyed at the end anyway
                print("# warning: removing the LVs of %s: %s" % (self.name, e), file=sys.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self):
        try:
            self.prepare()
            self.start()
            if self.kind == "xapi_leaf_coalesce":
                self.result["op"] = self.xapi_leaf_coalesce()
            else:
                self.result["op"] = self.livesnap_op("snapshot-delete", self.name, "s1")
            if self.kind == "delete_intermediate":
                self.wait_acks(10)
                self.result["create"] = self.livesnap_op("snapshot-create", self.name, "c1")
                self.wait_acks(10)
                self.result["null_pause"] = self.null_pause()
                t0 = time.monotonic()
                self.livesnap("snapshot-list", self.name)
                self.result["livesnap_cli_floor_ms"] = round((time.monotonic() - t0) * 1000.0,
                                                             1)
            self.finish()
        finally:
            self.cleanup()
        return self.result


def kill(pids):
    tapctl.kill_all(pids=pids)


# --- LVM (--storage lvm) ---------------------------------------------------------------------

LVM_WRAPPER = """%(shebang)s
# bench/xen.py: the LVM stand-in (testxen/lvm), each command's monotonic start, end, verb logged
import os, sys, time
t0 = time.monotonic_ns()
sys.path.insert(0, %(root)r)
from testxen.lvm import main
rc = 1
try:
    rc = main(sys.argv)
finally:
    fd = os.open(%(log)r, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%%d %%d %%s %%s\\n" %% (t0, time.monotonic_ns(),
                                         sys.argv[1] if len(sys.argv) > 1 else "-", rc)).encode())
    os.close(fd)
sys.exit(rc)
"""


def lvm_log():
    """[(start ns, end ns, verb)] of every LVM command run so far (start: after the
    interpreter started)."""
    out = []
    try:
        with open(os.environ["LSBX_LVM_LOG"]) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    out.append((int(parts[0]), int(parts[1]), parts[2]))
    except (KeyError, OSError):
        pass
    return out


def vg_report():
    """{LV name: (size in bytes, lv_attr)} of the run's VG, as LVM reports it."""
    return {lv["lv_name"]: (int(lv["lv_size"]), lv["lv_attr"])
            for lv in txlvm.Vg(os.environ["TESTXEN_LVM_ROOT"]).report()}


def vg_size(sizes):
    """Two disks' full sizes at the biggest size (at least 256 MiB to move) plus a margin."""
    disk = (2 * DATA_OFFSET_MIB + 2 * max(sizes + [256])) * MiB
    return lvm.round_extent(2 * lvm.full_size(disk) + 256 * MiB)


def setup_vg(run_dir, root, vg, size):
    """The run's VG, livesnap pointed at it through the logging wrapper."""
    with open(LVM_STANDIN) as f:
        shebang = f.readline().strip()
    wrapper = os.path.join(run_dir, "lvm")
    log = os.path.join(run_dir, "lvm.log")
    with open(wrapper, "w") as f:
        f.write(LVM_WRAPPER % {"shebang": shebang, "root": ROOT, "log": log})
    os.chmod(wrapper, 0o755)
    os.environ.update({"TESTXEN_LVM_ROOT": root, "LVM": wrapper, "LSBX_LVM_LOG": log})
    txlvm.make_vg(root, vg, size)


def probe_lvm(vg, n=3):
    """What one stand-in command costs, from the caller: lvchange -p (changes metadata, so the
    stand-in then syncs its loop devices) and lvs (read-only), median of ``n`` runs each."""
    lv = "lsbx-probe"
    lvm.lvcreate(vg, lv, lvm.EXTENT)
    try:
        change, report = [], []
        for _ in range(n):
            for ro in (True, False):
                t = time.monotonic()
                lvm.set_readonly(vg, lv, ro)
                change.append((time.monotonic() - t) * 1000.0)
            t = time.monotonic()
            lvm.lv_size(vg, lv)
            report.append((time.monotonic() - t) * 1000.0)
    finally:
        lvm.lvremove(vg, lv)
    return {"lvchange_ms": round(statistics.median(change), 1),
            "lvs_ms": round(statistics.median(report), 1), "n": n}


def teardown_vg(root, vg):
    """The VG, its LVs' loop devices and links, its PV and loop device, the stand-in's root;
    then whatever an interrupted stand-in command may have left (a loop device over a file of
    ``root``, a link in /dev/<vg>)."""
    try:
        if os.path.exists(os.path.join(root, "vg.json")):
            txlvm.destroy_vg(root)
    except Exception as e:
        print("# warning: destroying %s: %s" % (vg, e), file=sys.stderr)
    p = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       universal_newlines=True)
    for line in p.stdout.splitlines():
        dev, _, rest = line.partition(":")
        if "(%s/" % root in rest:
            subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
    d = os.path.join("/dev", vg)
    if os.path.isdir(d) and not os.path.islink(d):
        for f in os.listdir(d):
            if os.path.islink(os.path.join(d, f)):
                os.unlink(os.path.join(d, f))
        try:
            os.rmdir(d)
        except OSError as e:
            print("# warning: %s left: %s" % (d, e), file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)


# --- summary --------------------------------------------------------------------------------

def ratio(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return None if a else 1.0
    return round(a / float(b), 3)


def agg(ms_list):
    """Over repeats: median wall, worst stall / pause / stand-in pause, median stall."""
    if not ms_list:
        return None
    pauses = [m["pause_ms"] for m in ms_list if m.get("pause_ms") is not None]
    out = {"n": len(ms_list),
           "wall_ms": round(statistics.median(m["wall_ms"] for m in ms_list), 1),
           "stall_ms": max(m["stall_ms"] for m in ms_list),
           "stall_median_ms": round(statistics.median(m["stall_ms"] for m in ms_list), 1),
           "excess_ms": max(m["excess_ms"] for m in ms_list),
           "pause_ms": max(pauses) if pauses else None,
           "tapdisk_paused_max_ms": max(m["tapdisk_paused_max_ms"] for m in ms_list),
           "tapdisk_paused_total_ms": max(m["tapdisk_paused_total_ms"] for m in ms_list),
           "pauses": max(m["pauses"] for m in ms_list)}
    for k in ("action", "copy_ms", "moved_mib", "lvm_prepare_ms", "rename_ms",
              "inflate_full_ms", "old_remove_ms", "inflate_by_mib"):
        vals = [m[k] for m in ms_list if m.get(k) is not None]
        if vals:
            out[k] = vals[0] if len(set(vals)) == 1 else (
                round(statistics.median(vals), 1) if k != "action" else sorted(set(vals)))
    for k in ("lvm_commands", "lvm_commands_in_pause"):
        vals = [m[k] for m in ms_list if m.get(k) is not None]
        if vals:
            out[k] = max(vals)
    methods = sorted({"+".join(x["method"] + ("(fallback)" if x["fallback"] else "")
                               for x in m.get("merges") or []) for m in ms_list} - {""})
    if methods:
        out["method"] = methods[0] if len(methods) == 1 else methods
    return out


def summarize(size, runs):
    def ops(kind, key="op"):
        return [r[key] for r in runs if r["scenario"] == kind and key in r]

    ops_by = {"create": agg(ops("delete_intermediate", "create")),
              "null_pause": agg(ops("delete_intermediate", "null_pause")),
              "delete_intermediate": agg(ops("delete_intermediate")),
              "delete_active": agg(ops("delete_active")),
              "delete_hide": agg(ops("delete_hide")),
              "xapi_leaf_coalesce": agg(ops("xapi_leaf_coalesce"))}
    base = ops_by["xapi_leaf_coalesce"]

    def rs(a, b):
        if a is None or b is None:
            return None
        return {"stall": ratio(a["stall_ms"], b["stall_ms"]),
                "excess_stall": ratio(a["excess_ms"], b["excess_ms"]),
                "pause": ratio(a["pause_ms"], b["pause_ms"]),
                "tapdisk_paused_max": ratio(a["tapdisk_paused_max_ms"],
                                            b["tapdisk_paused_max_ms"]),
                "wall": ratio(a["wall_ms"], b["wall_ms"])}

    gaps = [r["baseline_gap"] for r in runs]
    floor = [r["livesnap_cli_floor_ms"] for r in runs if "livesnap_cli_floor_ms" in r]
    return dict(
        {"mib": size,
         "baseline_gap": {"median_ms": round(statistics.median(g["median_ms"] for g in gaps), 1),
                          "p99_ms": max(g["p99_ms"] for g in gaps),
                          "max_ms": max(g["max_ms"] for g in gaps)},
         "livesnap_cli_floor_ms": round(statistics.median(floor), 1) if floor else None},
        **ops_by,
        ratios={"delete_active_vs_xapi_leaf_coalesce": rs(ops_by["delete_active"], base),
                "delete_intermediate_vs_xapi_leaf_coalesce": rs(ops_by["delete_intermediate"],
                                                                base),
                "delete_hide_vs_xapi_leaf_coalesce": rs(ops_by["delete_hide"], base),
                "create_vs_null_pause": rs(ops_by["create"], ops_by["null_pause"])})


def scaling(summary):
    """Stall and pause at the largest size / at the smallest, per operation."""
    if len(summary) < 2:
        return None
    lo, hi = summary[0], summary[-1]
    out = {"from_mib": lo["mib"], "to_mib": hi["mib"]}
    for k in ("delete_active", "delete_intermediate", "create", "xapi_leaf_coalesce"):
        if lo.get(k) and hi.get(k):
            out[k] = {"stall_growth": ratio(hi[k]["stall_ms"], lo[k]["stall_ms"]),
                      "tapdisk_paused_growth": ratio(hi[k]["tapdisk_paused_max_ms"],
                                                     lo[k]["tapdisk_paused_max_ms"]),
                      "stall_ms": [s[k]["stall_ms"] for s in summary]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16,64,256", help="MiB to move, comma separated")
    ap.add_argument("--repeat", type=int, default=2, help="runs per size and scenario")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 MiB, one repeat, a short quiet window")
    ap.add_argument("--interval-ms", type=float, default=3.0,
                    help="the guest's pause between writes (TESTXEN_WRITER_INTERVAL)")
    ap.add_argument("--quiet-s", type=float, default=2.0, help="baseline window per VM")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=argparse.SUPPRESS)
    ap.add_argument("--storage", choices=("file", "lvm"), default="file",
                    help="the disk's images: VHD files in a directory, or LVs of a volume "
                         "group of the LVM stand-in (LVHD)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    a = ap.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    repeat = a.repeat
    if a.quick:
        sizes, repeat, a.quiet_s = [16], 1, min(a.quiet_s, 0.5)
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error("unknown scenario %r" % s)

    # SIGTERM unwinds like Ctrl-C: tapdisks killed, images and run dir removed
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(128 + signo))
    run_dir = tempfile.mkdtemp(prefix="lsbx", dir="/tmp")       # short: unix socket paths
    os.environ.update({"TAP_CTL": TAP_CTL, "TESTXEN_RUN_DIR": run_dir,
                       "TESTXEN_WRITER_INTERVAL": str(a.interval_ms / 1000.0),
                       "TESTXEN_SLOTS": str(SLOTS), "TESTXEN_STRIDE": str(STRIDE),
                       "TESTXEN_RETRY_INTERVAL": "0.05",
                       "TESTXEN_MAX_LIFETIME": "1800"})    # a safety net if all else fails
    workdir = tempfile.mkdtemp(prefix="lsb-xen-", dir=a.dir)
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
                    r = Vm(kind, size, workdir, a.quiet_s, vg=vg).run()
                    r["rep"] = rep
                    runs.append(r)
                    print("# %-20s %4d MiB rep %d: %s" % (kind, size, rep, json.dumps(r["op"])),
                          file=sys.stderr)
    finally:
        # a second Ctrl-C / SIGTERM must not stop the cleanup (delivered after it)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            tapctl.kill_all(run_dir)
        finally:
            if vg_root:
                teardown_vg(vg_root, vg)
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    summary = [summarize(s, [r for r in runs if r["mib"] == s]) for s in sizes]
    doc = {
        "benchmark": "xen",
        "host": {"python": platform.python_version(), "nproc": os.cpu_count(),
                 "tapdisk": "testxen stand-in (Python tap-ctl)"},
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
                   "tapdisk_paused_ms": "the stand-in's own paused intervals (STATE lines)",
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
            lvm_in_pauses="per stand-in pause, the LVM commands that ended inside it",
            baseline_lvhd="SM live leaf-coalesce on LVHD inside the pause: parent RW, leaf "
                          "deflated, parent inflated by merge_extra, coalesce, 2x lvrename, "
                          "inflateFully; OLD_ lvremoved after the unpause")
    text = json.dumps(doc, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if doc["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
