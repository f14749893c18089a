"""A blktap-exact VHD engine in pure Python (3.6, stdlib only): format only, no snapshots.

Files written here are what blktap's libvhd/tapdisk write (layout, checksums, batmap, locators,
block placement; see ../shared/VHD-FORMAT.md) and pass ``vhd-util check``.

Public API (sizes and offsets in bytes; paths may be relative)::

    open_image(path, writable=False, chain=True, check_parent_uuid=True) -> Image
        Image.read(offset, length) -> bytes        chain-resolved, any alignment
        Image.write(offset, data)                  into this image, any alignment
        Image.flush(sync=False)                    batmap + primary footer (tapdisk: on pause)
        Image.close() / with-statement             flush + close the chain
        Image.info() -> Info                       as query()
        Image.sector_map() -> [(offset, length)]   sectors this image itself holds
        Image.allocated_blocks() -> [block index]
        Image.virtual_size, .physical_size, .hidden, .uuid (bytes), .parent (Image/None),
        .depth, .is_differencing, .path
    create(path, size, max_size=None, fixed=False) -> path
    snapshot(path, parent_path, max_size=None, raw_parent=False, limit=None,
             skip_empty=False, size=None) -> parent path used
    set_parent(path, parent_path_or_None, raw=False) -> parent path
    set_hidden(path, value);  set_marker(path, value)
    grow(path, new_size, fast_only=False)
    open_header(path) -> Image                     footer + header only: safe on an open leaf
    parent_of(path) -> parent path or None         from the header (locators) alone
    data_end_unchecked(path) -> bytes              BAT's end of data, unvalidated (estimate)
    data_unchecked(path) -> bytes                  allocated blocks' bytes, unvalidated
    query(path) -> Info(path, type, virtual_size, physical_size, parent, parent_uuid, uuid,
                        hidden, marker, depth, allocated_blocks, max_size, block_size)
    read(path, offset, length) -> bytes;  write(path, offset, data)
    chain_paths(path) -> [path, parent, ...]
    check(path, ignore_missing_footer=False, ignore_parent_uuid=False, ignore_time=False,
          skip_bat_overlap=False, parents=False, bitmaps=False) -> [problem, ...]
    repair(path, use_backup=False)
    coalesce(child_path, progress=None, sync=True, writeback_step=None) -> sectors copied
    pull(child_path, reparent=False, progress=None, sync=True, writeback_step=None) -> sectors

A tapdisk stand-in keeps one writable ``Image`` open: it caches BAT, bitmaps and batmap, writes
data -> bitmap -> BAT entry, and writes batmap + footer only on ``flush``/``close`` (so, as with
tapdisk, ``check`` fails on an image that is open for writing; ``repair`` fixes it after a crash).

Errors are :class:`VhdError` subclasses (``livesnap.errors.BadImage``) with an ``errno``
attribute; see :mod:`livesnap.vhd.errors`.
"""
from livesnap.vhd.check import check, repair
from livesnap.vhd.errors import (VhdChainLoop, VhdChainTooDeep, VhdCorrupt, VhdError,
                                 VhdIOError, VhdMissing, VhdNameTooLong, VhdNoSpace,
                                 VhdParentMismatch, VhdRange, VhdUnsupported)
from livesnap.vhd.create import create, snapshot
from livesnap.vhd.edit import grow, set_hidden, set_marker, set_parent
from livesnap.vhd.fileio import RawImage
from livesnap.vhd.image import (Image, Info, chain_paths, data_end_unchecked, data_unchecked,
                                open_header, open_image, parent_of, query, read, write)
from livesnap.vhd.merge import coalesce, pull

__all__ = [
    "open_image", "open_header", "parent_of", "data_end_unchecked", "data_unchecked", "Image",
    "create",
    "snapshot", "read", "write", "query", "Info", "set_parent",
    "set_hidden", "set_marker", "grow", "check", "repair", "coalesce", "pull", "chain_paths",
    "RawImage", "VhdError", "VhdCorrupt", "VhdMissing", "VhdUnsupported", "VhdRange",
    "VhdParentMismatch", "VhdChainLoop", "VhdNameTooLong", "VhdIOError", "VhdChainTooDeep",
    "VhdNoSpace",
]
