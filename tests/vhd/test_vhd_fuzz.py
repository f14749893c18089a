"""Fuzzing: corrupt images give a typed error (VhdError), never a hang, a crash or a write.

10,000+ seeded cases mutate a small chain in place (flipped bytes in footer / header / BAT /
batmap / locators / bitmaps, with and without fixed-up checksums, BAT entries outside the file
or overlapping, locator loops, absurd sizes, truncation), then open + read + check it, then
restore the original bytes.
"""
import os
import random
import struct

import pytest

from livesnap import vhd
from livesnap.vhd import format as fmt

MiB = 1 << 20
CASES = 10500


def _fix_footer(buf, off):
    f = fmt.Footer.unpack(buf[off:off + 512])
    buf[off:off + 512] = f.pack()


def _fix_header(buf):
    h = fmt.Header.unpack(buf[512:1536])
    buf[512:1536] = h.pack()


HEAD = 16384


def _mutate(rng, small, n):
    """One case on ``small`` = the file's first HEAD bytes + its last 512 (the primary footer)
    for a file of ``n`` bytes: (cut length, None) for a truncation, else (None, new small)."""
    buf = bytearray(small)
    kind = rng.randrange(12)
    if kind == 0:                                    # truncation
        cut = rng.choice([rng.randrange(n), n - rng.randrange(1, 4096), rng.randrange(4096)])
        return max(0, cut), None, "truncate %d" % cut
    regions = {1: (0, 512), 2: (512, 1536), 3: (1536, 2048), 4: (2048, 3072),
               5: (3072, 4608), 6: (HEAD, HEAD + 512), 7: (4608, 4608 + 8192)}
    if kind in regions:
        a, b = regions[kind]
        for _ in range(rng.choice([1, 1, 2, 8])):
            i = rng.randrange(a, b)
            buf[i] ^= 1 << rng.randrange(8) if rng.random() < .7 else rng.randrange(1, 256)
        if rng.random() < .5:
            if kind in (1, 6):
                _fix_footer(buf, 0 if kind == 1 else HEAD)
            elif kind in (2, 5):
                _fix_header(buf)
        return None, bytes(buf), "flip region %d" % kind
    if kind == 8:                                    # BAT entry outside / overlapping
        e = rng.choice([0, 1, 6, 7, 15, 16, 4100, 4111, 0x7FFFFFFF, 0xFFFFFFFE,
                        rng.randrange(1 << 32), n // 512, n // 512 - 10])
        i = rng.randrange(2)
        buf[1536 + 4 * i:1540 + 4 * i] = struct.pack(">I", e)
        return None, bytes(buf), "bat[%d]=%d" % (i, e)
    if kind == 9:                                    # absurd sizes, checksums fixed
        which = rng.randrange(4)
        if which == 0:
            v = rng.choice([0, 1, 511, 1 << 40, 1 << 63, (1 << 64) - 512, 3 * MiB, 64 * MiB])
            for off in (0, HEAD):
                buf[off + 48:off + 56] = struct.pack(">Q", v)
                _fix_footer(buf, off)
        elif which == 1:
            v = rng.choice([0, 1, 1 << 20, 0xFFFFFFFF, 3])
            buf[512 + 28:512 + 32] = struct.pack(">I", v)
            _fix_header(buf)
        elif which == 2:
            v = rng.choice([0, 512, 1 << 21, 1 << 22, 0xFFFFFFFF, 4096 + 1])
            buf[512 + 32:512 + 36] = struct.pack(">I", v)
            _fix_header(buf)
        else:
            slot = rng.randrange(3)
            o = 512 + 576 + 24 * slot
            field = rng.choice([4, 8, 16])
            fmtc = ">Q" if field == 16 else ">I"
            size = 8 if field == 16 else 4
            v = rng.choice([0, 1, 0xFFFFFFFF, 1 << 30, n, n - 1])
            buf[o + field:o + field + size] = struct.pack(fmtc, v)
            _fix_header(buf)
        return None, bytes(buf), "absurd %d" % which
    if kind == 10:                                   # parent locator loops to itself
        for off, enc in ((3072, b"file://./c.vhd"), (3584, ".\\c.vhd".encode("utf-16-le")),
                         (4096, ".\\c.vhd".encode("utf-16-le"))):
            buf[off:off + len(enc)] = enc
        if rng.random() < .5:
            h = fmt.Header.unpack(buf[512:1536])
            h.prt_name = fmt.encode_parent_name("c.vhd")
            buf[512:1536] = h.pack()
        return None, bytes(buf), "locator loop"
    # kind 11: random bytes anywhere in the metadata
    for _ in range(rng.randrange(1, 32)):
        buf[rng.randrange(8192)] = rng.randrange(256)
    return None, bytes(buf), "noise"


def _build(tmp_path):
    a = str(tmp_path / "a.vhd")
    c = str(tmp_path / "c.vhd")
    vhd.create(a, 4 * MiB)
    vhd.write(a, 0, b"\x11" * (2 * MiB))
    vhd.write(a, 2 * MiB + 4096, b"\x22" * 4096)
    vhd.snapshot(c, a)
    vhd.write(c, 8192, b"\x33" * 12288)
    vhd.write(c, 2 * MiB + 65536, b"\x44" * 4096)
    return a, c


def _exercise(path, deep):
    try:
        with vhd.open_image(path) as img:
            if deep:
                img.read(0, min(img.virtual_size, 8 * MiB))
            else:
                img.read(0, min(img.virtual_size, 16384))
                img.read(max(0, min(img.virtual_size, 8 * MiB) - 70000), 65536)
            img.info()
            img.sector_map()
    except vhd.VhdError:
        pass
    problems = vhd.check(path, parents=deep, bitmaps=deep)
    assert isinstance(problems, list)



def _apply(fd, n, cut, small):
    if cut is not None:
        os.ftruncate(fd, cut)
    else:
        os.pwrite(fd, small[:HEAD], 0)
        os.pwrite(fd, small[HEAD:], n - 512)


SHARDS = 4


# the cases in SHARDS tests (every shard draws the whole seeded sequence and exercises the cases
# of its residue), so that pytest-xdist spreads them: one test was among the suite's longest
@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
def test_fuzz_typed_errors_no_writes(tmp_path, shard):
    a, c = _build(tmp_path)
    originals = {p: open(p, "rb").read() for p in (a, c)}
    smalls = {p: o[:HEAD] + o[-512:] for p, o in originals.items()}
    fds = {p: os.open(p, os.O_RDWR) for p in (a, c)}
    rng = random.Random(20261127)
    kinds = {}
    exercised = 0
    try:
        for case in range(CASES):
            target = c if rng.random() < .85 else a
            orig, n = smalls[target], len(originals[target])
            cut, small, what = _mutate(rng, orig, n)
            kinds[what.split()[0]] = kinds.get(what.split()[0], 0) + 1
            if case % SHARDS != shard:
                continue
            exercised += 1
            _apply(fds[target], n, cut, small)
            before = os.stat(target)
            try:
                _exercise(c, case % 10 == 0)
                if target == a:
                    _exercise(a, case % 10 == 0)
            except vhd.VhdError:
                pass                           # check itself may only raise typed errors
            except Exception as e:             # pragma: no cover - the failure we hunt
                raise AssertionError("case %d (%s on %s): %r" % (case, what, target, e))
            after = os.stat(target)
            assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size), \
                "case %d (%s) wrote to the image" % (case, what)
            if cut is not None:
                os.pwrite(fds[target], originals[target][cut:], cut)
            else:
                _apply(fds[target], n, None, orig)
    finally:
        for fd in fds.values():
            os.close(fd)
    for p, orig in originals.items():
        assert open(p, "rb").read() == orig
    assert sum(kinds.values()) >= 10000 and len(kinds) >= 8
    assert exercised == len(range(shard, CASES, SHARDS))


def test_specific_corruptions_are_typed(tmp_path):
    a, c = _build(tmp_path)
    orig = open(c, "rb").read()

    def variant(data):
        with open(c, "wb") as f:
            f.write(data)

    variant(orig[:1000])
    try:
        vhd.open_image(c)
        assert False
    except vhd.VhdCorrupt as e:
        assert e.errno == 22
    buf = bytearray(orig)
    buf[1536:1540] = struct.pack(">I", 1 << 30)
    variant(bytes(buf))
    try:
        vhd.open_image(c)
        assert False
    except vhd.VhdCorrupt as e:
        assert "outside" in str(e)
    assert any("footer" in p for p in vhd.check(c)) or vhd.check(c)
    buf = bytearray(orig)
    buf[3072:3072 + 14] = b"file://./c.vhd"
    buf[3584:3598] = ".\\c.vhd".encode("utf-16-le")
    buf[4096:4110] = ".\\c.vhd".encode("utf-16-le")
    variant(bytes(buf))
    try:
        vhd.open_image(c)
        assert False
    except vhd.VhdChainLoop as e:
        assert e.errno == 40
    assert vhd.check(c, parents=True)
