"""The sector I/O path of an open VHD: reads resolved through the chain (bitmap by bitmap,
parent for what this image does not hold) and writes of any alignment (edges read through
the chain, whole sectors into blocks). A mixin of :class:`~livesnap.vhd.image.Image`."""
from livesnap.vhd import format as fmt
from livesnap.vhd.errors import VhdError, VhdRange
from livesnap.vhd.fileio import _pwrite


class Sectors(object):
    """Reading and writing sectors of an open VHD (mixed into ``Image``)."""

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise VhdRange(self.path, "range %d+%d outside the disk (%d bytes)"
                           % (offset, length, self.virtual_size))

    def read(self, offset, length):
        """``length`` bytes at ``offset`` as the VM sees them (resolved through the chain)."""
        self._check_range(offset, length)
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def read_into(self, mv, offset):
        n = len(mv)
        if offset >= self.virtual_size:
            mv[:] = bytes(n)
            return
        if offset + n > self.virtual_size:
            cut = self.virtual_size - offset
            mv[cut:] = bytes(n - cut)
            mv = mv[:cut]
            n = cut
        if self.header is None:                       # fixed
            mv[:] = self._read(n, offset, "data")
            return
        pos = 0
        bs = self.block_size
        while pos < n:
            off = offset + pos
            b, inblk = divmod(off, bs)
            cnt = min(n - pos, bs - inblk)
            self._read_block(b, inblk, mv[pos:pos + cnt])
            pos += cnt

    def _read_block(self, b, inblk, mv):
        e = self.bat[b]
        base = b * self.block_size
        if e == fmt.UNUSED:
            self._read_parent(mv, base + inblk)
            return
        data_off = (e + self.bm_secs) * 512
        if self.is_full(b):
            mv[:] = self._read(len(mv), data_off + inblk, "block data")
            return
        end = inblk + len(mv)
        for s, t, on in fmt.runs(self.bitmap(b), inblk // 512, (end + 511) // 512):
            a, z = max(s * 512, inblk), min(t * 512, end)
            part = mv[a - inblk:z - inblk]
            if on:
                part[:] = self._read(z - a, data_off + a, "block data")
            else:
                self._read_parent(part, base + a)

    def _read_parent(self, mv, offset):
        p = self._get_parent()
        if p is None:
            mv[:] = bytes(len(mv))
        else:
            p.read_into(mv, offset)

    def read_own(self, b, s, e):
        """Raw data of sectors [s, e) of block b from this file (no bitmap, no chain)."""
        return self._read((e - s) * 512, (self.bat[b] + self.bm_secs + s) * 512, "block data")

    # --- writing --------------------------------------------------------------------------

    def _need_writable(self):
        if not self.writable:
            raise VhdError(self.path, "image is open read-only")

    def write(self, offset, data):
        """Write bytes at ``offset`` (any alignment); unaligned edges are read through the chain."""
        self._need_writable()
        data = memoryview(data).cast("B")
        n = len(data)
        self._check_range(offset, n)
        if n == 0:
            return
        start = offset // 512 * 512
        end = (offset + n + 511) // 512 * 512
        if start != offset or end != offset + n:
            buf = bytearray(end - start)
            if start != offset:
                buf[:512] = self.read(start, 512)
            if end != offset + n:
                buf[-512:] = self.read(end - 512, 512)
            buf[offset - start:offset - start + n] = data
            data = memoryview(buf)
            offset, n = start, end - start
        if self.header is None:
            _pwrite(self.fd, self.path, data, offset)
            return
        pos = 0
        bs = self.block_size
        while pos < n:
            b, inblk = divmod(offset + pos, bs)
            cnt = min(n - pos, bs - inblk)
            self.write_sectors(b, inblk // 512, data[pos:pos + cnt])
            pos += cnt

    def write_sectors(self, b, sec, data, pieces=None):
        """Write whole sectors into block ``b`` starting at sector ``sec``.

        ``pieces`` (list of (sector, bytes)) writes several runs of one block with a single
        bitmap update; then ``sec``/``data`` are ignored.
        """
        if pieces is None:
            pieces = [(sec, data)]
        newbits = bytearray(self.bm_secs * 512)
        for s, d in pieces:
            fmt.set_bits(newbits, s, s + len(d) // 512)
        if self.bat[b] == fmt.UNUSED:
            self.new_block(b, newbits, pieces)
            return
        data_off = (self.bat[b] + self.bm_secs) * 512
        for s, d in pieces:                                   # 1. data
            _pwrite(self.fd, self.path, d, data_off + s * 512)
        self.merge_bitmap(b, newbits)                         # 2. bitmap
