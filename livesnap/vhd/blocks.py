"""Blocks of an open VHD: where each block is, its sector bitmap (cached), which sectors the
image itself holds, and the allocation of a new block at the end of data (data, then bitmap,
then BAT entry, as tapdisk orders them). A mixin of :class:`~livesnap.vhd.image.Image`."""
import os
import struct

from livesnap.vhd import format as fmt
from livesnap.vhd.errors import VhdNoSpace, from_oserror
from livesnap.vhd.fileio import _pwrite

_BITMAP_CACHE_MAX = 8192
_COPY_CHUNK = 8 * 1024 * 1024


class Blocks(object):
    """Block geometry, bitmaps and allocation of an open VHD (mixed into ``Image``)."""

    def next_block_sector(self):
        """Where the next block's bitmap goes: end of data, moved so the data is 4 KiB aligned."""
        s = (self.eod + 511) // 512
        while (s + self.bm_secs) % 8:
            s += 1
        return s

    def is_full(self, b):
        return self.batmap_valid and fmt.test_bit(self.batmap, b)

    def bitmap(self, b):
        """The sector bitmap of allocated block ``b`` (cached bytearray)."""
        bm = self.bitmaps.get(b)
        if bm is None:
            if len(self.bitmaps) >= _BITMAP_CACHE_MAX:
                self.bitmaps.clear()
            bm = bytearray(self._read(self.bm_secs * 512, self.bat[b] * 512, "bitmap"))
            self.bitmaps[b] = bm
        return bm

    def block_offset(self, b):
        """Byte offset of block ``b``'s data in the file, None when unallocated."""
        e = self.bat[b]
        return None if e == fmt.UNUSED else (e + self.bm_secs) * 512

    def allocated_blocks(self):
        if self.header is None:
            return list(range(fmt.blocks_for(self.virtual_size)))
        return [b for b in range(self.nblocks) if self.bat[b] != fmt.UNUSED]

    def block_runs(self, b):
        """Runs (first sector, end sector, is_set) of block b's bitmap, clipped to the disk."""
        nsec = min(self.spb, (self.virtual_size - b * self.block_size) // 512)
        if self.bat[b] == fmt.UNUSED:
            return [(0, nsec, False)]
        if self.is_full(b):
            return [(0, nsec, True)]
        return fmt.runs(self.bitmap(b), 0, nsec)

    def sector_map(self):
        """Extents ``(offset, length)`` in bytes of the sectors this image itself holds."""
        out = []
        if self.header is None:
            return [(0, self.virtual_size)] if self.virtual_size else []
        for b in self.allocated_blocks():
            base = b * self.block_size
            for s, e, on in self.block_runs(b):
                if not on:
                    continue
                start, length = base + s * 512, (e - s) * 512
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((start, length))
        return out

    def merge_bitmap(self, b, newbits):
        """OR ``newbits`` into block b's bitmap; write it when it changed; note a full block."""
        if self.is_full(b):
            return
        bm = self.bitmap(b)
        merged = bytearray(x | y for x, y in zip(bm, newbits)) if bm != newbits else bm
        if merged != bm:
            bm[:] = merged
            _pwrite(self.fd, self.path, bm, self.bat[b] * 512)
        self._note_full(b, bm)

    def _note_full(self, b, bm):
        if self.batmap is not None and fmt.all_set(bm, self.spb) \
                and not fmt.test_bit(self.batmap, b):
            fmt.set_bit(self.batmap, b)
            self._dirty_batmap = True

    def new_block(self, b, bitmap, pieces, fill=None):
        """Allocate block ``b`` at the end of data: data, then bitmap, then BAT entry.

        The data is ``pieces`` [(sector, bytes)], or written by ``fill(data_offset)``.
        """
        pos = self.next_block_sector()
        old_eod = self.eod
        start = pos * 512
        data_off = start + self.bm_secs * 512
        end = data_off + self.block_size
        if not self.regular and end + 512 > self.file_size:
            # a block device (an LV) keeps its footer at its end: data cannot pass it
            raise VhdNoSpace(self.path, end + 512, self.file_size)
        full = pieces is not None and len(pieces) == 1 and pieces[0][0] == 0 \
            and len(pieces[0][1]) == self.block_size
        # Whatever the file holds in [old end of data, block end) (the old footer, garbage of
        # an interrupted write) must read as zeros: truncate-extend and overwrite.
        if full:
            _pwrite(self.fd, self.path, pieces[0][1], data_off)     # 1. data
        else:
            self._zero_region(data_off, end)
            if fill is not None:
                fill(data_off)
            for s, d in pieces or ():                         # 1. data
                _pwrite(self.fd, self.path, d, data_off + s * 512)
        _pwrite(self.fd, self.path, bytes(start - old_eod) + bytes(bitmap), old_eod)  # 2.
        self.file_size = max(self.file_size, end)
        self.bat[b] = pos                                     # 3. BAT entry
        _pwrite(self.fd, self.path, struct.pack(">I", pos), self.header.table_offset + 4 * b)
        self.bitmaps[b] = bytearray(bitmap)
        self.eod = max(self.eod, end)
        self._dirty_footer = True
        self._note_full(b, self.bitmaps[b])

    def _zero_region(self, start, end):
        """Make [start, end) read as zeros: explicit zeros inside the file, sparse beyond it."""
        size = self.file_size
        if self.regular:
            try:
                size = os.fstat(self.fd).st_size
            except OSError as e:
                raise from_oserror(self.path, e)
        if start < size:
            stop = min(end, size)
            pos = start
            while pos < stop:
                n = min(_COPY_CHUNK, stop - pos)
                _pwrite(self.fd, self.path, bytes(n), pos)
                pos += n
        if end > size:
            if self.regular:
                try:
                    os.ftruncate(self.fd, end)
                except OSError as e:
                    raise from_oserror(self.path, e)
            else:
                pos = max(start, size)
                while pos < end:
                    n = min(_COPY_CHUNK, end - pos)
                    _pwrite(self.fd, self.path, bytes(n), pos)
                    pos += n

    def set_full_bits(self, b):
        """Mark block b entirely written (bitmap all ones + batmap bit)."""
        self.merge_bitmap(b, bytearray(b"\xff" * (self.bm_secs * 512)))
