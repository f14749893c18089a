"""Smoke run of bench/online.py --quick: the JSON is well formed, has every figure the issue
asks for, and every scenario verified (no acknowledged write lost, merged data intact).
No timing is asserted: performance figures come from the benchmark, not from tests."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "online.py")


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0


def test_online_bench_quick(tmp_path):
    out = tmp_path / "online.json"
    p = subprocess.run([sys.executable, BENCH, "--quick", "--out", str(out)], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert json.loads(out.read_text()) == doc
    assert doc["benchmark"] == "online" and doc["verified"] is True
    assert doc["params"]["sizes_mib"] == [16]
    assert set(doc["targets"]) >= {"create_stall_le_native", "delete_stall_le_50ms",
                                   "delete_time_le_native"}
    assert all(v in (True, False) for v in doc["targets"].values())

    (size,) = doc["sizes"]
    assert size["mib"] == 16 and _number(size["baseline_gap"]["median_ms"])
    assert _number(size["livesnap_cli_floor_ms"])
    for phase, tools in (("create", ("livesnap", "virsh", "virsh_no_metadata", "livesnap_api")),
                         ("delete", ("livesnap", "virsh_snapshot_delete", "virsh_blockcommit",
                                     "livesnap_api"))):
        for tool in tools:
            m = size[phase][tool]
            assert _number(m["wall_ms"]) and m["wall_ms"] > 0, (phase, tool, m)
            assert _number(m["stall_ms"]), (phase, tool, m)
        for key in [k for k in size[phase] if k.startswith("ratio_vs_")]:
            assert _number(size[phase][key]["stall"]) and _number(size[phase][key]["wall"])
    assert size["delete"]["livesnap"]["method"] in ("commit", "pull")
    assert set(size["targets"].values()) <= {True, False}

    assert sorted(r["tool"] for r in doc["runs"]) == ["livesnap", "livesnap-api",
                                                      "virsh-blockcommit", "virsh-delete"]
    for r in doc["runs"]:
        assert r["verified"] is True and r["acked_writes"] > 0
        assert r["baseline"]["n"] > 0
        assert r["delete"]["acks_in_window"] >= 1
    for tool in ("livesnap", "livesnap-api"):
        ls = [r for r in doc["runs"] if r["tool"] == tool][0]
        assert ls["delete"]["action"] == "merged" and len(ls["delete"]["merges"]) == 1
        assert len(ls["delete"]["chain_after"]) == 1        # the merge left one image
        # the stall window ran on until livesnap's deferred freeing of the image had ended
        assert ls["delete"]["freed_ms"] >= ls["delete"]["wall_ms"]
    assert [r for r in doc["runs"] if r["tool"] == "virsh-delete"][0]["delete"]["freed_ms"] \
        is None
