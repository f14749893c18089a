"""Errors of the VHD engine. Each carries ``errno``, the positive exit code vhd-util would use.

Tree (under ``livesnap.errors``)::

    BadImage
     +-- VhdError                 errno EINVAL: anything wrong with a VHD or a request on it
          +-- VhdCorrupt          the file does not follow the format (fuzzed, truncated, torn)
          +-- VhdMissing          errno ENOENT: the file or a parent in the chain does not exist
          +-- VhdUnsupported      a valid file this operation cannot handle (fixed disk, shrink)
          +-- VhdRange            errno ERANGE: offset / size out of range, child bigger than parent
          +-- VhdParentMismatch   the recorded parent UUID is not the parent's footer UUID
          +-- VhdChainLoop        errno ELOOP: the parent locators form a cycle
          +-- VhdNameTooLong      errno ENAMETOOLONG: a parent path does not fit its locator
          +-- VhdIOError          errno from the OS: read/write/open failed
          +-- VhdChainTooDeep     errno ENOSPC (as vhd-util snapshot -l); also a ChainTooDeep
          +-- VhdNoSpace          errno ENOSPC: a VHD on a block device (an LV) is full
"""
import errno as _errno

from livesnap.errors import BadImage, ChainTooDeep


class VhdError(BadImage):
    fields = ("path", "reason")
    msg = "{self.path}: {self.reason}"
    errno = _errno.EINVAL


class VhdCorrupt(VhdError):
    msg = "corrupt VHD {self.path}: {self.reason}"


class VhdMissing(VhdError):
    msg = "{self.path}: {self.reason}"
    errno = _errno.ENOENT


class VhdUnsupported(VhdError):
    msg = "{self.path}: not supported: {self.reason}"


class VhdRange(VhdError):
    errno = _errno.ERANGE


class VhdParentMismatch(VhdError):
    msg = "{self.path}: parent mismatch: {self.reason}"


class VhdChainLoop(VhdError):
    msg = "{self.path}: parent chain loops: {self.reason}"
    errno = _errno.ELOOP


class VhdNameTooLong(VhdError):
    errno = _errno.ENAMETOOLONG


class VhdIOError(VhdError):
    fields = ("path", "reason", "errno")
    msg = "{self.path}: I/O error: {self.reason}"
    errno = _errno.EIO


class VhdChainTooDeep(ChainTooDeep, VhdError):
    fields = ("path", "depth", "limit")
    msg = "backing chain of {self.path} would be {self.depth} deep (limit {self.limit})"
    errno = _errno.ENOSPC


class VhdNoSpace(VhdError):
    """No room before the footer of a VHD on a block device: its footer stays at the
    device's end, data cannot grow past it (the LV must be inflated first)."""
    fields = ("path", "needed", "available")
    msg = "{self.path}: no space on the device: {self.needed} bytes needed, {self.available} " \
          "available before the footer (inflate the LV)"
    errno = _errno.ENOSPC


def from_oserror(path, e):
    """An OSError as the matching typed error (ENOENT -> VhdMissing, else VhdIOError)."""
    code = getattr(e, "errno", None) or _errno.EIO
    if code == _errno.ENOENT:
        return VhdMissing(path, e.strerror or str(e))
    return VhdIOError(path, e.strerror or str(e), code)
