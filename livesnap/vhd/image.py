"""Open VHD images (dynamic, differencing, fixed) and raw parents; create, snapshot, read, write,
reparent, hide, grow, query.

An :class:`Image` is a handle that caches the BAT, the sector bitmaps and the batmap the way tapdisk
does: writes go to the data, then the bitmap, then the BAT entry; the batmap and the primary footer
are written by :meth:`Image.flush` / :meth:`Image.close` only (tapdisk writes them on pause/close).
A crash while a handle is open therefore leaves a file that ``repair`` fixes (no primary footer),
never one whose BAT points at unwritten data.
"""
import array
import collections
import errno
import logging
import os
import stat
import struct
import sys

from livesnap.vhd import format as fmt
from livesnap.vhd.errors import (VhdChainLoop, VhdChainTooDeep, VhdCorrupt, VhdError, VhdNoSpace,
                                 VhdMissing, VhdNameTooLong, VhdParentMismatch, VhdRange,
                                 VhdUnsupported, from_oserror)

log = logging.getLogger(__name__)

MAX_CHAIN = 256                    # a chain deeper than this is treated as corrupt (or a loop)
MAX_LOCATOR_BYTES = 64 * 1024
_BITMAP_CACHE_MAX = 8192
_COPY_CHUNK = 8 * 1024 * 1024

Info = collections.namedtuple("Info", [
    "path", "type", "virtual_size", "physical_size", "parent", "parent_uuid", "uuid", "hidden",
    "marker", "depth", "allocated_blocks", "max_size", "block_size"])
Info.__doc__ = """What ``query`` tells about one image (sizes in bytes, parent = absolute path)."""


def _pread(fd, path, length, offset):
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        raise from_oserror(path, e)
    return data


def _pwrite(fd, path, data, offset):
    mv = memoryview(data)
    try:
        while len(mv):
            n = os.pwrite(fd, mv, offset)
            mv = mv[n:]
            offset += n
    except OSError as e:
        raise from_oserror(path, e)


def _fsize(fd, path):
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END), False
        return st.st_size, True
    except OSError as e:
        raise from_oserror(path, e)


class RawImage(object):
    """A raw file used as the parent of a differencing VHD (``snapshot -m``)."""
    is_vhd = False

    def __init__(self, path, writable=False):
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise from_oserror(self.path, e)
        self.writable = writable
        self.size, _ = _fsize(self.fd, self.path)
        self.virtual_size = self.size
        self.parent = None
        self.depth = 1

    def read_into(self, mv, offset):
        n = len(mv)
        avail = max(0, min(n, self.size - offset))
        if avail:
            data = _pread(self.fd, self.path, avail, offset)
            mv[:len(data)] = data
            avail = len(data)
        if avail < n:
            mv[avail:] = bytes(n - avail)

    def read(self, offset, length):
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return bytes(buf)

    def write(self, offset, data):
        _pwrite(self.fd, self.path, data, offset)

    def flush(self, sync=False):
        if sync and self.writable:
            os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Image(object):
    """An open VHD. Use :func:`open_image`; ``with`` closes it (flushing footer + batmap)."""
    is_vhd = True

    def __init__(self, path, writable=False, chain=True, check_parent_uuid=True, _seen=None,
                 _footer=None, header_only=False):
        if header_only and (writable or chain):
            raise ValueError("a header-only image is opened read-only and without its chain")
        self._forced_footer = _footer
        self._header_only = header_only
        self.path = os.path.abspath(path)
        self.writable = writable
        self.fd = None
        self.parent = None
        self._chain = chain
        self._check_parent_uuid = check_parent_uuid
        self._seen = list(_seen or ())
        self._parent_opened = False
        self.bitmaps = {}
        self._dirty_footer = False
        self._dirty_batmap = False
        try:
            self.fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise from_oserror(self.path, e)
        try:
            self._load()
            if chain:
                self._open_parent()
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeError,
                MemoryError) as e:
            self._abort()
            raise VhdCorrupt(self.path, "unreadable metadata (%s)" % e)
        except BaseException:
            self._abort()
            raise

    # --- loading and validation -----------------------------------------------------------

    def _abort(self):
        if self.parent is not None:
            self.parent.close()
            self.parent = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

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
        if self._header_only:
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

    # --- parent ---------------------------------------------------------------------------

    @property
    def is_differencing(self):
        return self.footer.type == fmt.TYPE_DIFF

    def parent_locators(self):
        """[(slot, code, decoded path text)] for the locators blktap can decode."""
        out = []
        if self.header is None:
            return out
        for i, loc in enumerate(self.header.loc):
            if loc.code not in (fmt.PLAT_MACX, fmt.PLAT_W2KU, fmt.PLAT_W2RU):
                continue
            if not (0 < loc.data_len <= loc.space_bytes() <= MAX_LOCATOR_BYTES):
                continue
            if loc.data_offset + loc.data_len > self.file_size:
                continue
            raw = _pread(self.fd, self.path, loc.data_len, loc.data_offset)
            try:
                text = fmt.decode_locator(loc.code, raw)
            except UnicodeError:
                continue
            if text:
                out.append((i, loc.code, text))
        return out

    def parent_candidates(self):
        """The absolute paths the parent locators name, in order (relative ones resolved
        against this image's directory), whether they exist or not."""
        base = os.path.dirname(self.path)
        return [os.path.normpath(text if os.path.isabs(text) else os.path.join(base, text))
                for _, _, text in self.parent_locators()]

    def parent_path(self):
        """Absolute path of the parent as blktap resolves it (None for a non-differencing disk)."""
        if not self.is_differencing:
            return None
        candidates = self.parent_candidates()
        if not candidates:
            raise VhdCorrupt(self.path, "differencing disk without a usable parent locator")
        for p in candidates:
            if os.access(p, os.R_OK):
                return p
        raise VhdMissing(self.path, "parent %s not found" % self.parent_locators()[0][2])

    def _open_parent(self):
        self._parent_opened = True
        if not self.is_differencing:
            return
        ppath = self.parent_path()
        real = os.path.realpath(ppath)
        seen = self._seen + [os.path.realpath(self.path)]
        if real in seen:
            raise VhdChainLoop(self.path, "%s is its own ancestor" % ppath)
        if len(seen) >= MAX_CHAIN:
            raise VhdChainLoop(self.path, "chain deeper than %d" % MAX_CHAIN)
        if self.header.prt_uuid == fmt.NULL_UUID:
            self.parent = RawImage(ppath)
            return
        self.parent = Image(ppath, writable=False, chain=True,
                            check_parent_uuid=self._check_parent_uuid, _seen=seen)
        if self._check_parent_uuid and self.parent.footer.uuid != self.header.prt_uuid:
            raise VhdParentMismatch(self.path, "recorded parent UUID %s, %s has %s" % (
                fmt.uuid_str(self.header.prt_uuid), ppath, fmt.uuid_str(self.parent.footer.uuid)))

    def _get_parent(self):
        if not self._parent_opened:
            self._open_parent()
        return self.parent

    @property
    def depth(self):
        p = self._get_parent()
        return 1 + (p.depth if p is not None else 0)

    # --- geometry helpers -----------------------------------------------------------------

    @property
    def uuid(self):
        return self.footer.uuid

    @property
    def hidden(self):
        return self.footer.hidden

    @property
    def physical_size(self):
        """End of data + the footer (what vhd-util query -s prints)."""
        return self.eod + 512

    @property
    def max_size(self):
        if self.header is None:
            return self.virtual_size
        return self.header.max_bat_size * self.block_size

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

    # --- reading --------------------------------------------------------------------------

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

    def flush(self, sync=False):
        """Write batmap and primary footer if anything changed (tapdisk does it on pause)."""
        if not self.writable or self.fd is None:
            return
        if self._dirty_batmap:
            self.write_batmap()
        if self._dirty_footer or self.footer_source != "primary":
            self.write_footer()
        if sync:
            try:
                os.fsync(self.fd)
            except OSError as e:
                raise from_oserror(self.path, e)

    def close(self):
        try:
            if self.fd is not None and self.writable:
                self.flush()
        finally:
            if self.parent is not None:
                self.parent.close()
                self.parent = None
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<vhd.Image %s %s %d bytes>" % (self.path, fmt.TYPE_NAMES.get(self.footer.type),
                                               self.virtual_size)

    def info(self):
        p = self._get_parent()
        marker = self.batmap_hdr.marker if self.batmap_hdr is not None else 0
        return Info(path=self.path, type=fmt.TYPE_NAMES[self.footer.type],
                    virtual_size=self.virtual_size, physical_size=self.physical_size,
                    parent=p.path if p is not None else None,
                    parent_uuid=fmt.uuid_str(self.header.prt_uuid) if self.is_differencing
                    else None,
                    uuid=fmt.uuid_str(self.footer.uuid), hidden=self.footer.hidden,
                    marker=marker, depth=self.depth,
                    allocated_blocks=len(self.allocated_blocks()), max_size=self.max_size,
                    block_size=self.block_size if self.header is not None else 0)


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


def open_image(path, writable=False, chain=True, check_parent_uuid=True):
    """Open a VHD (and, with ``chain``, its ancestors read-only). Raises a VhdError subclass."""
    return Image(path, writable=writable, chain=chain, check_parent_uuid=check_parent_uuid)


def open_header(path):
    """Open only the footer and header of a VHD (read-only, no chain): virtual size, uuid,
    hidden flag, parent uuid and locators (``parent_path()``). The BAT is neither read nor
    validated, so this is safe on a leaf a tapdisk holds open read-write: tapdisk allocates
    blocks there (BAT entries, bitmaps, the footer moved to the new end) but never rewrites
    the header or the locators."""
    return Image(path, chain=False, header_only=True)


def parent_of(path):
    """The parent's absolute path as blktap resolves it (None for a non-differencing disk),
    from the header alone (see ``open_header``); the parent's uuid is not compared."""
    with open_header(path) as img:
        return img.parent_path()


def data_end_unchecked(path):
    """End of the data the BAT points at (bytes, with a footer), read without validating:
    the allocation of a leaf a tapdisk holds open, whose BAT may point past its stale footer
    (an estimate, never a basis for writing)."""
    with open_header(path) as img:
        img._load_bat()
        h = img.header
        end = h.table_offset + h.bat_bytes
        used = [e for e in img.bat if e != fmt.UNUSED]
        if used:
            end = max(end, (max(used) + img.bm_secs + img.spb) * fmt.SECTOR)
        return fmt.pad_sectors(end) + fmt.SECTOR


def open_any(path, writable=False, raw=False, chain=True):
    return RawImage(path, writable) if raw else open_image(path, writable, chain)


# --- creation -----------------------------------------------------------------------------

def _layout(size, max_size, parent=None):
    """Metadata bytes of a new dynamic/differencing VHD (everything before the first block)."""
    max_bat = fmt.blocks_for(max_size)
    h = fmt.Header.new(max_bat)
    bat_bytes = h.bat_bytes
    bm_off = fmt.TABLE_OFFSET + bat_bytes
    bm_secs = fmt.batmap_sectors(max_bat)
    meta = bytearray(bm_off + 512 + bm_secs * 512)
    meta[fmt.TABLE_OFFSET:fmt.TABLE_OFFSET + 4 * max_bat] = b"\xff" * (4 * max_bat)
    bh = fmt.BatmapHeader.new(bm_off + 512, bm_secs)
    if parent is not None:
        bh.keyhash = parent.get("keyhash", bh.keyhash)
    bh.checksum = fmt.batmap_checksum(bytes(bm_secs * 512), size)
    meta[bm_off:bm_off + 512] = bh.pack()
    return h, meta


def _is_block(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _create_file(path):
    """A new file, or an existing block device (an LV made for the VHD, as SM's
    ``vhd-util create/snapshot`` on ``/dev/VG/VHD-<uuid>``)."""
    if _is_block(path):
        try:
            return os.open(path, os.O_RDWR)
        except OSError as e:
            raise from_oserror(path, e)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise VhdError(path, "already exists")
        raise from_oserror(path, e)


def _write_new(fd, path, meta, raw_footer):
    """Metadata at 0; the footer after it (a file) or at the device's end (a block device,
    whose size must hold metadata + footer). On failure a new file is removed."""
    try:
        size, regular = _fsize(fd, path)
    except BaseException:
        os.close(fd)
        raise
    try:
        if regular:
            _pwrite(fd, path, bytes(meta) + raw_footer, 0)
        else:
            if len(meta) + 512 > size:
                raise VhdNoSpace(path, len(meta) + 512, size)
            _pwrite(fd, path, bytes(meta), 0)
            _pwrite(fd, path, raw_footer, size - 512)
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        if regular:
            os.unlink(path)
        raise
    os.close(fd)


def _check_size(path, size, max_size):
    if size <= 0 or size % fmt.SECTOR:
        raise VhdRange(path, "size %d is not a positive multiple of 512" % size)
    if max_size > fmt.MAX_SIZE:
        raise VhdRange(path, "size %d above the VHD maximum %d" % (max_size, fmt.MAX_SIZE))
    if max_size < size:
        raise VhdRange(path, "maximum size %d below size %d" % (max_size, size))


def create(path, size, max_size=None, fixed=False):
    """Create a dynamic VHD of ``size`` bytes (a fixed one with ``fixed``).

    ``max_size`` preallocates BAT and batmap for growing up to it without moving data
    (vhd-util create -S).
    """
    path = os.path.abspath(path)
    max_size = max_size or size
    _check_size(path, size, max_size)
    footer = fmt.Footer.new(size, fmt.TYPE_FIXED if fixed else fmt.TYPE_DYNAMIC)
    if fixed and _is_block(path):
        raise VhdUnsupported(path, "a fixed VHD on a block device")
    fd = _create_file(path)
    if fixed:
        try:
            os.ftruncate(fd, size)
            _pwrite(fd, path, footer.pack(), size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return path
    h, meta = _layout(size, max_size)
    raw_footer = footer.pack()
    meta[0:512] = raw_footer
    meta[512:1536] = h.pack()
    _write_new(fd, path, meta, raw_footer)
    return path


def _locator_entries(child_path, parent_path, first_offset, space=None):
    rel = fmt.relative_path(child_path, parent_path)
    out = []
    off = first_offset
    for code in (fmt.PLAT_MACX, fmt.PLAT_W2KU, fmt.PLAT_W2RU):
        data = fmt.encode_locator(code, rel)
        sp = space if space is not None else max(512, fmt.pad_sectors(len(data)))
        out.append((fmt.Locator(code, sp, len(data), 0, off), data))
        off += sp
    return out


def _mtime_vhd(path):
    try:
        return fmt.to_vhd_time(os.stat(path).st_mtime)
    except OSError as e:
        raise from_oserror(path, e)


def snapshot(path, parent_path, max_size=None, raw_parent=False, limit=None, skip_empty=False,
             size=None):
    """Create a differencing child at ``path`` whose parent is ``parent_path``.

    ``skip_empty`` links past empty differencing parents like ``vhd-util snapshot`` without
    ``-e``; ``limit`` fails (ENOSPC) when the chain would be deeper; ``raw_parent`` for ``-m``.
    Returns the absolute path of the parent actually used.
    """
    path = os.path.abspath(path)
    parent_path = os.path.abspath(parent_path)
    if not os.path.exists(parent_path):
        raise VhdMissing(parent_path, "parent does not exist")
    keyhash = None
    if raw_parent:
        with RawImage(parent_path) as rp:
            psize, puuid, depth = rp.size // 512 * 512, fmt.NULL_UUID, 1
    else:
        parent = open_image(parent_path)
        try:
            while skip_empty and parent.is_differencing and not parent.allocated_blocks():
                nxt = parent.parent
                if nxt is None or not nxt.is_vhd:
                    break
                parent.parent = None
                parent.close()
                parent = nxt
            parent_path = parent.path
            psize, puuid, depth = parent.virtual_size, parent.footer.uuid, parent.depth
            if parent.batmap_hdr is not None:
                keyhash = parent.batmap_hdr.keyhash
        finally:
            parent.close()
    if limit is not None and depth + 1 > limit:
        raise VhdChainTooDeep(path, depth + 1, limit)
    size = size or psize
    if size < psize:
        raise VhdRange(path, "child size %d smaller than parent size %d" % (size, psize))
    max_size = max_size or size
    _check_size(path, size, max_size)
    footer = fmt.Footer.new(size, fmt.TYPE_DIFF)
    h, meta = _layout(size, max_size, {"keyhash": keyhash} if keyhash else None)
    h.prt_uuid = puuid
    h.prt_ts = _mtime_vhd(parent_path)
    name = os.path.basename(parent_path)
    try:
        h.prt_name = fmt.encode_parent_name(name)
    except ValueError:
        raise VhdNameTooLong(path, "parent name %r too long" % name)
    locs = _locator_entries(path, parent_path, len(meta))
    for i, (loc, data) in enumerate(locs):
        h.loc[i] = loc
        meta += data + bytes(loc.data_space - len(data))
    meta[0:512] = footer.pack()
    meta[512:1536] = h.pack()
    _write_new(_create_file(path), path, meta, footer.pack())
    return parent_path


# --- metadata edits -----------------------------------------------------------------------

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
        name = os.path.basename(parent_path)
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


# --- one-shot helpers ---------------------------------------------------------------------

def query(path):
    """:class:`Info` about ``path`` (opens the chain)."""
    with open_image(path) as img:
        return img.info()


def read(path, offset, length):
    with open_image(path) as img:
        return img.read(offset, length)


def write(path, offset, data):
    with open_image(path, writable=True) as img:
        img.write(offset, data)


def chain_paths(path):
    """[path, parent, grandparent, ...] (absolute)."""
    out = []
    with open_image(path) as img:
        q = img
        while q is not None:
            out.append(q.path)
            q = q.parent
    return out
