"""Byte offsets and values that VHD-FORMAT.md specifies, checked on files the engine writes."""
import os
import struct
import time

from livesnap import vhd
from livesnap.vhd import format as fmt

MiB = 1 << 20


def raw(path):
    with open(path, "rb") as f:
        return f.read()


def ones_complement(buf):
    return (~sum(buf)) & 0xFFFFFFFF


def test_fresh_dynamic_layout(mk):
    p = mk("d.vhd", 64 * MiB)
    b = raw(p)
    assert len(b) == 3584                       # footer, header, BAT, batmap hdr, map, footer
    assert b[:512] == b[-512:]                  # both footer copies
    f = b[:512]
    assert f[0:8] == b"conectix"
    assert struct.unpack(">I", f[8:12])[0] == 2
    assert struct.unpack(">I", f[12:16])[0] == 0x00010000
    assert struct.unpack(">Q", f[16:24])[0] == 512
    ts = struct.unpack(">I", f[24:28])[0]
    assert abs(ts + 946684800 - time.time()) < 60
    assert f[28:32] == b"tap\0"
    assert struct.unpack(">I", f[32:36])[0] == 0x00010003
    assert struct.unpack(">I", f[36:40])[0] == 0
    assert struct.unpack(">QQ", f[40:56]) == (64 * MiB, 64 * MiB)
    assert struct.unpack(">I", f[56:60])[0] == (963 << 16) | (8 << 8) | 17    # spec CHS: 963/8/17
    assert struct.unpack(">I", f[60:64])[0] == 3
    assert struct.unpack(">I", f[64:68])[0] == ones_complement(f[:64] + b"\0" * 4 + f[68:])
    assert f[68:84] != b"\0" * 16
    assert f[84] == 0 and f[85] == 0 and f[86:] == b"\0" * 426
    h = b[512:1536]
    assert h[0:8] == b"cxsparse"
    assert struct.unpack(">QQ", h[8:24]) == (0xFFFFFFFFFFFFFFFF, 1536)
    assert struct.unpack(">III", h[24:36]) == (0x00010000, 32, 0x200000)
    assert struct.unpack(">I", h[36:40])[0] == ones_complement(h[:36] + b"\0" * 4 + h[40:])
    assert h[40:] == b"\0" * (1024 - 40)        # no parent fields
    assert b[1536:1536 + 128] == b"\xff" * 128  # 32 unused entries, padded with zeros
    assert b[1536 + 128:2048] == b"\0" * 384
    bh = b[2048:2560]
    assert bh[0:8] == b"tdbatmap"
    assert struct.unpack(">QII", bh[8:24]) == (2560, 1, 0x00010002)
    assert struct.unpack(">I", bh[24:28])[0] == ones_complement(b[2560:3072])
    assert bh[28:] == b"\0" * (512 - 28)
    assert b[2560:3072] == b"\0" * 512


def test_fresh_child_layout(mk, tmp_path):
    p = mk("a.vhd", 64 * MiB)
    os.utime(p, (1700000000, 1700000000))
    c = str(tmp_path / "b.vhd")
    vhd.snapshot(c, p)
    b = raw(c)
    assert len(b) == 5120
    assert b[:512] == b[-512:]
    assert struct.unpack(">I", b[60:64])[0] == 4
    h = b[512:1536]
    parent_uuid = raw(p)[68:84]
    assert h[40:56] == parent_uuid
    assert struct.unpack(">I", h[56:60])[0] == 1700000000 - 946684800
    assert h[64:64 + 10] == "a.vhd".encode("utf-16-be") and h[74:576] == b"\0" * 502
    locs = [struct.unpack(">IIIIQ", h[576 + 24 * i:600 + 24 * i]) for i in range(8)]
    assert locs[0] == (0x4D616358, 512, 14, 0, 3072)
    assert locs[1] == (0x57326B75, 512, 14, 0, 3584)
    assert locs[2] == (0x57327275, 512, 14, 0, 4096)
    assert all(l == (0, 0, 0, 0, 0) for l in locs[3:])
    assert b[3072:3072 + 14] == b"file://./a.vhd"
    assert b[3584:3584 + 14] == ".\\a.vhd".encode("utf-16-le")
    assert b[4096:4096 + 14] == ".\\a.vhd".encode("utf-16-le")


def test_first_block_sector_7_dynamic_15_child(mk, tmp_path):
    p = mk("a.vhd", 64 * MiB)
    vhd.write(p, 0, b"x" * 512)
    b = raw(p)
    assert struct.unpack(">I", b[1536:1540])[0] == 7
    assert b[7 * 512] == 0x80 and b[7 * 512 + 1:8 * 512] == b"\0" * 511   # MSB-first bit 0
    assert b[8 * 512:8 * 512 + 512] == b"x" * 512
    assert len(b) == (8 + 4096) * 512 + 512                  # block end + footer
    assert b[-512:] == b[:512]
    c = str(tmp_path / "c.vhd")
    vhd.snapshot(c, p)
    vhd.write(c, 3 * MiB, b"y" * 4096)                       # block 1 of the child
    b = raw(c)
    assert struct.unpack(">I", b[1536 + 4:1540 + 4])[0] == 15
    assert struct.unpack(">I", b[1536:1540])[0] == 0xFFFFFFFF
    # second block: data again 4 KiB aligned (bitmap sector = 7 mod 8)
    vhd.write(c, 0, b"z" * 512)
    b = raw(c)
    second = struct.unpack(">I", b[1536:1540])[0]
    assert second % 8 == 7 and second >= 15 + 4097


def test_batmap_bit_for_full_block(mk):
    p = mk("a.vhd", 8 * MiB)
    with vhd.open_image(p, writable=True) as img:
        img.write(2 * MiB, b"\1" * (2 * MiB - 512))
        img.write(4 * MiB - 512, b"\2" * 512)               # last sector completes block 1
    b = raw(p)
    assert b[2560] == 0x40                                  # block 1, MSB first
    assert struct.unpack(">I", b[2048 + 24:2048 + 28])[0] == ones_complement(b[2560:3072])
    assert vhd.check(p) == []


def test_preallocated_bat(mk):
    p = mk("s.vhd", 64 * MiB, max_size=2097152 * MiB)
    b = raw(p)
    h = b[512:1536]
    assert struct.unpack(">I", h[28:32])[0] == 1 << 20
    bm_hdr = 1536 + 4 * MiB
    assert b[bm_hdr:bm_hdr + 8] == b"tdbatmap"
    assert struct.unpack(">QI", b[bm_hdr + 8:bm_hdr + 20]) == (bm_hdr + 512, 256)
    assert len(b) == bm_hdr + 512 + 256 * 512 + 512 and len(b) > 4300000
    assert vhd.check(p) == []
    vhd.grow(p, 100 * MiB, fast_only=True)
    assert vhd.query(p).virtual_size == 100 * MiB
    assert vhd.check(p) == []


def test_child_of_preallocated_keeps_locators_after_batmap(mk, tmp_path):
    p = mk("a.vhd", 64 * MiB)
    c = str(tmp_path / "c.vhd")
    vhd.snapshot(c, p, max_size=2097152 * MiB)
    b = raw(c)
    h = fmt.Header.unpack(b[512:1536])
    assert h.loc[0].data_offset == 1536 + 4 * MiB + 512 + 256 * 512
    assert vhd.check(c) == []


def test_odd_size_geometry_and_qemu_size(mk, cross):
    p = mk("o.vhd", 65 * MiB + 512 * 3)
    info = vhd.query(p)
    assert info.virtual_size == 65 * MiB + 1536
    assert len(cross.qemu(p)) == 65 * MiB + 1536
    c, h, s = fmt.chs(info.virtual_size)
    assert c * h * s * 512 <= info.virtual_size
