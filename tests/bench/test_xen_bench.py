"""Smoke run of bench/xen.py --quick on the real blktap (scripts/build-blktap.sh; a missing
build fails): the JSON is well formed, has every figure the issue asks for (pause window of
create and of each kind of delete, the baseline and the ratios), every scenario verified (no
acknowledged write lost, the merged data intact, every image checks) and no real tapdisk,
guest or temp dir of the run is left behind; with --storage lvm also the LVs as SM keeps them,
the LVM commands inside the pauses, and no volume group, loop device or /dev/VG_* dir left
behind. A real tapdisk's pause that gets no answer is a clear error, the VM still cleaned up.
No timing is asserted: performance figures come from the benchmark, not from tests."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from livesnap.tools import tap_ctl
from testxen import blktap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "bench")
BENCH = os.path.join(BENCH_DIR, "xen.py")
OPS = ("create", "null_pause", "delete_intermediate", "delete_active", "delete_hide",
       "xapi_leaf_coalesce")


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


def _tapdisks(under):
    """(pid, minor) of the running real tapdisks serving an image under ``under``."""
    rc, out, err = blktap.tap_ctl("list")
    assert rc == 0, err
    return {(d.pid, d.minor) for d in tap_ctl.parse_list(out)
            if d.path and os.path.normpath(d.path).startswith(under + os.sep)}


def _guests(under):
    """pids of running guests (testxen.guest) whose ack log is under ``under``."""
    out = set()
    for p in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(p, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"testxen.guest" in argv and b"--ack-log" in argv:
            log = argv[argv.index(b"--ack-log") + 1].decode()
            if log.startswith(under + os.sep):
                out.add(int(p.split("/")[2]))
    return out


@pytest.fixture(autouse=True)
def built():
    try:
        blktap.prefix()
    except blktap.MissingBuild as e:
        pytest.fail(str(e), pytrace=False)


def _run_quick(tmp_path, *args, timeout=300):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "xen.json"
    p = subprocess.run([sys.executable, BENCH, "--quick", "--dir", str(work), "--out", str(out)]
                       + list(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert json.loads(out.read_text()) == doc
    _check_doc(doc, work)
    return doc


def test_xen_bench_quick(tmp_path):
    doc = _run_quick(tmp_path)
    assert doc["params"]["storage"] == "file"


def test_xen_bench_quick_lvm(tmp_path):
    """The same on LVHD: the disk on LVs of a VG of the LVM stand-in, made and destroyed by the
    bench."""
    doc = _run_quick(tmp_path, "--storage", "lvm", timeout=420)
    assert doc["params"]["storage"] == "lvm"
    lv = doc["params"]["lvm"]
    assert lv["vg"].startswith("VG_XenStorage-") and lv["vg_mib"] >= 2 * 552
    assert _number(lv["probe"]["lvchange_ms"]) and _number(lv["probe"]["lvs_ms"])
    (size,) = doc["sizes"]
    base = size["xapi_leaf_coalesce"]
    for k in ("lvm_prepare_ms", "copy_ms", "rename_ms", "inflate_full_ms", "old_remove_ms"):
        assert _number(base[k]), (k, base)
    by = {r["scenario"]: r for r in doc["runs"]}
    # the baseline's pause: lvchange -p rw, deflate, inflate, 2 lvrename, inflateFully
    (in_pause,) = by["xapi_leaf_coalesce"]["op"]["lvm_in_pauses"]
    assert in_pause.count("lvrename") == 2 and in_pause.count("lvresize") >= 2, in_pause
    # create's pause: rename the leaf, deflate it, the new leaf's LV
    (in_pause,) = by["delete_intermediate"]["create"]["lvm_in_pauses"]
    assert "lvrename" in in_pause and "lvcreate" in in_pause, in_pause
    assert by["delete_hide"]["op"]["lvm_commands_in_pause"] == 0
    for r in doc["runs"]:
        assert all(p.startswith("VHD-") for p in r["chain_after"]), r["chain_after"]
        lvs = r["lvs_after"]
        (leaf,) = [n for n in lvs if lvs[n][1][1] == "w"]        # one writable LV: the leaf
        assert leaf == r["chain_after"][0]
        assert not any(n.startswith("OLD_") for n in lvs), lvs
    # nothing of the VG is left: no /dev/<vg>, no loop device over the stand-in's files
    assert not _tapdisks(os.path.join("/dev", lv["vg"]))
    assert not os.path.exists(os.path.join("/dev", lv["vg"]))
    assert not os.path.exists(lv["root"])
    loops = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, text=True).stdout
    assert lv["root"] + "/" not in loops, loops


def _check_doc(doc, work):
    assert doc["benchmark"] == "xen" and doc["verified"] is True
    assert doc["host"]["tapdisk"].startswith("real blktap")
    assert doc["params"]["sizes_mib"] == [16] and doc["params"]["repeat"] == 1

    (size,) = doc["sizes"]
    assert size["mib"] == 16 and _number(size["baseline_gap"]["median_ms"])
    assert _number(size["livesnap_cli_floor_ms"])
    for op in OPS:
        m = size[op]
        assert m["n"] == 1, op
        for k in ("wall_ms", "stall_ms", "excess_ms", "stall_vs_quiet", "tapdisk_paused_max_ms"):
            assert _number(m[k]), (op, k, m)
        assert m["wall_ms"] > 0, (op, m)
    # every operation but the hide pauses the tapdisk, and says how long
    for op in ("create", "null_pause", "delete_intermediate", "delete_active",
               "xapi_leaf_coalesce"):
        assert _number(size[op]["pause_ms"]) and size[op]["pauses"] >= 1, (op, size[op])
    assert size["delete_hide"]["pauses"] == 0 and size["delete_hide"]["action"] == "hidden"
    assert size["delete_intermediate"]["action"] == "merged"
    assert size["delete_active"]["action"] == "merged"
    assert size["delete_intermediate"]["method"] in ("commit", "pull")
    assert size["delete_active"]["method"] in ("commit", "pull")
    assert size["delete_active"]["pauses"] >= 1
    assert size["xapi_leaf_coalesce"]["moved_mib"] >= 16
    for name, r in size["ratios"].items():
        assert r is not None, name
        assert _number(r["stall"]) and _number(r["wall"]), (name, r)

    assert sorted(r["scenario"] for r in doc["runs"]) == sorted(
        ["delete_intermediate", "delete_active", "delete_hide", "xapi_leaf_coalesce"])
    for r in doc["runs"]:
        assert r["verified"] is True and r["acked_writes"] > 0, r["scenario"]
        assert r["baseline_gap"]["n"] > 0
        assert r["op"]["acks_in_window"] >= 1
        # every pause of the tapdisk is known, with its length (the tap-ctl log)
        ops = [r["op"]] + [r[k] for k in ("create", "null_pause") if k in r]
        for m in ops:
            assert len(m["tapdisk_paused_ms"]) == m["pauses"] == len(m["tapdisk_pause_parts_ms"])
            for total, parts in zip(m["tapdisk_paused_ms"], m["tapdisk_pause_parts_ms"]):
                assert len(parts) == 3 and all(_number(x) for x in parts), m
                assert abs(sum(parts) - total) <= 0.3, m     # its parts (rounded)
            assert all(_number(x) and x > 0 for x in m["tapdisk_paused_ms"]), m
            assert _number(m["stall_vs_quiet"]), m
    by = {r["scenario"]: r for r in doc["runs"]}
    assert len(by["delete_intermediate"]["chain_before"]) == 3
    assert len(by["delete_intermediate"]["chain_after"]) == 3      # c1 took s1's place
    assert len(by["delete_active"]["chain_after"]) == 2
    assert len(by["xapi_leaf_coalesce"]["chain_after"]) == 1

    # cleaned up: no tapdisk or guest of this run survives, the work dir is empty
    assert not _tapdisks(str(work))
    assert not _guests(str(work))
    assert os.listdir(str(work)) == []


def test_an_unanswered_pause_is_a_clear_error(tmp_path, monkeypatch):
    """The tapdisk stopped (SIGSTOP) while the bench pauses it, as when a real tapdisk leaves
    'tap-ctl pause' unanswered: a BenchError saying so (not a hang, not a bare traceback);
    once the tapdisk runs again the VM is not left paused, the guest's writes are intact and
    cleanup leaves nothing of it."""
    monkeypatch.syspath_prepend(BENCH_DIR)
    import xen
    import xen_vm
    from harness import BenchError
    work, run_dir = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    run_dir.mkdir()
    for k, v in xen.tool_env(str(run_dir)).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(xen_vm, "PAUSE_TIMEOUT", 0.5)
    vm = xen_vm.Vm("xapi_leaf_coalesce", 1, str(work), 0.2, str(run_dir), 0.003)
    resume = None
    try:
        vm.prepare()
        vm.start()
        os.kill(vm.td.pid, signal.SIGSTOP)
        resume = threading.Timer(2.0, os.kill, (vm.td.pid, signal.SIGCONT))
        resume.start()
        with pytest.raises(BenchError, match="tap-ctl pause of the real tapdisk got no answer"):
            vm.null_pause()
        resume.join()
        vm.finish()               # running, not paused; every acknowledged write there
        assert vm.result["verified"] is True
    finally:
        if resume is not None:
            resume.join()
            try:
                os.kill(vm.td.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        vm.cleanup()
    assert not _tapdisks(str(work))
    assert not _guests(str(run_dir))
    assert os.listdir(str(work)) == []
