"""Edits of an existing VHD's metadata: reparent, hide, marker, grow (moving blocks when BAT
and batmap must grow), drop all data, move the footer (``vhd-util modify``)."""
import array
import errno
import os
import struct
import sys

from livesnap.vhd import format as fmt
from livesnap.vhd import paths
from livesnap.vhd.create import _mtime_vhd
from livesnap.vhd.errors import (VhdChainLoop, VhdError, VhdMissing, VhdNameTooLong, VhdRange,
                                 VhdUnsupported)
from livesnap.vhd.fileio import RawImage, _pread, _pwrite
from livesnap.vhd.image import open_image


def set_parent(path, parent_path, raw=False):
    """Point differencing ``path`` at a new parent (None: make it a dynamic disk).

    Unlike ``vhd-util modify -p`` this checks that the parent exists and opens as a chain,
    that its footer UUID is what gets recorded, that it is not bigger than the child and that
    it does not have the child among its ancestors. Locators are rewritten in place.
    """
    with open_image(path, writable=True, chain=False) as img:
        if not img.is_differencing:
            raise VhdUnsupported(img.path, "not a differencing disk")
        h = img.header
        if parent_path is None:
            h.prt_uuid, h.prt_ts, h.prt_name = fmt.NULL_UUID, 0, bytes(512)
            h.loc = [fmt.Locator() for _ in range(fmt.N_LOCATORS)]
            img.write_header()
            img.footer.type = fmt.TYPE_DYNAMIC
            img._compute_layout()
            img.write_footer(backup=True)
            return None
        parent_path = os.path.abspath(parent_path)
        if not os.path.exists(parent_path):
            raise VhdMissing(parent_path, "new parent does not exist")
        if raw:
            with RawImage(parent_path) as rp:
                psize, puuid, chain = rp.size, fmt.NULL_UUID, [rp.path]
        else:
            with open_image(parent_path) as p:
                psize, puuid = p.virtual_size, p.footer.uuid
                chain = []
                q = p
                while q is not None:
                    chain.append(q.path)
                    q = q.parent
        me = os.path.realpath(img.path)
        if any(os.path.realpath(c) == me for c in chain):
            raise VhdChainLoop(img.path, "%s has %s as an ancestor" % (parent_path, img.path))
        if psize > img.virtual_size:
            raise VhdRange(img.path, "parent %s (%d bytes) is bigger than the child (%d bytes)"
                           % (parent_path, psize, img.virtual_size))
        name = paths.parent_name(parent_path)
        try:
            prt_name = fmt.encode_parent_name(name)
        except ValueError:
            raise VhdNameTooLong(img.path, "parent name %r too long" % name)
        rel = fmt.relative_path(img.path, parent_path)
        writes = []
        slots = [(i, l) for i, l in enumerate(h.loc) if l.code in
                 (fmt.PLAT_MACX, fmt.PLAT_W2KU, fmt.PLAT_W2RU)]
        if not slots:
            raise VhdUnsupported(img.path, "no parent locator slots to rewrite")
        for i, loc in slots:
            data = fmt.encode_locator(loc.code, rel)
            if len(data) > loc.space_bytes():
                raise VhdNameTooLong(img.path, "relative parent path %r does not fit its "
                                     "locator (%d bytes)" % (rel, loc.space_bytes()))
            writes.append((loc, data))
        h.prt_uuid, h.prt_ts, h.prt_name = puuid, _mtime_vhd(parent_path), prt_name
        for loc, data in writes:
            loc.data_len = len(data)
        img.write_header()
        for loc, data in writes:
            _pwrite(img.fd, img.path, data + bytes(loc.space_bytes() - len(data)),
                    loc.data_offset)
        return parent_path


def set_hidden(path, value):
    """Set the blktap ``hidden`` flag (both footer copies)."""
    with open_image(path, writable=True, chain=False) as img:
        img.footer.hidden = 1 if value else 0
        img.write_footer(backup=img.header is not None)


def set_marker(path, value):
    """Set the batmap header's marker byte (without vhd-util's batmap-zeroing bug)."""
    with open_image(path, writable=True, chain=False) as img:
        if img.batmap_hdr is None:
            raise VhdUnsupported(img.path, "no batmap")
        img.batmap_hdr.marker = int(value) & 0xFF
        img._dirty_batmap = True


def grow(path, new_size, fast_only=False):
    """Grow the virtual size. Within the preallocated BAT (``-S``) only the footers change;
    otherwise blocks in the way are moved to the end so BAT and batmap can grow (offline)."""
    with open_image(path, writable=True, chain=False) as img:
        if new_size % 512:
            raise VhdRange(img.path, "size %d not a multiple of 512" % new_size)
        if new_size < img.virtual_size:
            e = VhdUnsupported(img.path, "shrinking is not supported")
            e.errno = errno.ENOSYS
            raise e
        if new_size > fmt.MAX_SIZE:
            raise VhdRange(img.path, "size %d above the VHD maximum" % new_size)
        if img.header is None:
            raise VhdUnsupported(img.path, "fixed disk")
        if new_size == img.virtual_size:
            return
        need = fmt.blocks_for(new_size, img.block_size)
        if need > img.header.max_bat_size:
            if fast_only:
                raise VhdRange(img.path, "size %d beyond the preallocated maximum %d"
                               % (new_size, img.max_size))
            _grow_metadata(img, need)
        img.nblocks = need
        img._load_bat()          # entries beyond the old size are on disk (UNUSED)
        img.footer.curr_size = new_size
        img.footer.geometry = fmt.geometry(new_size)
        img.virtual_size = new_size
        if img.batmap is not None:
            img._dirty_batmap = True
        img.write_batmap()
        img.write_footer(backup=True)


def _grow_metadata(img, need):
    """Enlarge BAT + batmap (+ locators) in place, first moving the blocks that are in the way."""
    h = img.header
    new_bat_bytes = fmt.pad_sectors(4 * need)
    bm_off = h.table_offset + new_bat_bytes
    bm_secs = fmt.batmap_sectors(need)
    end = bm_off + 512 + bm_secs * 512
    locs = [(i, l) for i, l in enumerate(h.loc) if l.code != fmt.PLAT_NONE]
    loc_data = []
    for i, l in locs:
        loc_data.append(_pread(img.fd, img.path, l.space_bytes(), l.data_offset))
        end += l.space_bytes()
    end = fmt.pad_sectors(end)
    # 1. move blocks that start below the new end of metadata to the end of the file
    blk_secs = img.bm_secs + img.spb
    for b in sorted(img.allocated_blocks(), key=lambda x: img.bat[x]):
        e = img.bat[b]
        if e * 512 >= end:
            continue
        raw = _pread(img.fd, img.path, blk_secs * 512, e * 512)
        pos = img.next_block_sector()
        while pos * 512 < end:
            pos += 8
        _pwrite(img.fd, img.path, bytes(pos * 512 - img.eod) + raw, img.eod)
        img.bat[b] = pos
        _pwrite(img.fd, img.path, struct.pack(">I", pos), h.table_offset + 4 * b)
        img.eod = max(img.eod, (pos + blk_secs) * 512)
        img.bitmaps.pop(b, None)
    img.write_footer()
    # 2. new metadata: BAT, batmap, locators, header
    old_map = img.batmap
    bat = array.array("I", img.bat)
    bat.extend([fmt.UNUSED] * (need - len(bat)))
    raw_bat = array.array("I", bat)
    if sys.byteorder == "little":
        raw_bat.byteswap()
    region = bytearray(end - h.table_offset)
    region[:new_bat_bytes] = b"\xff" * new_bat_bytes
    region[:4 * len(bat)] = raw_bat.tobytes()
    bh = img.batmap_hdr or fmt.BatmapHeader.new(bm_off + 512, bm_secs)
    bh.batmap_offset, bh.batmap_size = bm_off + 512, bm_secs
    img.batmap = bytearray(bm_secs * 512)
    if old_map is not None and img.batmap_valid:
        img.batmap[:len(old_map)] = old_map[:bm_secs * 512]
    img.batmap_hdr = bh
    off = bm_off + 512 + bm_secs * 512
    for (i, l), data in zip(locs, loc_data):
        l.data_offset = off
        region[off - h.table_offset:off - h.table_offset + len(data)] = data
        off += l.space_bytes()
    _pwrite(img.fd, img.path, bytes(region), h.table_offset)
    h.max_bat_size = need
    img.bat = bat
    img.write_header()
    img.batmap_valid = img.batmap_valid or old_map is None
    img._dirty_batmap = True


def drop_data(path):
    """vhd-util modify -z: every block unallocated, batmap cleared, file truncated."""
    with open_image(path, writable=True, chain=False) as img:
        if img.header is None:
            raise VhdUnsupported(img.path, "fixed disk")
        n = img.header.max_bat_size
        _pwrite(img.fd, img.path, b"\xff" * (4 * n), img.header.table_offset)
        img.bat = array.array("I", [fmt.UNUSED] * img.nblocks)
        img.bitmaps.clear()
        if img.batmap is not None:
            img.batmap[:] = bytes(len(img.batmap))
            img.batmap_valid = True
            img._dirty_batmap = True
        img._compute_layout()
        img.write_batmap()
        img.write_footer()


def set_physical_size(path, nbytes):
    """vhd-util modify -s: write the footer at ``nbytes - 512`` (>= current physical size)."""
    with open_image(path, writable=True, chain=False) as img:
        if nbytes % 512 or nbytes < img.physical_size:
            raise VhdError(img.path, "physical size %d below %d or unaligned"
                           % (nbytes, img.physical_size))
        _pwrite(img.fd, img.path, img.footer.pack(), nbytes - 512)
        img.writable = False          # do not move the footer back on close
