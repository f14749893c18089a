#!/usr/bin/env python3
"""Coalesce throughput of livesnap's VHD engine against ``cp`` + ``sync`` of the same bytes.

Two cases, each 256 MiB of child data coalesced into an empty 1 GiB dynamic parent:
  full_blocks: the child holds 128 fully written 2 MiB blocks (batmap bits set);
  runs_64k:    the child holds 4096 runs of 64 KiB, every other 64 KiB (256 blocks half full).
Each coalesce ends with an fsync of the parent; cp copies a 256 MiB file and runs ``sync``.
Prints one JSON document: MiB/s per case and the ratios to cp (targets: >= 0.8, >= 0.5).

    python3 bench/vhd_coalesce.py [--dir DIR] [--mib 256]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from livesnap import vhd  # noqa: E402

MiB = 1 << 20


def drop_dirty():
    subprocess.check_call(["sync"])


def make_child(d, name, mib, pattern):
    parent = os.path.join(d, name + "-parent.vhd")
    child = os.path.join(d, name + "-child.vhd")
    vhd.create(parent, 1024 * MiB)
    vhd.snapshot(child, parent)
    with vhd.open_image(child, writable=True) as img:
        if pattern == "full":
            chunk = os.urandom(2 * MiB)
            for i in range(mib // 2):
                img.write(i * 2 * MiB, chunk)
        else:
            chunk = os.urandom(64 * 1024)
            for i in range(mib * 16):
                img.write(i * 128 * 1024, chunk)
    return parent, child


def time_coalesce(parent, child):
    drop_dirty()
    t = time.time()
    vhd.coalesce(child, sync=True)
    return time.time() - t


def time_cp(d, mib):
    src, dst = os.path.join(d, "cp-src"), os.path.join(d, "cp-dst")
    with open(src, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(mib):
            f.write(chunk)
    drop_dirty()
    t = time.time()
    subprocess.check_call(["cp", src, dst])
    subprocess.check_call(["sync"])
    el = time.time() - t
    os.unlink(src)
    os.unlink(dst)
    return el


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir in /var/tmp)")
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vhdbench-", dir=a.dir or "/var/tmp")
    try:
        res = {"mib": a.mib, "parent_mib": 1024}
        cp1 = time_cp(d, a.mib)
        p, c = make_child(d, "full", a.mib, "full")
        full = time_coalesce(p, c)
        assert vhd.read(p, 0, 4 * MiB) == vhd.read(c, 0, 4 * MiB)
        for f in (p, c):
            os.unlink(f)
        p, c = make_child(d, "runs", a.mib, "runs")
        runs = time_coalesce(p, c)
        assert vhd.read(p, 0, 4 * MiB) == vhd.read(c, 0, 4 * MiB)
        for f in (p, c):
            os.unlink(f)
        cp2 = time_cp(d, a.mib)
        cp = min(cp1, cp2)
        res.update({
            "cp_mib_s": round(a.mib / cp, 1),
            "full_blocks_mib_s": round(a.mib / full, 1),
            "runs_64k_mib_s": round(a.mib / runs, 1),
            "full_blocks_ratio": round(cp / full, 2),
            "runs_64k_ratio": round(cp / runs, 2),
            "targets": {"full_blocks_ratio": 0.8, "runs_64k_ratio": 0.5},
        })
        print(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
