"""Smoke run of bench/xen_sm.py on the real blktap and SM's real GC (a missing build fails), one
small size: the JSON is well formed and has every figure issue 13 asks for (per size
livesnap's and SM's longest guest-visible gap, the ratio, what each did: the fold's rounds,
SM's live leaf-coalesce or snapshot-coalesce), both sides verified (every acknowledged write
present, A and B read back, vhd-util check), one image left on each side, and no real
tapdisk, guest or directory of the run left behind; the floor (bare pauses of livesnap's
tapdisk: livesnap's pause through the wrapper and directly, plain tap-ctl) with its figures
and ratios. The pure helpers that make the floor's figures, on made-up ack logs. No timing is
asserted."""
import glob
import json
import os
import subprocess
import sys

import pytest

from testxen import blktap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "xen_sm.py")


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


def _leftovers(base):
    """Run directories of the bench under ``base`` and tapdisks serving images under them."""
    dirs = glob.glob(os.path.join(base, "xsb*"))
    rc, out, err = blktap.tap_ctl("list")
    assert rc == 0, err
    taps = [ln for ln in out.splitlines() if "args=vhd:" + base + "/xsb" in ln]
    return dirs, taps


def test_xen_sm_bench_json(tmp_path):
    try:
        blktap.prefix()
    except blktap.MissingBuild as e:
        pytest.fail(str(e), pytrace=False)
    base = "/tmp/xsbt" + os.urandom(4).hex()          # short, no "_" (XenAPI's socket URL)
    os.makedirs(base)
    out = str(tmp_path / "r.json")
    try:
        p = subprocess.run([sys.executable, BENCH, "--sizes", "2", "--quiet-s", "0.3",
                            "--attempts", "3", "--floor-cycles", "2", "--tapctl-log",
                            "--dir", base, "--out", out],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, cwd=ROOT, timeout=900)
        assert p.returncode in (0, 1), (p.returncode, p.stderr[-3000:])
        doc = json.loads(p.stdout)
        with open(out) as f:
            assert json.load(f) == doc
        assert doc["benchmark"] == "xen_sm" and doc["params"]["sizes_mib"] == [2]
        r, = doc["sizes"]
        assert r["mib"] == 2
        ls, sm = r["livesnap"], r["sm"]
        for side in (ls, sm):
            assert side["verified"] is True
            assert _number(side["max_gap_ms"]) and _number(side["quiet_max_gap_ms"])
            assert _number(side["wall_ms"]) and side["acked_writes"] > 0
        assert r["livesnap_max_gap_ms"] == ls["max_gap_ms"]
        assert r["sm_max_gap_ms"] == sm["max_gap_ms"]
        assert r["ratio"] is None or _number(r["ratio"])
        # the floor: bare pauses of livesnap's tapdisk, two of each kind, every one answered
        # and unpaused (the fold after them went through)
        floor = ls["floor"]
        assert sorted(floor) == ["livesnap", "livesnap_direct", "plain"]
        for kind in floor.values():
            assert len(kind["gaps_ms"]) == 2 and all(_number(g) for g in kind["gaps_ms"])
            assert kind["median_ms"] is not None and kind["min_ms"] <= kind["max_ms"]
        assert len(floor["livesnap"]["parts_ms"]) == 2      # logged by the wrapper
        assert r["floor_gap_ms"] == floor["livesnap"]["median_ms"]
        assert r["floor_plain_gap_ms"] == floor["plain"]["median_ms"]
        assert r["floor_direct_gap_ms"] == floor["livesnap_direct"]["median_ms"]
        for k in ("ratio_livesnap_floor", "ratio_floor_sm", "ratio_floor_plain_sm"):
            assert r[k] is None or _number(r[k])
        assert doc["params"]["tapctl_log"] is True
        # SM: the 2 MiB leaf (plus the guest's ring) is under 20 MiB: live leaf-coalesce,
        # through the tapdisk-pause plugin, to one image
        assert sm["sm_did"]["verdict"] == "live leaf-coalesce", sm["sm_did"]
        assert r["sm_did"] == "live leaf-coalesce"
        assert sm["merged"] is True and len(sm["chain_after"]) == 1
        assert [fn for fn, _ in sm["tap_pause_calls"]] == ["pause", "unpause"]
        # each call a process of SM's own plugin: its start-up, then its code
        assert [fn for fn, _, _ in sm["tap_pause_call_parts_ms"]] == ["pause", "unpause"]
        assert all(_number(a) and _number(b) for _, a, b in sm["tap_pause_call_parts_ms"])
        assert len(sm["sm_pause_ms"]) == 1 and _number(sm["sm_pause_ms"][0])
        assert sm["speed_before_mib_s"] is None and _number(sm["speed_after_mib_s"])
        # livesnap: a fold (an unanswered tap-ctl pause of the real tapdisk is a known
        # test-bed problem: such an attempt is reported and another made)
        for failed in r["livesnap_failed_attempts"]:
            assert failed["error"][0] == "LIVESNAP_DATAPATH_ERROR", failed
        if "error" not in ls:
            assert doc["verified"] is True and p.returncode == 0
            m, = ls["merges"]
            assert m["method"] == "fold" and m["rounds"] >= 0
            assert r["livesnap_did"] == "fold, %d rounds" % m["rounds"]
            assert ls["pause_ms"] == max(ls["pauses_ms"])
            # through the wrapper: each tapdisk pause in three parts
            assert len(ls["tapdisk_pause_parts_ms"]) == len(ls["tapdisk_paused_lists_ms"]) >= 1
            assert all(len(x) == 3 for x in ls["tapdisk_pause_parts_ms"])
            assert len(ls["gap_per_pause_ms"]) == len(ls["tapdisk_pause_parts_ms"])
            assert all(_number(g) for g in ls["gap_per_pause_ms"])
            between = ls["gap_between_pauses_ms"]
            assert _number(between["ms"]) and _number(between["ms_after"])
            assert 0 <= between["after_pause"] <= len(ls["gap_per_pause_ms"])
            assert max(ls["gap_per_pause_ms"] + [between["ms"]]) <= ls["max_gap_ms"]
            assert ls["chain_after"] and len(ls["chain_after"]) == 1
        else:
            assert doc["verified"] is False and p.returncode == 1
    finally:
        dirs, taps = _leftovers(base)
        os.rmdir(base)
    assert dirs == [] and taps == [], (dirs, taps)


def _bench_module():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import xen_sm
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    return xen_sm


def test_floor_summary_takes_each_pause_s_longest_gap(tmp_path):
    xen_sm = _bench_module()
    log = tmp_path / "ack"
    ms = 1000000
    acks = [0, 3, 6, 30, 33, 36, 39, 100, 103, 141, 144]      # ms
    log.write_text("RUN 01 slots=8 stride=1048576 size=67108864 path=/x\n" +
                   "".join("ACK %d %d\n" % (i, t * ms) for i, t in enumerate(acks)))
    runs = [(10 * ms, 20 * ms, {"pause_ms": 1.0, "window_ms": 2.0}),
            (105 * ms, 120 * ms, {"pause_ms": 3.0, "window_ms": 4.0, "unanswered": True}),
            (40 * ms, 41 * ms, {"pause_ms": 0.5, "window_ms": 0.6})]
    f = xen_sm._floor_summary(str(log), runs)
    assert f["gaps_ms"] == [24.0, 38.0, 61.0]   # the gaps touching each window
    assert (f["min_ms"], f["median_ms"], f["max_ms"]) == (24.0, 38.0, 61.0)
    assert f["window_ms"] == [2.0, 4.0, 0.6] and f["pause_ms"] == [1.0, 3.0, 0.5]
    assert f["unanswered"] == 1
    assert xen_sm._floor_summary(str(log), [])["median_ms"] is None


def test_floor_figures_and_ratios():
    xen_sm = _bench_module()
    floor = {"livesnap": {"median_ms": 10.0, "max_ms": 14.0},
             "plain": {"median_ms": 5.0, "unanswered": 2}}
    f = xen_sm._floor_figures(floor, 20.0, 80.0)
    assert f == {"floor_gap_ms": 10.0, "floor_max_gap_ms": 14.0, "floor_direct_gap_ms": 10.0,
                 "floor_plain_gap_ms": 5.0, "floor_plain_unanswered": 2,
                 "ratio_livesnap_floor": 2.0, "ratio_floor_sm": 0.125,
                 "ratio_floor_plain_sm": 0.062}
    floor["livesnap_direct"] = {"median_ms": 7.0}
    assert xen_sm._floor_figures(floor, 20.0, 80.0)["floor_direct_gap_ms"] == 7.0
    assert xen_sm._floor_figures(None, 20.0, 80.0) == {}
    assert xen_sm._parts((0, 2 * 10 ** 6, 5 * 10 ** 6, 9 * 10 ** 6)) == [2.0, 3.0, 4.0]


def test_gaps_are_placed_in_the_pauses_or_between_them(tmp_path):
    xen_sm = _bench_module()
    log = tmp_path / "ack"
    ms = 1000000
    acks = [0, 3, 20, 23, 26, 60, 63, 66, 80, 83]      # ms: gaps 17 (3-20), 34 (26-60), 14
    log.write_text("RUN 01 slots=8 stride=1048576 size=67108864 path=/x\n" +
                   "".join("ACK %d %d\n" % (i, t * ms) for i, t in enumerate(acks)))
    pauses = [(5 * ms, 6 * ms, 8 * ms, 10 * ms), (64 * ms, 65 * ms, 70 * ms, 75 * ms)]
    inside, outside = xen_sm._gaps_in_and_out(str(log), 1 * ms, 82 * ms, pauses)
    assert inside == [17.0, 14.0]
    assert outside == {"ms": 34.0, "after_pause": 1, "ms_after": 16.0}    # 26 - 10
    assert xen_sm._gaps_in_and_out(str(log), 1 * ms, 82 * ms, []) == \
        ([], {"ms": 34.0, "after_pause": 0, "ms_after": 25.0})            # 26 - 1
