"""``check`` (everything vhd-util's check finds, plus a few things it does not) and ``repair``."""
import os
import struct

from livesnap.vhd import format as fmt
from livesnap.vhd import paths
from livesnap.vhd.errors import VhdCorrupt, VhdError, from_oserror
from livesnap.vhd.image import Image
from livesnap.vhd.ondisk import footer_problem

TIME_SLACK = 300


def footer_errors(raw, ignore_time=False):
    """Problems of one footer copy, as vhd-util's check lists them."""
    p = footer_problem(raw)
    if p:
        return [p]
    f = fmt.Footer.unpack(raw)
    out = []
    if not f.features & fmt.FEATURE_RESERVED:
        out.append("features lack the reserved bit 0x2")
    if f.features & ~(fmt.FEATURE_RESERVED | fmt.FEATURE_TEMPORARY):
        out.append("unknown features %#x" % f.features)
    if f.ff_version != fmt.FF_VERSION:
        out.append("file format version %#x" % f.ff_version)
    if not ignore_time and f.timestamp > fmt.now_vhd() + TIME_SLACK:
        out.append("timestamp in the future")
    if f.crtr_app[:3] == b"tap" and (f.crtr_ver > fmt.CREATOR_VERSION
                                     or f.crtr_ver == fmt.version(0, 1)):
        out.append("unsupported tap creator version %#x" % f.crtr_ver)
    if fmt.geometry_sectors(f.geometry) > f.curr_size // fmt.SECTOR:
        out.append("geometry larger than the disk")
    if f.type not in (fmt.TYPE_FIXED, fmt.TYPE_DYNAMIC, fmt.TYPE_DIFF):
        out.append("invalid disk type %d" % f.type)
    if f.saved not in (0, 1):
        out.append("saved state %d" % f.saved)
    if f.hidden not in (0, 1):
        out.append("hidden %d" % f.hidden)
    if any(f.reserved):
        out.append("reserved bytes not zero")
    if f.uuid == fmt.NULL_UUID:
        out.append("null UUID")
    if f.curr_size % fmt.SECTOR or f.curr_size > fmt.MAX_SIZE:
        out.append("bad virtual size %d" % f.curr_size)
    if f.type in (fmt.TYPE_DYNAMIC, fmt.TYPE_DIFF) and f.data_offset != fmt.HEADER_OFFSET:
        out.append("data offset %d" % f.data_offset)
    return out


class _Checker(object):
    def __init__(self, path, opts):
        self.path = os.path.abspath(path)
        self.o = opts
        self.problems = []

    def bad(self, text):
        self.problems.append(text)

    def pread(self, n, off):
        data = os.pread(self.fd, n, off)
        if len(data) != n:
            raise VhdCorrupt(self.path, "read of %d bytes at %d beyond end of file" % (n, off))
        return data

    def run(self):
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise from_oserror(self.path, e)
        try:
            self._run()
        except VhdError as e:
            self.bad(str(e))
        except (struct.error, ValueError, OverflowError, IndexError, UnicodeError,
                MemoryError) as e:
            self.bad("unreadable metadata (%s)" % e)
        finally:
            os.close(self.fd)
        return self.problems

    def _run(self):
        size = os.lseek(self.fd, 0, os.SEEK_END)       # a file or a block device (an LV)
        if size < 512:
            self.bad("file too small (%d bytes)" % size)
            return
        primary = self.pread(512, size - 512)
        perr = footer_errors(primary, self.o["ignore_time"])
        footer_off = size - 512
        footer_raw = primary
        if perr:
            backup = self.pread(512, 0)
            if not self.o["ignore_missing_footer"] or footer_errors(backup, True):
                self.bad("primary footer invalid: %s" % "; ".join(perr))
            if footer_errors(backup, True):
                return
            footer_raw = backup
            footer_off = size
        f = fmt.Footer.unpack(footer_raw)
        if f.type == fmt.TYPE_FIXED:
            return
        backup = self.pread(512, 0)
        if not perr and backup != primary:
            berr = footer_errors(backup, True)
            self.bad("backup footer invalid: %s" % "; ".join(berr) if berr
                     else "primary and backup footers differ")
        h = fmt.Header.unpack(self.pread(1024, f.data_offset))
        self.header = h
        if h.cookie != fmt.HEADER_COOKIE:
            self.bad("bad header cookie %r" % h.cookie)
            return
        if h.computed_checksum() != h.checksum:
            self.bad("bad header checksum")
            return
        if h.hdr_ver != fmt.HEADER_VERSION:
            self.bad("header version %#x" % h.hdr_ver)
        if h.data_offset != fmt.ALL_ONES64:
            self.bad("header data offset %#x is not all ones" % h.data_offset)
        bs = h.block_size
        if bs == 0 or bs & (bs - 1) or bs > fmt.MAX_BLOCK_SIZE or bs < 4096:
            self.bad("bad block size %d" % bs)
            return
        if h.res1 or any(h.res2):
            self.bad("header reserved fields not zero")
        if h.table_offset % fmt.SECTOR or h.table_offset + h.bat_bytes > size:
            self.bad("BAT (offset %d, %d bytes) outside the file" % (h.table_offset, h.bat_bytes))
            return
        nblocks = fmt.blocks_for(f.curr_size, bs)
        if h.max_bat_size < nblocks:
            self.bad("BAT has %d entries, the disk needs %d" % (h.max_bat_size, nblocks))
            return
        if f.type == fmt.TYPE_DYNAMIC:
            if h.prt_uuid != fmt.NULL_UUID or any(h.prt_name) or h.prt_ts or \
                    any(l.code or l.data_offset or l.data_len or l.data_space for l in h.loc):
                self.bad("dynamic disk has parent fields")
        raw_bat = self.pread(4 * nblocks, h.table_offset)
        bat = struct.unpack(">%dI" % nblocks, raw_bat)
        spb = bs // 512
        bm_secs = fmt.secs_round_up_no_zero(spb // 8)
        meta_end = max(f.data_offset + 1024, h.table_offset + h.bat_bytes)
        batmap = self._check_batmap(f, h, bat, size, nblocks)
        if batmap is not None:
            meta_end = max(meta_end, batmap)
        if f.type == fmt.TYPE_DIFF:
            meta_end = max(meta_end, self._check_locators(h, size))
        meta_end = fmt.pad_sectors(meta_end)
        blk_bytes = (bm_secs + spb) * 512
        used = []
        for b, e in enumerate(bat):
            if e == fmt.UNUSED:
                continue
            if e * 512 < meta_end:
                self.bad("BAT entry %d (sector %d) inside the metadata (ends at %d)"
                         % (b, e, meta_end))
            elif e * 512 + blk_bytes > footer_off:
                self.bad("block %d (sector %d) extends past the footer" % (b, e))
            else:
                used.append((e, b))
        if not self.o["skip_bat_overlap"]:
            used.sort()
            for (a, ba), (c, bc) in zip(used, used[1:]):
                if (c - a) * 512 < blk_bytes:
                    self.bad("blocks %d and %d overlap" % (ba, bc))
        if self.o["bitmaps"]:
            for e, b in used:
                bm = self.pread(bm_secs * 512, e * 512)
                nsec = min(spb, (f.curr_size - b * bs) // 512)
                for s, t, on in fmt.runs(bm, 0, nsec):
                    if not on and any(self.pread((t - s) * 512, (e + bm_secs + s) * 512)):
                        self.bad("block %d: data under clear bitmap bits %d-%d not zero"
                                 % (b, s, t - 1))
        if self.o["stats"]:
            self.stats = {"blocks": nblocks, "allocated": len(used)}

    def _check_batmap(self, f, h, bat, size, nblocks):
        if not (f.crtr_app[:3] == b"tap" and f.crtr_ver >= fmt.version(1, 2)):
            return None
        off = h.table_offset + h.bat_bytes
        if off + 512 > size:
            self.bad("batmap header outside the file")
            return None
        bh = fmt.BatmapHeader.unpack(self.pread(512, off))
        if bh.cookie != fmt.BATMAP_COOKIE:
            self.bad("bad batmap cookie %r" % bh.cookie)
            return off + 512
        if bh.batmap_version > fmt.BATMAP_VERSION:
            self.bad("batmap version %#x" % bh.batmap_version)
        if bh.batmap_size * 512 * 8 < h.max_bat_size or bh.batmap_size > (1 << 20):
            self.bad("batmap (%d sectors) does not cover the BAT" % bh.batmap_size)
            return off + 512
        end = bh.batmap_offset + bh.batmap_size * 512
        if bh.batmap_offset < off + 512 or bh.batmap_offset % 512 or end > size:
            self.bad("batmap (offset %d) outside the file" % bh.batmap_offset)
            return off + 512
        m = self.pread(bh.batmap_size * 512, bh.batmap_offset)
        if fmt.batmap_checksum(m, f.curr_size, bh.batmap_version) != bh.checksum:
            self.bad("bad batmap checksum")
        for b in range(nblocks):
            if fmt.test_bit(m, b) and bat[b] == fmt.UNUSED:
                self.bad("batmap marks unallocated block %d full" % b)
                break
        return end

    def _check_locators(self, h, size):
        end = 0
        codes = set()
        resolved = None
        name = h.parent_name
        for i, l in enumerate(h.loc):
            if l.code == fmt.PLAT_NONE:
                continue
            if l.code not in fmt.KNOWN_PLATFORMS:
                self.bad("locator %d: unknown code %#x" % (i, l.code))
                continue
            if l.code in codes:
                self.bad("locator %d: duplicate code %s" % (i, fmt.code_name(l.code)))
            codes.add(l.code)
            if not l.data_offset or not l.data_space or not l.data_len:
                self.bad("locator %d: zero offset, space or length" % i)
                continue
            if l.data_len > l.space_bytes() or l.data_offset + l.space_bytes() > size \
                    or l.data_offset % 512 or l.data_len > 65536:
                self.bad("locator %d outside the file or its space" % i)
                continue
            end = max(end, l.data_offset + l.space_bytes())
            try:
                text = fmt.decode_locator(l.code, self.pread(l.data_len, l.data_offset))
            except UnicodeError:
                self.bad("locator %d: undecodable" % i)
                continue
            if text is None:
                continue
            if os.path.basename(text) != name:
                self.bad("locator %d (%s) names %r, header names %r"
                         % (i, fmt.code_name(l.code), text, name))
            cand = paths.resolve(self.path, text)
            if l.code == fmt.PLAT_MACX and not os.path.exists(cand):
                self.bad("parent %s (locator %d) does not exist" % (cand, i))
            elif resolved is None and os.access(cand, os.R_OK):
                resolved = os.path.normpath(cand)
        if not codes:
            self.bad("differencing disk without parent locators")
        self.parent = resolved
        if resolved is not None and h.prt_uuid != fmt.NULL_UUID \
                and not self.o["ignore_parent_uuid"]:
            try:
                with Image(resolved, chain=False) as p:
                    if p.footer.uuid != h.prt_uuid:
                        self.bad("parent UUID %s != %s's UUID %s" % (
                            fmt.uuid_str(h.prt_uuid), resolved, fmt.uuid_str(p.footer.uuid)))
            except VhdError as e:
                self.bad("parent %s unusable: %s" % (resolved, e))
        return end


def check(path, ignore_missing_footer=False, ignore_parent_uuid=False, ignore_time=False,
          skip_bat_overlap=False, parents=False, bitmaps=False):
    """Problems found in ``path`` (empty list: valid). Never writes.

    Flags as ``vhd-util check``: -i, -I, -t, -B, -p, -b.
    """
    opts = dict(ignore_missing_footer=ignore_missing_footer,
                ignore_parent_uuid=ignore_parent_uuid, ignore_time=ignore_time,
                skip_bat_overlap=skip_bat_overlap, bitmaps=bitmaps, stats=False)
    problems = []
    seen = set()
    while path is not None:
        real = os.path.realpath(path)
        if real in seen:
            problems.append("%s: parent chain loops" % path)
            break
        seen.add(real)
        c = _Checker(path, opts)
        c.parent = None
        mine = c.run()
        problems.extend(mine if not seen or len(seen) == 1 else
                        ["%s: %s" % (path, p) for p in mine])
        if not parents or mine:
            break
        path = c.parent
    return problems


def footer_copies_problem(path):
    """What ``vhd-util check`` says of the two footer copies of ``path`` and libvhd's open
    passes over in silence (it reads the backup at 0 when the primary is unusable): a primary
    footer that is there (its cookie at the end) but damaged (its checksum), or, on a
    dynamic or differencing disk whose primary is sound, a damaged or missing backup copy.
    None when neither. A primary that is absent altogether (no cookie: the state of a leaf
    tapdisk holds open) is not this function's to judge."""
    path = os.path.abspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise from_oserror(path, e)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < 1024:
            return None
        primary = os.pread(fd, 512, size - 512)
        backup = os.pread(fd, 512, 0)
    except OSError as e:
        raise from_oserror(path, e)
    finally:
        os.close(fd)
    if primary[:8] == fmt.FOOTER_COOKIE:
        perr = footer_problem(primary)
        if perr:
            return ("primary footer invalid (%s); libvhd would read the backup copy instead "
                    "and vhd-util check fails: repair it first (vhd-util repair -n %s)"
                    % (perr, path))
        if fmt.Footer.unpack(primary).type == fmt.TYPE_FIXED:
            return None                        # its offset 0 holds data, not a copy
        if backup[:8] == fmt.FOOTER_COOKIE or backup[:8] == fmt.POISON_COOKIE:
            berr = footer_problem(backup)
            if berr:
                return ("backup footer invalid (%s) and vhd-util check fails: repair it first "
                        "(vhd-util repair -n %s)" % (berr, path))
        elif backup != primary:
            return ("backup footer invalid (no footer at offset 0) and vhd-util check fails: "
                    "repair it first (vhd-util repair -n %s)" % path)
    return None


def repair(path, use_backup=False):
    """Rewrite the footer like ``vhd-util repair``: take the primary footer (or the 511-byte
    short one, or the backup at 0; ``use_backup`` forces the backup), give it a UUID if null,
    write it at end of data, truncate after it, rewrite the backup. Also rebuilds a batmap whose
    checksum a crash left wrong. Raises VhdCorrupt when no footer copy is usable."""
    path = os.path.abspath(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        raise from_oserror(path, e)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        cands = [] if use_backup else [(size - 512, 512), (size - 511, 511)]
        cands.append((0, 512))
        footer = None
        for off, n in cands:
            if off < 0:
                continue
            raw = os.pread(fd, n, off)
            if len(raw) == n and footer_problem(raw) is None:
                footer = fmt.Footer.unpack(raw)
                break
        if footer is None:
            raise VhdCorrupt(path, "no usable footer copy to repair from")
        if footer.uuid == fmt.NULL_UUID:
            footer.uuid = fmt.new_uuid()
        if footer.type == fmt.TYPE_FIXED:
            os.pwrite(fd, footer.pack(), footer.curr_size)
            os.ftruncate(fd, footer.curr_size + 512)
            return
        os.pwrite(fd, footer.pack(), 0)
    except OSError as e:
        raise from_oserror(path, e)
    finally:
        os.close(fd)
    img = Image(path, writable=True, chain=False, _footer=footer)
    try:
        img.footer = footer
        img.write_footer(backup=True)
    finally:
        img.close()
