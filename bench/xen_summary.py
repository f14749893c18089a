"""bench/xen.py's summary: per size over repeats, per operation (median wall time, worst
stall and pause), the ratios livesnap / baseline, and how stall and pause scale with size."""
import statistics

from harness import ratio
from xen_vm import BASELINES, SCENARIOS

LIVESNAP_DELETES = [k for k in SCENARIOS if k not in BASELINES]


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
           "stall_vs_quiet": max(m["stall_vs_quiet"] for m in ms_list),
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
              "null_pause": agg(ops("delete_intermediate", "null_pause"))}
    for kind in SCENARIOS:
        ops_by[kind] = agg(ops(kind))

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
        ratios=dict({"%s_vs_%s" % (op, base): rs(ops_by[op], ops_by[base])
                     for op in LIVESNAP_DELETES for base in BASELINES},
                    create_vs_null_pause=rs(ops_by["create"], ops_by["null_pause"])))


def scaling(summary):
    """Stall and pause at the largest size / at the smallest, per operation."""
    if len(summary) < 2:
        return None
    lo, hi = summary[0], summary[-1]
    out = {"from_mib": lo["mib"], "to_mib": hi["mib"]}
    for k in ["delete_active", "delete_intermediate", "create"] + list(BASELINES):
        if lo.get(k) and hi.get(k):
            out[k] = {"stall_growth": ratio(hi[k]["stall_ms"], lo[k]["stall_ms"]),
                      "tapdisk_paused_growth": ratio(hi[k]["tapdisk_paused_max_ms"],
                                                     lo[k]["tapdisk_paused_max_ms"]),
                      "stall_ms": [s[k]["stall_ms"] for s in summary]}
    return out
