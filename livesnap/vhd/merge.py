"""Merging two adjacent images: ``coalesce`` (child's data into its parent, like
``vhd-util coalesce``) and ``pull`` (the parent's data into the child where the child has none).

Write order per block: data, then bitmap, then BAT entry; batmap and footer once at the end of the
operation. A crash therefore leaves the destination readable as "old or new" for every sector, and
``check`` passes after ``repair`` (which rewrites the footer and rebuilds the batmap).
"""
import errno
import logging
import os

from livesnap.vhd import format as fmt
from livesnap.vhd.errors import VhdParentMismatch, VhdRange, VhdUnsupported, from_oserror
from livesnap.vhd.edit import set_parent
from livesnap.vhd.fileio import RawImage
from livesnap.vhd.image import Image

log = logging.getLogger(__name__)

def _src_base(src, b):
    """Byte offset in src's file of block b's sector 0 (raw files: the disk offset)."""
    if src.is_vhd:
        return (src.bat[b] + src.bm_secs) * 512
    return b * fmt.BLOCK_SIZE


def _copy(src, src_off, dst, dst_off, n):
    """Copy n bytes file to file in the kernel (sendfile; read+write where unsupported).
    Bytes beyond the end of a raw source are written as zeros."""
    try:
        os.lseek(dst.fd, dst_off, os.SEEK_SET)
        while n > 0:
            k = os.sendfile(dst.fd, src.fd, src_off, n)
            if k <= 0:
                break
            src_off += k
            dst_off += k
            n -= k
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise from_oserror(dst.path, e)
    while n > 0:
        k = min(n, 8 * 1024 * 1024)
        data = os.pread(src.fd, k, src_off) or b""
        data += bytes(k - len(data))
        os.pwrite(dst.fd, data, dst_off)
        src_off += k
        dst_off += k
        n -= k


# Data written by a merge is pushed to the disk every WRITEBACK_STEP bytes (fdatasync of
# the target's data only: its metadata is written at the end as before), so that a running
# guest's writes never queue behind the writeback of the whole merge at once (a caller
# merging beside a running guest may ask for smaller steps: ``writeback_step``).
WRITEBACK_STEP = 32 << 20


class _Writeback(object):
    def __init__(self, dst, sync, step=None):
        self.dst, self.sync, self.pending = dst, sync, 0
        self.step = step or WRITEBACK_STEP

    def wrote(self, sectors):
        if not self.sync:
            return
        self.pending += sectors * 512
        if self.pending >= self.step:
            os.fdatasync(self.dst.fd)
            self.pending = 0


def _bitmap_of(dst, runs):
    bm = bytearray(dst.bm_secs * 512)
    for s, e in runs:
        fmt.set_bits(bm, s, e)
    return bm


def _put(dst, b, runs, src):
    """Copy ``src``'s sectors ``runs`` of block b into ``dst`` (a writable VHD or raw image):
    data first, then (VHD) the bitmap, then for a new block the BAT entry."""
    sbase = _src_base(src, b)
    if not dst.is_vhd:
        for s, e in runs:
            _copy(src, sbase + s * 512, dst, b * fmt.BLOCK_SIZE + s * 512, (e - s) * 512)
        return
    if dst.bat[b] == fmt.UNUSED:
        def fill(data_off):
            for s, e in runs:
                _copy(src, sbase + s * 512, dst, data_off + s * 512, (e - s) * 512)
        dst.new_block(b, _bitmap_of(dst, runs), None, fill=fill)
        return
    dbase = (dst.bat[b] + dst.bm_secs) * 512
    for s, e in runs:
        _copy(src, sbase + s * 512, dst, dbase + s * 512, (e - s) * 512)
    dst.merge_bitmap(b, _bitmap_of(dst, runs))


def _open_pair(child_path, child_writable):
    child = Image(child_path, writable=child_writable, chain=False)
    try:
        if not child.is_differencing:
            raise VhdUnsupported(child.path, "coalescing of non-differencing disks is not "
                                 "supported")
        ppath = child.parent_path()
        if child.header.prt_uuid == fmt.NULL_UUID:
            parent = RawImage(ppath, writable=not child_writable)
        else:
            parent = Image(ppath, writable=not child_writable, chain=False)
            if parent.footer.uuid != child.header.prt_uuid:
                parent.close()
                raise VhdParentMismatch(child.path, "recorded parent UUID %s, %s has %s" % (
                    fmt.uuid_str(child.header.prt_uuid), ppath,
                    fmt.uuid_str(parent.footer.uuid)))
    except BaseException:
        child.close()
        raise
    return child, parent


def coalesce(child_path, progress=None, sync=True, writeback_step=None):
    """Copy the child's own sectors into its immediate parent; returns the sectors copied.
    ``writeback_step``: bytes between two pushes of the data to the disk (WRITEBACK_STEP).

    Whole blocks where the batmap says full, runs of set bitmap bits otherwise. The child is not
    modified. The child must not be bigger than the parent (VhdRange, ERANGE).
    """
    child, parent = _open_pair(child_path, child_writable=False)
    total = 0
    try:
        if child.virtual_size > parent.virtual_size:
            raise VhdRange(child.path, "error coalescing: -34: child (%d bytes) bigger than "
                           "parent %s (%d bytes)" % (child.virtual_size, parent.path,
                                                    parent.virtual_size))
        blocks = sorted(child.allocated_blocks(), key=lambda b: child.bat[b])
        wb = _Writeback(parent, sync, writeback_step)
        for i, b in enumerate(blocks):
            runs = [(s, e) for s, e, on in child.block_runs(b) if on]
            if runs:
                _put(parent, b, runs, child)
                total += sum(e - s for s, e in runs)
                wb.wrote(sum(e - s for s, e in runs))
            if progress is not None:
                progress(i + 1, len(blocks))
        parent.flush(sync=sync)
    finally:
        try:
            parent.close()
        finally:
            child.close()
    log.debug("coalesced %d sectors of %s", total, child_path)
    return total


def pull(child_path, reparent=False, progress=None, sync=True, writeback_step=None):
    """Copy the parent's own sectors into the child wherever the child has none
    (``writeback_step``: as for ``coalesce``).

    The child then reads the same as before without needing the parent's data; with
    ``reparent`` it is pointed at the grandparent (or made a dynamic disk when the parent was the
    base) afterwards. Returns the sectors copied.
    """
    child, parent = _open_pair(child_path, child_writable=True)
    total = 0
    grand = None
    try:
        if parent.is_vhd:
            if parent.is_differencing:
                grand = (parent.parent_path(), parent.header.prt_uuid == fmt.NULL_UUID)
            pblocks = [b for b in parent.allocated_blocks() if b < child.nblocks]
            pblocks.sort(key=lambda b: parent.bat[b])
        else:
            pblocks = list(range(min(child.nblocks, fmt.blocks_for(parent.size))))
        wb = _Writeback(child, sync, writeback_step)
        for i, b in enumerate(pblocks):
            nsec = min(child.spb, (min(child.virtual_size, parent.virtual_size)
                                   - b * child.block_size) // 512)
            if parent.is_vhd:
                pruns = [(s, min(e, nsec)) for s, e, on in parent.block_runs(b) if on and s < nsec]
            else:
                pruns = [(0, nsec)]
            if child.bat[b] == fmt.UNUSED:
                need = pruns
            elif child.is_full(b):
                need = []
            else:
                cbm = child.bitmap(b)
                need = [(x, y) for s, e in pruns for x, y, on in fmt.runs(cbm, s, e) if not on]
            if need:
                _put(child, b, need, parent)
                total += sum(e - s for s, e in need)
                wb.wrote(sum(e - s for s, e in need))
            if progress is not None:
                progress(i + 1, len(pblocks))
        child.flush(sync=sync)
    finally:
        try:
            parent.close()
        finally:
            child.close()
    if reparent:
        if grand is None:
            set_parent(child_path, None)
        else:
            set_parent(child_path, grand[0], raw=grand[1])
    log.debug("pulled %d sectors into %s", total, child_path)
    return total
