"""New VHDs: ``create`` (dynamic or fixed) and ``snapshot`` (a differencing child), laid out
as blktap's libvhd lays them out, as a file or on an existing block device (an LV)."""
import errno
import os
import stat

from livesnap.vhd import format as fmt
from livesnap.vhd import paths
from livesnap.vhd.errors import (VhdChainTooDeep, VhdError, VhdMissing, VhdNameTooLong, VhdNoSpace,
                                 VhdRange, VhdUnsupported, from_oserror)
from livesnap.vhd.fileio import RawImage, _fsize, _pwrite
from livesnap.vhd.image import open_image


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
    name = paths.parent_name(parent_path)
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
