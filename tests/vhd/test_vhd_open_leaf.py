"""Reading what a tapdisk never rewrites in a leaf it holds open: ``open_header``,
``parent_of`` and ``data_end_unchecked`` on an image caught mid-allocation (a BAT entry
written, its block not yet: the entry points past the end of the file)."""
import os
import struct

import pytest

from livesnap import vhd

MiB = 1 << 20


def chain(tmp_path):
    base = vhd.create(str(tmp_path / "base.vhd"), 8 * MiB)
    vhd.write(base, 0, b"b" * 4096)
    leaf = str(tmp_path / "leaf.vhd")
    vhd.snapshot(leaf, base)
    vhd.write(leaf, 3 * MiB, b"l" * 4096)               # block 1 allocated
    return base, leaf


def mid_allocation(path, block):
    """BAT entry ``block`` -> the sector at the end of the file (the block not written)."""
    with vhd.open_header(path) as img:
        off = img.header.table_offset + 4 * block
    end = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(">I", end // 512))
    return end


def test_an_open_leaf_mid_allocation_reads_by_its_header(tmp_path):
    base, leaf = chain(tmp_path)
    end = mid_allocation(leaf, 2)
    with pytest.raises(vhd.VhdCorrupt, match="BAT entry 2 .* outside the data area"):
        vhd.query(leaf)                                 # a whole read calls it corrupt
    assert vhd.parent_of(leaf) == base
    with vhd.open_header(leaf) as img:
        assert img.virtual_size == 8 * MiB and img.is_differencing
        assert img.bat is None                          # not read
    # the allocation estimate follows the BAT, past the file's end
    assert vhd.data_end_unchecked(leaf) == end + (2 * MiB + 512) + 512


def test_parent_of_a_dynamic_disk_is_none_and_header_only_is_read_only(tmp_path):
    base, leaf = chain(tmp_path)
    assert vhd.parent_of(base) is None
    with pytest.raises(ValueError):
        vhd.Image(leaf, writable=True, chain=False, header_only=True)
    with pytest.raises(ValueError):
        vhd.Image(leaf, header_only=True)               # with its chain


def test_data_end_unchecked_agrees_with_a_whole_read_of_a_sound_image(tmp_path):
    base, leaf = chain(tmp_path)
    for p in (base, leaf):
        assert vhd.data_end_unchecked(p) == vhd.query(p).physical_size


def test_a_broken_header_is_still_an_error(tmp_path):
    base, leaf = chain(tmp_path)
    with open(leaf, "r+b") as f:
        f.seek(512)
        f.write(b"garbage!")
    with pytest.raises(vhd.VhdCorrupt, match="header cookie"):
        vhd.parent_of(leaf)
