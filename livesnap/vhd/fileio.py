"""Byte I/O on an image file or device (pread/pwrite that finish or raise a VhdError, the
size of a file or block device), :class:`Handle` (what every open image shares: its fd closed
by ``close`` and by ``with``) and :class:`RawImage`, a raw file read as a VHD's parent."""
import os
import stat

from livesnap.vhd.errors import from_oserror


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


class Handle(object):
    """An open image file: ``close`` closes its ``fd`` (once); ``with`` closes the handle."""
    fd = None

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RawImage(Handle):
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
