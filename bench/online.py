#!/usr/bin/env python3
"""Guest-visible IO stall and wall time of livesnap's online create and delete-with-merge against
libvirt's native commands, with the writer guest (testguest.WriterGuest) writing.

For every size S (MiB to move) and repeat, three scenarios, each on fresh images and a fresh
guest (one disk vda, qcow2, virtual size 32 + 2*S MiB, the guest's 1 MiB ring at offset 0):

  base.qcow2   S MiB of pattern 0x5a at [16M, 16M+S)            (the snapshot's data)
  top.qcow2    S MiB of pattern 0xa5 at [16M+S, 16M+2S)         (written after the snapshot)

The snapshot is taken while the domain is shut off, by the tool under test, so the host can
write top's S MiB (qemu-io) before the guest starts; the guest then writes its ring into top.
Both layers hold S MiB at disjoint offsets, so a commit (top -> base) and a pull (base -> top)
each really move S MiB (a pull copies only what top lacks). Then, guest running:

  livesnap           livesnap snapshot-delete DOM s1    (commit or pull, livesnap's choice,
                                                          reported from its "merges")
                     livesnap snapshot-create DOM c1
                     (the livesnap program, run through the livesnap service that this
                     benchmark starts, as virsh runs through libvirtd)
  livesnap-direct    the same two commands with LIVESNAP_SERVICE=off: the whole command in
                     its own process, interpreter start and imports included (extra row)
  virsh-delete       virsh snapshot-delete DOM s1       (libvirt >= 9.0: active commit + pivot)
                     virsh snapshot-create-as DOM c1 --disk-only --atomic
  virsh-blockcommit  virsh blockcommit DOM vda --active --pivot --wait
                     virsh snapshot-create-as DOM c1 --disk-only --atomic --no-metadata
  livesnap-api       Engine().delete(DOM, "s1") / Engine().create(DOM, "c1") in this process
                     (extra information: livesnap without interpreter start and imports; the
                     targets are judged on the CLI, timed as a whole process like virsh)

Per operation: wall time of the command (host time.monotonic() around the process) and the
guest-visible IO stall = WriterGuest.max_gap over that window (largest gap between acknowledged
writes, guest clock), next to the gap distribution of a quiet window just before. livesnap
frees a large merged-away image after the command returns (datapaths.trash); for its deletes
the stall window runs until that has ended too (freed_ms), the wall time to the command's end. Each scenario
ends with guest stop() + testguest.verify of the disk (no acknowledged write lost) and a qemu-io
pattern check of both S MiB regions (the merge kept the data).

A stall includes one ordinary write cycle of the guest (sleep + dd + flush, ~25-30 ms under
TCG), so each operation also reports excess_ms = stall - baseline median gap, the three worst
gaps with their offsets from the command's start (to see whether a stall is the switch, the
copy or the cleanup), and for livesnap its own pause_ms and the CLI's fixed cost
(livesnap_cli_floor_ms, a snapshot-list on the same domain).

livesnap's modules are byte-compiled before the runs (as an installed package is), so that
a checkout with stale .pyc files and PYTHONDONTWRITEBYTECODE set does not time the compiler.

Per size the summary takes, over repeats, the median wall time and the worst (max) stall.
Ratios are livesnap / native. Targets (issue 4): create stall <= native; delete stall <= 50 ms
at every size; delete time <= native (virsh snapshot-delete, the like-for-like command; the
ratio to blockcommit is reported too). Prints one JSON document (and writes it to --out).

    python3 bench/online.py [--sizes 16,64,256] [--repeat 2] [--quick] [--out FILE]
"""
import argparse
import compileall
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import harness  # the checkout on sys.path: first
from harness import ROOT, BenchError, ratio, run
from testguest import WriterGuest, verify

URI = "qemu:///system"
RING_MIB = 1
DATA_OFFSET_MIB = 16          # bulk data starts here, well after the guest's ring
BASE_PATTERN, TOP_PATTERN = 0x5A, 0xA5
CHUNK_MIB = 32                # qemu-io request size for bulk writes and checks
DELETE_STALL_TARGET_MS = 50.0
TOOLS = ("livesnap", "virsh-delete", "virsh-blockcommit", "livesnap-api", "livesnap-direct")
LIVESNAP_TOOLS = ("livesnap", "livesnap-direct", "livesnap-api")


def disk_mib(size_mib):
    return DATA_OFFSET_MIB * 2 + 2 * size_mib


def qemu_io_cmds(op, pattern, offset_mib, length_mib):
    cmds = []
    off, left = offset_mib, length_mib
    while left > 0:
        n = min(CHUNK_MIB, left)
        cmds += ["-c", "%s -P 0x%x %dM %dM" % (op, pattern, off, n)]
        off, left = off + n, left - n
    return cmds


def fill(path, pattern, offset_mib, length_mib):
    run(["qemu-io", "-f", "qcow2"] + qemu_io_cmds("write", pattern, offset_mib, length_mib)
        + [path])


def check_data(path, size_mib):
    """Both S MiB regions read back with their patterns through the chain of ``path``."""
    p = run(["qemu-io", "-r", "-U", "-f", "qcow2"]
            + qemu_io_cmds("read", BASE_PATTERN, DATA_OFFSET_MIB, size_mib)
            + qemu_io_cmds("read", TOP_PATTERN, DATA_OFFSET_MIB + size_mib, size_mib) + [path])
    out = p.stdout + p.stderr
    if "fail" in out.lower() or "error" in out.lower():
        raise BenchError("bulk data check of %s failed: %s" % (path, out.strip()[-500:]))
    return True


def backing_chain(path):
    p = run(["qemu-img", "info", "-U", "--backing-chain", "--output", "json", path])
    return [e["filename"] for e in json.loads(p.stdout)]


class Scenario(object):
    """One fresh domain lsb-* with one disk, the snapshot s1 taken offline by ``tool``."""

    def __init__(self, tool, size_mib, workdir, interval_ms, quiet_s, service=None):
        self.tool, self.size = tool, size_mib
        self.service = service if tool == "livesnap" else "off"
        self.dir = tempfile.mkdtemp(prefix="%s-%d-" % (tool, size_mib), dir=workdir)
        self.state_dir = os.path.join(self.dir, "state")
        self.quiet_s = quiet_s
        self.base = os.path.join(self.dir, "base.qcow2")
        self.top = os.path.join(self.dir, "top.qcow2")
        self.guest = WriterGuest("lsb-" + secrets.token_hex(4), [("vda", self.base, "qcow2")],
                                 ring_mib=RING_MIB, interval_ms=interval_ms, uri=URI)
        self.name = self.guest.name
        self.result = {"tool": tool, "mib": size_mib, "domain": self.name}

    # -- commands ---------------------------------------------------------------------------
    def livesnap(self, *args):
        env = dict(os.environ, LIVESNAP_STATE_DIR=self.state_dir, LIVESNAP_SERVICE=self.service)
        env.pop("LIVESNAP_FAULT", None)
        p = run([sys.executable, "-m", "livesnap"] + list(args)
                + ["-c", URI, "--output", "json"], env=env)
        return json.loads(p.stdout)

    def api(self, op, *args):
        """livesnap's Python API in this process (a new Engine, so a new connection)."""
        from livesnap.engine.engine import Engine
        return getattr(Engine(connect=URI, state_dir=self.state_dir), op)(self.name, *args)

    def virsh(self, *args):
        return run(["virsh", "-q", "-c", URI] + list(args))

    def trash_left(self):
        """livesnap's images renamed aside to be freed after the command (datapaths.trash)."""
        return [n for n in os.listdir(self.dir) if n.endswith(".livesnap-free")]

    def timed(self, fn, background=False):
        """Run fn() with the guest writing: wall time and the IO stall in its window. With
        ``background``, the stall window lasts until livesnap's deferred freeing of the
        merged-away image has ended too (its wall time does not: the command has returned,
        as virsh's has while ext4 still discards the file it unlinked)."""
        t0 = time.monotonic()
        out = fn()
        t1 = t_end = time.monotonic()
        freed_ms = None
        if background:
            while self.trash_left() and time.monotonic() - t1 < 60:
                time.sleep(0.005)
            if self.trash_left():
                raise BenchError("livesnap's deferred free did not end: %s" % self.trash_left())
            t_end = time.monotonic()
            freed_ms = round((t_end - t0) * 1000.0, 1)
        g = self.guest
        g.wait_acks(3)                 # the gap that spans t_end must have closed
        gaps = g.gaps(None, t0, t_end)
        worst = max(gaps, key=lambda x: x[0]) if gaps else None
        m = {"wall_ms": round((t1 - t0) * 1000.0, 1), "freed_ms": freed_ms,
             "stall_ms": round(worst[0] * 1000.0, 1) if worst else 0.0,
             # where the worst gap began, from the command's start (host clock)
             "stall_at_ms": round((worst[1].host_ts - t0) * 1000.0, 1) if worst else None,
             "acks_in_window": len(gaps),
             "median_gap_ms": round(sorted(x[0] for x in gaps)[len(gaps) // 2] * 1000.0, 1)
             if gaps else None,
             # the three worst gaps [ms, start from the command's start in ms]: where it stalls
             "worst_gaps": [[round(x[0] * 1000.0, 1), round((x[1].host_ts - t0) * 1000.0, 1)]
                            for x in sorted(gaps, key=lambda x: -x[0])[:3]]}
        base = self.result.get("baseline")
        if base:
            # the stall beyond an ordinary write cycle of this guest (baseline median gap)
            m["excess_ms"] = round(max(0.0, m["stall_ms"] - base["median_ms"]), 1)
        return out, m

    # -- phases -----------------------------------------------------------------------------
    def prepare(self):
        """Images, the shut-off domain, the snapshot s1 taken offline, S MiB into top."""
        size = disk_mib(self.size)
        run(["qemu-img", "create", "-q", "-f", "qcow2", self.base, "%dM" % size])
        fill(self.base, BASE_PATTERN, DATA_OFFSET_MIB, self.size)
        g = self.guest
        if self.tool == "virsh-blockcommit":
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "qcow2",
                 self.top])
            g.disks = [("vda", self.top, "qcow2")]
            g.dom = g.conn.defineXML(g.xml())
        else:
            g.dom = g.conn.defineXML(g.xml())
            if self.tool in LIVESNAP_TOOLS:
                self.livesnap("snapshot-create", self.name, "s1")
                top = g.disk_sources()["vda"]          # livesnap names the new leaf
                if backing_chain(top)[1:] != [self.base]:
                    raise BenchError("unexpected chain after livesnap create: %s"
                                     % backing_chain(top))
                self.top = top
            else:
                self.virsh("snapshot-create-as", self.name, "s1", "--disk-only", "--atomic",
                           "--diskspec", "vda,snapshot=external,file=" + self.top)
        if self.guest.disk_sources()["vda"] != self.top:
            raise BenchError("domain %s is not on %s" % (self.name, self.top))
        fill(self.top, TOP_PATTERN, DATA_OFFSET_MIB + self.size, self.size)
        # the fills went through the host's page cache: write them back now, or their
        # writeback (up to 2*S MiB, 30 s after) lands in whichever command is timed next
        os.sync()

    def start(self):
        g = self.guest
        g.restart(wait_ready=True, timeout=120)      # keeps the UUID (livesnap's catalog key)
        g.wait_acks(20, timeout=60)
        self.result["clocksource"] = g.clocksource
        t0 = time.monotonic()
        time.sleep(self.quiet_s)
        t1 = time.monotonic()
        self.result["baseline"] = ms_stats(g.gap_stats(None, t0, t1))

    def delete(self):
        if self.tool in LIVESNAP_TOOLS:
            if self.tool != "livesnap-api":
                out, m = self.timed(lambda: self.livesnap("snapshot-delete", self.name, "s1"),
                                    background=True)
            else:
                out, m = self.timed(lambda: self.api("delete", "s1"), background=True)
            m["pause_ms"] = out.get("pause_ms")
            m["action"] = out.get("action")
            merges = out.get("merges") or []
            m["method"] = "+".join(x["method"] + ("(fallback)" if x.get("fallback") else "")
                                   for x in merges) or None
            m["merges"] = merges
        elif self.tool == "virsh-delete":
            _, m = self.timed(lambda: self.virsh("snapshot-delete", self.name, "s1"))
            m["method"] = "active commit + pivot"
        else:
            _, m = self.timed(lambda: self.virsh("blockcommit", self.name, "vda", "--active",
                                                 "--pivot", "--wait"))
            m["method"] = "active commit + pivot"
        m["chain_after"] = [os.path.basename(p) for p in self.guest.disk_chains()["vda"]]
        self.result["delete"] = m

    def create(self):
        self.guest.wait_acks(10)
        c1 = os.path.join(self.dir, "c1.qcow2")
        if self.tool in ("livesnap", "livesnap-direct"):
            out, m = self.timed(lambda: self.livesnap("snapshot-create", self.name, "c1"))
            m["pause_ms"] = out.get("pause_ms")
            m["command"] = "livesnap snapshot-create"
            # the CLI's fixed cost (interpreter, imports, libvirt connection, catalog and
            # qemu-img checks): a read-only command on the same domain
            t0 = time.monotonic()
            self.livesnap("snapshot-list", self.name)
            self.result["livesnap_cli_floor_ms" + ("" if self.tool == "livesnap" else
                                                   "_direct")] = round((time.monotonic() - t0) * 1000.0, 1)
        elif self.tool == "livesnap-api":
            out, m = self.timed(lambda: self.api("create", "c1"))
            m["pause_ms"] = out.get("pause_ms")
            m["command"] = "Engine.create (in process)"
        else:
            extra = ["--no-metadata"] if self.tool == "virsh-blockcommit" else []
            _, m = self.timed(lambda: self.virsh(
                "snapshot-create-as", self.name, "c1", "--disk-only", "--atomic", *extra,
                "--diskspec", "vda,snapshot=external,file=" + c1))
            m["command"] = "virsh snapshot-create-as --disk-only --atomic" + (
                " --no-metadata" if extra else "")
        self.result["create"] = m

    def finish(self):
        """Stop the guest cleanly; every acknowledged write and both bulk regions are there."""
        g = self.guest
        g.wait_acks(5)
        top = g.disk_sources()["vda"]                 # the live top, before the domain stops
        last = g.stop()
        if not g.clean_stop:
            raise BenchError("guest %s did not stop cleanly: %s" % (self.name, g.stop_error))
        res = verify(top, "vda", last["vda"], RING_MIB, g.run_id)
        check_data(top, self.size)
        self.result["acked_writes"] = last["vda"] + 1
        self.result["verified"] = bool(res.ok)

    def cleanup(self):
        try:
            self.guest.cleanup()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def run(self):
        try:
            self.prepare()
            self.start()
            self.delete()
            self.create()
            self.finish()
        finally:
            self.cleanup()
        return self.result


def start_service(sock):
    """``livesnap service`` on ``sock``: running once its socket accepts connections."""
    from livesnap import service
    proc = subprocess.Popen([sys.executable, "-m", "livesnap", "service", "--socket", sock],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.sock = sock
    if not service.wait_listening(sock, proc):
        proc.kill()
        raise BenchError("livesnap service did not listen on %s (exit status %s)"
                         % (sock, proc.wait()))
    return proc


def ms_stats(s):
    return {"n": s["n"], "max_ms": round(s["max"] * 1000, 1),
            "median_ms": round(s["median"] * 1000, 1), "mean_ms": round(s["mean"] * 1000, 1)}


def summarize(size, runs):
    """Per tool over repeats: median wall time, worst stall; ratios livesnap / native; targets."""
    def agg(tool, phase):
        ms = [r[phase] for r in runs if r["tool"] == tool]
        if not ms:
            return None
        out = {"wall_ms": round(statistics.median(m["wall_ms"] for m in ms), 1),
               "stall_ms": max(m["stall_ms"] for m in ms),
               "excess_ms": max(m.get("excess_ms", 0.0) for m in ms), "n": len(ms)}
        for k in ("pause_ms", "method", "command"):
            vals = [m.get(k) for m in ms if m.get(k) is not None]
            if vals:
                out[k] = (max(vals) if k == "pause_ms" else
                          vals[0] if len(set(vals)) == 1 else sorted(set(vals)))
        return out

    create = {"livesnap": agg("livesnap", "create"),
              "virsh": agg("virsh-delete", "create"),
              "virsh_no_metadata": agg("virsh-blockcommit", "create"),
              "livesnap_api": agg("livesnap-api", "create"),
              "livesnap_direct": agg("livesnap-direct", "create")}
    delete = {"livesnap": agg("livesnap", "delete"),
              "virsh_snapshot_delete": agg("virsh-delete", "delete"),
              "virsh_blockcommit": agg("virsh-blockcommit", "delete"),
              "livesnap_api": agg("livesnap-api", "delete"),
              "livesnap_direct": agg("livesnap-direct", "delete")}
    base = [r["baseline"] for r in runs]
    baseline = {"max_ms": max(b["max_ms"] for b in base),
                "median_ms": round(statistics.median(b["median_ms"] for b in base), 1)}

    def rs(d, nat):
        if d["livesnap"] is None or d[nat] is None:
            return None
        return {"stall": ratio(d["livesnap"]["stall_ms"], d[nat]["stall_ms"]),
                "wall": ratio(d["livesnap"]["wall_ms"], d[nat]["wall_ms"])}

    create["ratio_vs_virsh"] = rs(create, "virsh")
    create["ratio_vs_virsh_no_metadata"] = rs(create, "virsh_no_metadata")
    delete["ratio_vs_virsh_snapshot_delete"] = rs(delete, "virsh_snapshot_delete")
    delete["ratio_vs_virsh_blockcommit"] = rs(delete, "virsh_blockcommit")
    for row, key in (("livesnap_api", "api"), ("livesnap_direct", "direct")):
        # extra information, not a target: livesnap in the bench's process, or the whole
        # command in its own process without the service
        if delete[row] is not None and delete["virsh_snapshot_delete"] is not None:
            delete[key + "_ratio_vs_virsh_snapshot_delete"] = {
                "stall": ratio(delete[row]["stall_ms"],
                               delete["virsh_snapshot_delete"]["stall_ms"]),
                "wall": ratio(delete[row]["wall_ms"], delete["virsh_snapshot_delete"]["wall_ms"])}

    def le(a, b):
        return None if a is None or b is None else a <= b

    ls_c, ls_d = create["livesnap"] or {}, delete["livesnap"] or {}
    nat_c, nat_d = create["virsh"] or {}, delete["virsh_snapshot_delete"] or {}
    # the baseline's jitter: a stall difference below it is not distinguishable here
    jitter = baseline["max_ms"] - baseline["median_ms"]
    targets = {
        "create_stall_le_native": le(ls_c.get("stall_ms"), nat_c.get("stall_ms")),
        "create_stall_le_native_within_jitter": le(ls_c.get("stall_ms"),
                                                   (nat_c.get("stall_ms") or 0) + jitter
                                                   if nat_c else None),
        "delete_stall_le_50ms": le(ls_d.get("stall_ms"), DELETE_STALL_TARGET_MS),
        "delete_excess_stall_le_50ms": le(ls_d.get("excess_ms"), DELETE_STALL_TARGET_MS),
        "delete_time_le_native": le(ls_d.get("wall_ms"), nat_d.get("wall_ms")),
        "delete_time_le_blockcommit": le(ls_d.get("wall_ms"),
                                         (delete["virsh_blockcommit"] or {}).get("wall_ms")),
    }
    def floor(key):
        vals = [r[key] for r in runs if key in r]
        return round(statistics.median(vals), 1) if vals else None
    return {"mib": size, "baseline_gap": baseline, "baseline_jitter_ms": round(jitter, 1),
            "livesnap_cli_floor_ms": floor("livesnap_cli_floor_ms"),
            "livesnap_cli_floor_ms_direct": floor("livesnap_cli_floor_ms_direct"),
            "create": create, "delete": delete, "targets": targets}


def versions():
    out = {"python": platform.python_version(), "nproc": os.cpu_count()}
    try:
        out["libvirt"] = run(["virsh", "-c", URI, "version", "--daemon"]).stdout.strip() \
            .splitlines()[-1].split(":")[-1].strip()
    except Exception:
        out["libvirt"] = None
    try:
        out["qemu"] = run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0]
    except Exception:
        out["qemu"] = None
    from testguest import virt_type
    out["virt_type"] = virt_type()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_options(ap, "tool")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 MiB, one repeat, a short quiet window, no "
                         "livesnap-direct row")
    ap.add_argument("--interval-ms", type=int, default=10, help="guest pause between writes")
    ap.add_argument("--quiet-s", type=float, default=2.0, help="baseline window before deletes")
    ap.add_argument("--tools", default=None, help=argparse.SUPPRESS)
    harness.add_output_options(ap)
    a = ap.parse_args(argv)
    sizes = harness.sizes_of(a)
    repeat = a.repeat
    tools = list(TOOLS)
    if a.quick:
        sizes, repeat, a.quiet_s = [16], 1, min(a.quiet_s, 1.0)
        tools.remove("livesnap-direct")          # the same commands without the service
    if a.tools:
        tools = [t for t in a.tools.split(",") if t]
    for t in tools:
        if t not in TOOLS:
            ap.error("unknown tool %r" % t)

    import libvirt
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    # byte-compiled as an installed package is (quietly; a file that does not compile
    # fails in the runs themselves)
    compileall.compile_dir(os.path.join(ROOT, "livesnap"), quiet=2)
    if "livesnap-api" in tools:
        import livesnap.engine.engine  # noqa: F401  (the API's imports are not timed)
        import livesnap.datapaths.libvirt_live  # noqa: F401
        import livesnap.platforms.libvirt_snapshots  # noqa: F401
    # SIGTERM unwinds like Ctrl-C, so the lsb-* domains and the images are always removed
    harness.unwind_on_sigterm()
    workdir = tempfile.mkdtemp(prefix="lsb-online-", dir=a.dir)
    started = time.monotonic()
    runs = []
    service = None
    try:
        if "livesnap" in tools:
            service = start_service(os.path.join(workdir, "run", "livesnap.sock"))
        for rep in range(repeat):
            for size in sizes:
                for tool in tools:
                    r = Scenario(tool, size, workdir, a.interval_ms, a.quiet_s,
                                 service and service.sock).run()
                    r["rep"] = rep
                    runs.append(r)
                    print("# %-18s %4d MiB rep %d: delete %s, create %s" % (
                        tool, size, rep, r["delete"], r["create"]), file=sys.stderr)
    finally:
        if service is not None:
            service.terminate()
            service.wait(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)

    summary = [summarize(s, [r for r in runs if r["mib"] == s]) for s in sizes]

    def all_of(key):
        vals = [s["targets"][key] for s in summary]
        return None if any(v is None for v in vals) else all(vals)

    doc = {
        "benchmark": "online",
        "host": versions(),
        "params": {"sizes_mib": sizes, "repeat": repeat, "interval_ms": a.interval_ms,
                   "quiet_s": a.quiet_s, "ring_mib": RING_MIB, "tools": tools,
                   "disk_mib": {str(s): disk_mib(s) for s in sizes},
                   "stall": "max gap between acknowledged guest writes (guest clock) over the "
                            "command's host-time window; per size the max over repeats, wall "
                            "time the median"},
        "sizes": summary,
        "targets": {k: all_of(k) for k in ("create_stall_le_native",
                                           "create_stall_le_native_within_jitter",
                                           "delete_stall_le_50ms",
                                           "delete_excess_stall_le_50ms", "delete_time_le_native",
                                           "delete_time_le_blockcommit")},
        "verified": bool(runs) and all(r.get("verified") for r in runs),
        "runs": runs,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return harness.emit(doc, a.out)


if __name__ == "__main__":
    sys.exit(main())
