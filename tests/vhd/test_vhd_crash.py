"""Crash safety of coalesce and pull: the merge runs in a subprocess that dies (os._exit, no
cleanup) at the N-th write, sendfile or truncate, after writing a sector-aligned prefix of that write. The
destination must then pass ``check`` (after ``repair`` where needed) and read, for every sector,
either the old or the new data."""
import os
import random
import shutil
import subprocess
import sys

import pytest

from livesnap import vhd

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = r"""
import os, sys
sys.path.insert(0, %(root)r)
kill_at, tear = int(sys.argv[1]), int(sys.argv[2])
count = [0]
real_pwrite, real_ftruncate = os.pwrite, os.ftruncate

def die_if_due():
    count[0] += 1
    return kill_at and count[0] >= kill_at

def pwrite(fd, data, off):
    if die_if_due():
        data = memoryview(data)
        n = len(data) * tear // 4 // 512 * 512
        if n:
            real_pwrite(fd, data[:n], off)
        os._exit(0)
    return real_pwrite(fd, data, off)

def ftruncate(fd, length):
    if die_if_due():
        os._exit(0)
    return real_ftruncate(fd, length)

real_sendfile = os.sendfile

def sendfile(out_fd, in_fd, offset, count):
    if die_if_due():
        n = count * tear // 4 // 512 * 512
        if n:
            real_sendfile(out_fd, in_fd, offset, n)
        os._exit(0)
    return real_sendfile(out_fd, in_fd, offset, count)

os.pwrite, os.ftruncate, os.sendfile = pwrite, ftruncate, sendfile
from livesnap import vhd
getattr(vhd, sys.argv[3])(sys.argv[4])
sys.stdout.write("%%d\n" %% count[0])
"""


def _setup(d):
    """parent a (partly allocated) and child c: full block, runs over allocated and new blocks."""
    rng = random.Random(7)
    a, c = os.path.join(d, "a.vhd"), os.path.join(d, "c.vhd")
    vhd.create(a, 10 * MiB)
    vhd.write(a, 0, os.urandom(MiB + 4096))
    vhd.write(a, 4 * MiB + 512, os.urandom(8192))
    vhd.write(a, 8 * MiB + 1024, os.urandom(MiB))              # a block only the parent has
    vhd.snapshot(c, a)
    vhd.write(c, 2 * MiB, os.urandom(2 * MiB))                 # full block (batmap)
    for _ in range(12):
        off = rng.randrange(0, 8 * MiB - 65536) // 512 * 512
        vhd.write(c, off, os.urandom(rng.choice([512, 4096, 65536])))
    return a, c


def _run(tmp, op, target, kill_at, tear):
    out = subprocess.check_output(
        [sys.executable, "-c", CHILD % {"root": ROOT}, str(kill_at), str(tear), op, target],
        cwd=tmp)
    return int(out) if out.strip() else None


@pytest.mark.parametrize("op", ["coalesce", "pull"])
def test_kill_at_every_write(tmp_path, op):
    tpl = str(tmp_path / "tpl")
    os.mkdir(tpl)
    a, c = _setup(tpl)
    old = vhd.read(a, 0, 10 * MiB)
    new = vhd.read(c, 0, 10 * MiB)
    dest_name = "a.vhd" if op == "coalesce" else "c.vhd"
    expect_old = old if op == "coalesce" else new
    work = str(tmp_path / "dry")
    shutil.copytree(tpl, work)
    total = _run(work, op, os.path.join(work, "c.vhd"), 0, 0)
    assert total and total >= 5, total
    points = sorted(set(range(1, min(total, 12) + 1)) |
                    set(random.Random(op).sample(range(1, total + 1), min(total, 10))))
    repaired = 0
    for k in points:
        for tear in (0, 2):
            work = str(tmp_path / ("w%d_%d" % (k, tear)))
            shutil.copytree(tpl, work)
            _run(work, op, os.path.join(work, "c.vhd"), k, tear)
            dest = os.path.join(work, dest_name)
            if vhd.check(dest):
                vhd.repair(dest)
                repaired += 1
            # (not -b: data written before its bitmap may sit under clear bits until the rerun)
            assert vhd.check(dest) == [], (k, tear, vhd.check(dest))
            got = vhd.read(dest, 0, 10 * MiB)
            for s in range(0, 10 * MiB, 512):
                sec = got[s:s + 512]
                assert sec == expect_old[s:s + 512] or sec == new[s:s + 512], (k, tear, s)
            # re-running the interrupted merge completes it
            getattr(vhd, op)(os.path.join(work, "c.vhd"))
            assert vhd.read(dest, 0, 10 * MiB) == new
            assert vhd.check(dest, bitmaps=True) == []
            shutil.rmtree(work)
    assert repaired > 0
