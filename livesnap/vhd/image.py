"""Open VHD images (dynamic, differencing, fixed) and their chain; read, write, query.

An :class:`Image` is a handle that caches the BAT, the sector bitmaps and the batmap the way tapdisk
does: writes go to the data, then the bitmap, then the BAT entry; the batmap and the primary footer
are written by :meth:`Image.flush` / :meth:`Image.close` only (tapdisk writes them on pause/close).
A crash while a handle is open therefore leaves a file that ``repair`` fixes (no primary footer),
never one whose BAT points at unwritten data.

What an ``Image`` does is split by concern: :mod:`.ondisk` (footer, header, BAT, batmap read
and written), :mod:`.blocks` (bitmaps, allocation), :mod:`.sectors` (the read and write path);
this module holds the handle itself (open, chain, flush, close). New images: :mod:`.create`;
metadata edits (reparent, hide, grow): :mod:`.edit`; merges: :mod:`.merge`; checks:
:mod:`.check`.
"""
import collections
import os
import struct

from livesnap.vhd import format as fmt
from livesnap.vhd import paths
from livesnap.vhd.blocks import Blocks
from livesnap.vhd.errors import (VhdChainLoop, VhdCorrupt, VhdMissing, VhdParentMismatch,
                                 from_oserror)
from livesnap.vhd.fileio import Handle, RawImage, _pread
from livesnap.vhd.ondisk import OnDisk
from livesnap.vhd.sectors import Sectors

MAX_CHAIN = 256                    # a chain deeper than this is treated as corrupt (or a loop)
MAX_LOCATOR_BYTES = 64 * 1024

Info = collections.namedtuple("Info", [
    "path", "type", "virtual_size", "physical_size", "parent", "parent_uuid", "uuid", "hidden",
    "marker", "depth", "allocated_blocks", "max_size", "block_size"])
Info.__doc__ = """What ``query`` tells about one image (sizes in bytes, parent = absolute path)."""


class Image(Handle, OnDisk, Blocks, Sectors):
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
        as libvhd does: see paths.resolve), whether they exist or not."""
        return [paths.resolve(self.path, text) for _, _, text in self.parent_locators()]

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
            Handle.close(self)

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


def data_unchecked(path):
    """Bytes of the blocks the BAT says are allocated, read without validating: what a
    merge of a leaf a tapdisk holds open would copy (an estimate, never a basis for
    writing)."""
    with open_header(path) as img:
        img._load_bat()
        return sum(1 for e in img.bat if e != fmt.UNUSED) * img.block_size


def open_any(path, writable=False, raw=False, chain=True):
    return RawImage(path, writable) if raw else open_image(path, writable, chain)



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
