"""The on-disk structures of a VHD: how :class:`~livesnap.vhd.image.Image` reads and checks
footer, header, BAT and batmap when it opens a file, and writes them back (header, footer,
batmap). A mixin of ``Image``: it works on the handle's ``fd``, ``path``, ``footer``,
``header``, ``bat``, ``batmap`` and layout attributes (see ../shared/VHD-FORMAT.md)."""
import array
import os
import sys

from livesnap.vhd import format as fmt
from livesnap.vhd.errors import VhdCorrupt, VhdNoSpace, VhdUnsupported, from_oserror
from livesnap.vhd.fileio import _fsize, _pread, _pwrite


class OnDisk(object):
    """Reads and writes of the metadata of an open VHD (mixed into ``Image``)."""

    def _read(self, length, offset, what):
        data = _pread(self.fd, self.path, length, offset)
        if len(data) != length:
            raise VhdCorrupt(self.path, "%s at %d beyond end of file" % (what, offset))
        return data

    def _load(self):
        self.file_size, self.regular = _fsize(self.fd, self.path)
        if self.file_size < 511:
            raise VhdCorrupt(self.path, "file too small (%d bytes)" % self.file_size)
        if self._forced_footer is not None:
            self.footer, self.footer_source = self._forced_footer, "backup"
        else:
            self.footer, self.footer_source = self._find_footer()
        f = self.footer
        if f.type not in (fmt.TYPE_FIXED, fmt.TYPE_DYNAMIC, fmt.TYPE_DIFF):
            raise VhdCorrupt(self.path, "unknown disk type %d" % f.type)
        if f.curr_size % fmt.SECTOR or f.curr_size > fmt.MAX_SIZE:
            raise VhdCorrupt(self.path, "bad virtual size %d" % f.curr_size)
        if f.crtr_app == fmt.CREATOR_APP and f.crtr_ver == fmt.version(0, 1):
            raise VhdUnsupported(self.path, "tap 0.1 (little-endian bitmaps) image")
        self.virtual_size = f.curr_size
        self.header = None
        self.batmap_hdr = None
        self.batmap = None
        self.batmap_valid = False
        if f.type == fmt.TYPE_FIXED:
            if self.file_size < f.curr_size + 511:
                raise VhdCorrupt(self.path, "fixed disk shorter than its size")
            self.eod = f.curr_size
            self.meta_end = 0
            return
        self._load_header()
        if getattr(self, "_header_only", False):
            # what a tapdisk never rewrites: footer contents (it moves the footer, same
            # bytes) and header with its locators; BAT, batmap and layout are not read
            self.bat = self.eod = self.meta_end = None
            return
        self._load_bat()
        self._load_batmap()
        self._compute_layout()

    def _find_footer(self):
        """Primary footer (last 512 bytes), else a 511-byte short footer, else the backup at 0."""
        errors = []
        size = self.file_size
        candidates = [("primary", size - 512, 512), ("short", size - 511, 511),
                      ("backup", 0, 512)]
        for source, off, n in candidates:
            if off < 0:
                continue
            raw = _pread(self.fd, self.path, n, off)
            if len(raw) != n:
                continue
            problem = footer_problem(raw)
            if problem is None:
                f = fmt.Footer.unpack(raw)
                if source == "backup" and f.type == fmt.TYPE_FIXED:
                    continue
                return f, source
            errors.append("%s footer: %s" % (source, problem))
        raise VhdCorrupt(self.path, "no valid footer (%s)" % "; ".join(errors))

    def _load_header(self):
        off = self.footer.data_offset
        if off % fmt.SECTOR or off + 1024 > self.file_size:
            raise VhdCorrupt(self.path, "header offset %d outside the file" % off)
        raw = self._read(1024, off, "header")
        h = fmt.Header.unpack(raw)
        if h.cookie != fmt.HEADER_COOKIE:
            raise VhdCorrupt(self.path, "bad header cookie %r" % h.cookie)
        if h.computed_checksum() != h.checksum:
            raise VhdCorrupt(self.path, "bad header checksum")
        bs = h.block_size
        if bs < 4096 or bs > fmt.MAX_BLOCK_SIZE or bs & (bs - 1):
            raise VhdCorrupt(self.path, "bad block size %d" % bs)
        self.header = h
        self.block_size = bs
        self.spb = bs // fmt.SECTOR
        self.bm_secs = fmt.secs_round_up_no_zero(self.spb // 8)
        self.nblocks = fmt.blocks_for(self.virtual_size, bs)
        if h.max_bat_size < self.nblocks:
            raise VhdCorrupt(self.path, "BAT has %d entries, size needs %d"
                             % (h.max_bat_size, self.nblocks))
        if h.table_offset % fmt.SECTOR or h.table_offset < off + 1024 \
                or h.table_offset + h.bat_bytes > self.file_size:
            raise VhdCorrupt(self.path, "BAT at %d (%d bytes) outside the file"
                             % (h.table_offset, h.bat_bytes))

    def _load_bat(self):
        h = self.header
        raw = self._read(4 * self.nblocks, h.table_offset, "BAT")
        bat = array.array("I")
        bat.frombytes(raw)
        if sys.byteorder == "little":
            bat.byteswap()
        self.bat = bat

    def has_batmap_version(self):
        f = self.footer
        return f.crtr_app[:3] == b"tap" and f.crtr_ver >= fmt.version(1, 2)

    def _load_batmap(self):
        if not self.has_batmap_version():
            return
        h = self.header
        off = h.table_offset + h.bat_bytes
        if off + 512 > self.file_size:
            return
        bh = fmt.BatmapHeader.unpack(self._read(512, off, "batmap header"))
        if bh.cookie != fmt.BATMAP_COOKIE:
            return
        self.batmap_hdr = bh
        need = fmt.batmap_sectors(h.max_bat_size)
        ok = (bh.batmap_version <= fmt.BATMAP_VERSION and bh.batmap_size >= need
              and bh.batmap_size <= need + 1024 and bh.batmap_offset % fmt.SECTOR == 0
              and bh.batmap_offset >= off + 512
              and bh.batmap_offset + bh.batmap_size * fmt.SECTOR <= self.file_size)
        if ok:
            self.batmap = bytearray(self._read(bh.batmap_size * fmt.SECTOR, bh.batmap_offset,
                                               "batmap"))
            ok = fmt.batmap_checksum(self.batmap, self.virtual_size,
                                     bh.batmap_version) == bh.checksum
            if ok:
                for b in range(self.nblocks):
                    if fmt.test_bit(self.batmap, b) and self.bat[b] == fmt.UNUSED:
                        ok = False
                        break
        if not ok:
            # The batmap only speeds things up: an invalid one is ignored when reading and
            # rebuilt from the bitmaps when the image is next flushed writable.
            self.batmap_valid = False
            if self.batmap is None or len(self.batmap) < need * fmt.SECTOR:
                self.batmap = bytearray(need * fmt.SECTOR)
            self._dirty_batmap = self.writable and self._batmap_fits()
        else:
            self.batmap_valid = True

    def _batmap_fits(self):
        bh = self.batmap_hdr
        h = self.header
        off = h.table_offset + h.bat_bytes
        need = fmt.batmap_sectors(h.max_bat_size)
        return bh.batmap_offset == off + 512 and bh.batmap_size >= need

    def _compute_layout(self):
        h = self.header
        ends = [self.footer.data_offset + 1024, h.table_offset + h.bat_bytes]
        if self.batmap_hdr is not None:
            ends.append(h.table_offset + h.bat_bytes + 512)
            if self.batmap_hdr.batmap_offset + self.batmap_hdr.batmap_size * 512 <= self.file_size:
                ends.append(self.batmap_hdr.batmap_offset + self.batmap_hdr.batmap_size * 512)
        if self.footer.type == fmt.TYPE_DIFF:
            for loc in h.loc:
                if loc.code != fmt.PLAT_NONE and loc.data_offset + loc.space_bytes() <= self.file_size:
                    ends.append(loc.data_offset + loc.space_bytes())
        self.meta_end = fmt.pad_sectors(max(ends))
        limit = self.file_size
        if self.footer_source == "primary":
            limit -= 512
        blk_secs = self.bm_secs + self.spb
        used = []
        for b in range(self.nblocks):
            e = self.bat[b]
            if e == fmt.UNUSED:
                continue
            if e * 512 < self.meta_end or (e + blk_secs) * 512 > limit:
                raise VhdCorrupt(self.path, "BAT entry %d (sector %d) outside the data area"
                                 % (b, e))
            used.append(e)
        used.sort()
        for a, c in zip(used, used[1:]):
            if c - a < blk_secs:
                raise VhdCorrupt(self.path, "blocks at sectors %d and %d overlap" % (a, c))
        self.eod = max(self.meta_end, (used[-1] + blk_secs) * 512 if used else 0)

    # --- metadata writes ------------------------------------------------------------------

    def rebuild_batmap(self):
        """Recompute the batmap from the bitmaps (a bit only for a fully written block)."""
        if self.batmap is None:
            return
        self.batmap[:] = bytes(len(self.batmap))
        self.batmap_valid = True
        for b in range(self.nblocks):
            if self.bat[b] != fmt.UNUSED and fmt.all_set(self.bitmap(b), self.spb):
                fmt.set_bit(self.batmap, b)
        self._dirty_batmap = True

    def write_batmap(self):
        if self.batmap is None or self.batmap_hdr is None or not self._batmap_fits():
            return
        if not self.batmap_valid:
            self.rebuild_batmap()
        bh = self.batmap_hdr
        bh.checksum = fmt.batmap_checksum(self.batmap, self.virtual_size, fmt.BATMAP_VERSION)
        bh.batmap_version = fmt.BATMAP_VERSION
        size = bh.batmap_size * 512
        _pwrite(self.fd, self.path, bh.pack() + bytes(self.batmap[:size]),
                bh.batmap_offset - 512)
        self._dirty_batmap = False

    def write_footer(self, backup=False):
        """Primary footer at end of data, file truncated after it; optionally the backup too.
        On a block device (a VHD on an LV) the footer stays at the device's end, as libvhd
        does (``vhd_footer_offset_at_eof``): the device's size is the physical size."""
        raw = self.footer.pack()
        if self.header is None:
            _pwrite(self.fd, self.path, raw, self.virtual_size)
            return
        if backup:
            _pwrite(self.fd, self.path, raw, 0)
        if not self.regular:
            if self.eod + 512 > self.file_size:
                raise VhdNoSpace(self.path, self.eod + 512, self.file_size)
            _pwrite(self.fd, self.path, raw, self.file_size - 512)
            self.footer_source = "primary"
            self._dirty_footer = False
            return
        _pwrite(self.fd, self.path, raw, self.eod)
        try:
            os.ftruncate(self.fd, self.eod + 512)
        except OSError as e:
            raise from_oserror(self.path, e)
        self.file_size = self.eod + 512
        self.footer_source = "primary"
        self._dirty_footer = False

    def write_header(self):
        _pwrite(self.fd, self.path, self.header.pack(), self.footer.data_offset)


def footer_problem(raw):
    """Why 511/512 bytes are not a usable footer (None when they are)."""
    if raw[:8] == fmt.POISON_COOKIE:
        return "disabled VHD (v_poison)"
    if raw[:8] != fmt.FOOTER_COOKIE:
        return "bad cookie"
    f = fmt.Footer.unpack(raw)
    if f.computed_checksum() != f.checksum:
        # tap 1.1 wrote 'hidden' without updating the checksum: tolerated
        if not (f.crtr_app[:3] == b"tap" and f.crtr_ver < fmt.version(1, 2) and f.hidden):
            return "bad checksum"
        g = f.copy()
        g.hidden = 0
        if g.computed_checksum() != f.checksum:
            return "bad checksum"
    return None
