"""One fresh Xen VM of bench/xen.py: its VHD disk (files or LVs), the snapshots livesnap takes
offline, the real tapdisk serving it and the guest writing through it (testxen/blktap.py,
testxen/guest.py), the timed operations (livesnap's, the XAPI-style baseline, a null pause)
and the checks at the end, by the real tools (vhd-util check, reads through a real tapdisk).

A scenario is the chain a VM is set up on and the operation measured on it (``SCENARIOS``);
each operation is a ``Vm`` method returning its measurement (``timed``). A new way to merge
(another baseline) is a new method and a new entry, e.g. on the "active" chain."""
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import xen_tapctl
from harness import ROOT, BenchError, MiB, ratio
from livesnap import vhd
from livesnap.datapaths import vhd_storage
from livesnap.tools import lvm, tap_ctl
from testxen import blktap
from testxen import verify as txverify
from xen_lvm import lvm_log, vg_report

SLOTS, STRIDE = 8, MiB                 # the writer's ring: 8 MiB at offset 0
DATA_OFFSET_MIB = 16                   # bulk data starts here, after the ring
# scenario -> (chain set up: "intermediate" s1 <- s2 <- leaf, "active" s1 <- leaf, "hide"
# s1 <- {k, leaf}; the Vm method measuring the operation on s1)
SCENARIOS = collections.OrderedDict([
    ("delete_intermediate", ("intermediate", "livesnap_delete")),
    ("delete_active", ("active", "livesnap_delete")),
    ("delete_hide", ("hide", "livesnap_delete")),
    ("xapi_leaf_coalesce", ("active", "xapi_leaf_coalesce")),
])
BASELINES = ("xapi_leaf_coalesce",)    # the scenarios livesnap's deletes are compared with
PAUSE_TIMEOUT = tap_ctl.DEFAULT_PAUSE_TIMEOUT   # this process's pauses wait as livesnap's
UNANSWERED = ("tap-ctl pause of the real tapdisk got no answer: a known intermittent test-bed "
              "problem of the real tapdisk over NBD (under investigation, see the Makefile); "
              "run the benchmark again")


def chunk(tag, i):
    """MiB number i of region ``tag`` (A or B): 8-byte units naming region and MiB."""
    return (b"%s%07d" % (tag, i)) * (MiB // 8)


def ms(ns):
    return round(ns / 1e6, 1)


class Vm(object):
    """One fresh Xen VM: one VHD disk, a domain XML file, livesnap's state dir, and (once
    started) one real tapdisk serving it to a guest that writes through it over NBD."""

    def __init__(self, kind, size_mib, workdir, quiet_s, run_dir, interval_s, vg=None):
        self.kind, self.size, self.quiet_s = kind, size_mib, quiet_s
        self.chain, self.method = SCENARIOS[kind]
        self.run_dir = run_dir
        self.tapdisks = blktap.Tapdisks(run_dir, slots=SLOTS, stride=STRIDE,
                                        interval=interval_s)
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
            raise BenchError("livesnap %s failed (%d)%s: %s %s"
                             % (" ".join(args), p.returncode,
                                ": " + UNANSWERED if "no answer within" in p.stderr else "",
                                p.stdout.strip(), p.stderr.strip()[-2000:]))
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
        """The VM's images in its directory: ``*.vhd`` files, or the LVs of the run's VG it
        did not have before, active or not (livesnap leaves an LV nobody counts inactive on
        SM's VGs, as SM does)."""
        if self.vg:
            return sorted(set(vg_report()) - self.lvs_before)
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
        if self.chain == "intermediate":
            self.snapshot("s2")                              # s2 holds B, a new empty leaf
        elif self.chain == "hide":
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
        """The real tapdisk on the leaf, its guest writing; the quiet window's gaps."""
        try:
            pid, minor = self.tapdisks.create(self.leaf)
        except OSError as e:
            raise BenchError("starting the real tapdisk: %s" % e)
        self.td = tap_ctl.get(pid, minor)
        self.ack_log = self.tapdisks.ack_log(pid, minor)
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
        return self.tapdisks.acked(self.td.pid, self.td.minor)

    def wait_acks(self, n, timeout=30.0):
        """Wait for ``n`` more acks than now."""
        try:
            self.tapdisks.wait_acks(self.td.pid, self.td.minor, self.acked() + n, timeout)
        except AssertionError as e:
            raise BenchError("the guest stopped acknowledging writes (%s): %s"
                             % (self.ack_log, e))

    def ack_pairs(self, t0, t1):
        times = [t for _, t in txverify.acks(self.ack_log)]
        return [(a, b) for a, b in zip(times, times[1:]) if b >= t0 and a <= t1]

    def paused_spans(self, t0, t1):
        """The tapdisk's pauses that began in [t0, t1]: [(pause start, pause end, unpause
        start, unpause end)] in ns (the tap-ctl log, xen_tapctl)."""
        return [p for p in xen_tapctl.pauses(self.run_dir, self.td.pid, self.td.minor)
                if t0 <= p[0] <= t1]

    # -- measuring --------------------------------------------------------------------------
    def timed(self, fn):
        """Run fn() with the guest writing: wall time, guest stall, the tapdisk's pauses."""
        t0 = time.monotonic_ns()
        out = fn()
        t1 = time.monotonic_ns()
        self.wait_acks(3)                      # the gap that spans t1 must have closed
        pairs = self.ack_pairs(t0, t1)
        worst = max(pairs, key=lambda p: p[1] - p[0]) if pairs else None
        parts = self.paused_spans(t0, t1)
        spans = [(p[0], p[3]) for p in parts]
        paused = [ms(b - a) for a, b in spans]
        m = {"wall_ms": ms(t1 - t0),
             "stall_ms": round(txverify.max_gap(self.ack_log, t0, t1), 1),
             "stall_at_ms": ms(worst[0] - t0) if worst else None,
             "acks_in_window": len(pairs),
             "pauses": len(paused),
             "tapdisk_paused_ms": paused,
             "tapdisk_paused_max_ms": max(paused) if paused else 0.0,
             "tapdisk_paused_total_ms": round(sum(paused), 1),
             # per pause: the pause command, paused in between, the unpause command
             "tapdisk_pause_parts_ms": [[ms(b - a), ms(c - b), ms(d - c)]
                                        for a, b, c, d in parts]}
        quiet = self.result["baseline_gap"]
        m["excess_ms"] = round(max(0.0, m["stall_ms"] - quiet["median_ms"]), 1)
        # the longest gap against the longest gap of the same writer without any operation
        m["stall_vs_quiet"] = ratio(m["stall_ms"], quiet["max_ms"])
        if self.vg:
            # LVM commands that ended in the window; per tapdisk pause, those that ended in it
            cmds = [c for c in lvm_log() if t0 <= c[1] <= t1]
            m["lvm_commands"] = len(cmds)
            m["lvm_in_pauses"] = [[verb for _, end, verb in cmds if a <= end <= b]
                                  for a, b in spans]
            m["lvm_commands_in_pause"] = sum(len(x) for x in m["lvm_in_pauses"])
        return out, m

    def livesnap_delete(self):
        """livesnap snapshot-delete s1."""
        return self.livesnap_op("snapshot-delete", self.name, "s1")

    @contextlib.contextmanager
    def paused(self, path):
        """livesnap's tap_ctl.paused on this VM's tapdisk (the pause and unpause livesnap's
        own pauses use), unpaused with ``-a vhd:path``; an unanswered pause a BenchError."""
        try:
            with tap_ctl.paused(self.td.pid, self.td.minor, path=path,
                                timeout=PAUSE_TIMEOUT) as win:
                yield win
        except tap_ctl.PauseTimeout as e:
            raise BenchError("%s: %s" % (UNANSWERED, e))

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
            with self.paused(self.leaf) as win:
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
            with self.paused(self.leaf) as win:
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
            with self.paused(self.leaf) as win:
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
        """Stop the guest, destroy the tapdisk; every acknowledged write, A and B, and every
        image are intact, read by the real tools."""
        self.wait_acks(5)
        td = tap_ctl.find(self.leaf)
        if td is None or td.pid != self.td.pid:
            raise BenchError("the tapdisk of %s is gone or changed: %s" % (self.leaf, td))
        if td.state & tap_ctl.PAUSED:
            raise BenchError("the tapdisk of %s was left paused" % self.leaf)
        rc, out, err = self.tapdisks.destroy(td.pid, td.minor)
        if rc != 0:
            raise BenchError("tap-ctl destroy failed (%d): %s %s" % (rc, out, err))
        if self.vg:             # read back as SM's attach would: every LV active
            for name in self.image_names():
                lvm.activate(self.vg, name)
        try:
            rep = txverify.assert_intact(self.ack_log, self.leaf)
            self.result["acked_writes"] = rep.acked
            b_holder = self.images["k"] if self.chain == "hide" else self.leaf
            self.check_region(self.leaf, b"A", DATA_OFFSET_MIB)
            self.check_region(b_holder, b"B", DATA_OFFSET_MIB + self.size)
        except AssertionError as e:
            raise BenchError("acknowledged writes lost: %s" % e)
        except OSError as e:            # e.g. 'tap-ctl create' of the reading tapdisk refused
            raise BenchError("reading the disk back through a real tapdisk: %s" % e)
        problems = {}
        for f in sorted(self.image_names()):
            pr = blktap.check(os.path.join(self.img_dir, f))
            if pr:
                problems[f] = pr
        if problems:
            raise BenchError("vhd-util check failed: %s" % problems)
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
                rc, out, err = blktap.vhd_util("query", "-n", path, "-s")
                if rc != 0:
                    raise BenchError("vhd-util query -s %s: %s %s" % (path, out, err))
                want, perm = lvm.round_extent(int(out)), "r"
            if size != want or attr[1] != perm or name.startswith("OLD_"):
                problems[name] = {"size": size, "want": want, "attr": attr, "want_perm": perm}
        if problems:
            raise BenchError("LVs not as SM keeps them: %s" % problems)
        self.result["lvs_after"] = {n: [s, a] for n, (s, a) in sorted(report.items())
                                    if n not in self.lvs_before}

    def check_region(self, path, tag, offset_mib):
        """The region reads back through a fresh read-only real tapdisk on ``path``'s chain."""
        with blktap.opened(path) as c:
            for i in range(self.size):
                if c.read((offset_mib + i) * MiB, MiB) != chunk(tag, i):
                    raise BenchError("%s: MiB %d of region %s does not read back"
                                     % (path, i, tag.decode()))

    def cleanup(self):
        """The guest stopped, the tapdisk destroyed (SIGKILLed by pid when tap-ctl cannot:
        only this VM's), its LVs and files removed."""
        self.tapdisks.close()
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
            self.result["op"] = getattr(self, self.method)()
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
            # a Ctrl-C / SIGTERM now must not stop the cleanup (delivered after it)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:
                self.cleanup()
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        return self.result

