"""Files livesnap deletes, truncates or creates in an image directory: only its own.

livesnap runs as root in directories others may write to (a storage pool). A name there --
an image merged away, a trash name (``datapaths.trash``), a leftover of a crashed attempt
-- may have been replaced by anything: a symbolic link to a file elsewhere, a hard link to
one, a FIFO, a device node, a directory, a file of another user. So a file is deleted or
truncated only when it is, at that moment, a file livesnap could have made:

* its directory is opened once (a directory descriptor) and the name is looked at, opened
  and unlinked relative to it, never following a link at the last component (``lstat``,
  ``O_NOFOLLOW``) and never blocking on open (``O_NONBLOCK``: a FIFO);
* it is a regular file (``S_ISREG``, of ``lstat`` before the open and of ``fstat`` of the
  descriptor after it, the same inode both times), with one link (``st_nlink == 1``: no
  hard link to a file elsewhere), on its directory's device (nothing mounted over it),
  owned by this process's user or by the directory's owner;
* the directory opened is the one preflight saw (``pin``: its device and inode, recorded
  when the engine validated the tree), and, when storage directories are set
  (``--storage-dir``; ``set_roots``), lies inside one: a directory component swapped for
  a link after preflight is caught here.

Anything else raises ``NotOurFile``; callers that free images log it as a warning and leave
the name alone (the image is gone from the catalog; what is at its name is not livesnap's).
New files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 (``create``).

A directory component that is a link is followed when the directory is opened (pool
directories are links on many hosts); only the storage directories bound it.
"""
import errno
import os
import stat

from livesnap.errors import NotOurFile

_roots = []
_pinned = {}


def set_roots(dirs):
    """The storage directories (real paths) every directory opened must lie inside; empty:
    no bound (no ``--storage-dir``). Forgets the directories pinned so far (a new command)."""
    _roots[:] = [os.path.realpath(d) for d in dirs or ()]
    _pinned.clear()


def pin(directories):
    """Record what each directory is now (preflight): a later open of the same path must
    reach the same directory."""
    for d in directories:
        try:
            st = os.stat(d)
        except OSError:
            continue
        _pinned[os.path.abspath(d)] = (st.st_dev, st.st_ino)


def _open_dir(path):
    """(directory descriptor, name) for ``path``."""
    directory, name = os.path.split(os.path.abspath(path))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    want = _pinned.get(directory)
    if want is not None:
        st = os.fstat(dfd)
        if (st.st_dev, st.st_ino) != want:
            os.close(dfd)
            raise NotOurFile(path, "its directory %s is not the one preflight saw (a link "
                             "planted since?)" % directory)
    if _roots:
        try:
            real = os.readlink("/proc/self/fd/%d" % dfd)
        except OSError:
            real = os.path.realpath(directory)
        if not any(real == d or real.startswith(d + os.sep) for d in _roots):
            os.close(dfd)
            raise NotOurFile(path, "its directory is %s, outside the storage directory %s"
                             % (real, ":".join(_roots)))
    return dfd, name


def _kind(st):
    mode = st.st_mode
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _vet(path, st, dst):
    """Raise NotOurFile unless ``st`` (of a file in the directory of ``dst``) is ours."""
    if not stat.S_ISREG(st.st_mode):
        raise NotOurFile(path, _kind(st))
    if st.st_nlink != 1:
        raise NotOurFile(path, "it has %d hard links" % st.st_nlink)
    if st.st_dev != dst.st_dev:
        raise NotOurFile(path, "it is on another device than its directory")
    if st.st_uid not in (os.geteuid(), dst.st_uid):
        raise NotOurFile(path, "it is owned by uid %d" % st.st_uid)


def _look(path):
    """(directory descriptor, name, ``lstat`` of the name, ``fstat`` of the directory) of
    ``path``, the name vetted (``_vet``: NotOurFile); None when the directory or the name is
    gone. The caller closes the descriptor."""
    try:
        dfd, name = _open_dir(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    try:
        dst = os.fstat(dfd)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            st = None
        if st is not None:
            _vet(path, st, dst)
    except BaseException:
        os.close(dfd)
        raise
    if st is None:
        os.close(dfd)
        return None
    return dfd, name, st, dst


def inspect(path):
    """Check ``path`` by name (``lstat``) without opening it: True when it is ours, False
    when it is gone; NotOurFile otherwise."""
    found = _look(path)
    if found is None:
        return False
    os.close(found[0])
    return True


class OwnFile(object):
    """An open file that passed the checks: ``fd``, ``dir_fd``, ``name``, ``st``."""

    def __init__(self, path, fd, dir_fd, name, st):
        self.path, self.fd, self.dir_fd, self.name, self.st = path, fd, dir_fd, name, st

    def _same(self):
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return (st.st_dev, st.st_ino) == (self.st.st_dev, self.st.st_ino)

    def unlink(self):
        """Remove the name, if it still names this file (a swap since the open: the name is
        left, NotOurFile)."""
        if not self._same():
            raise NotOurFile(self.path, "the name was replaced while it was open")
        os.unlink(self.name, dir_fd=self.dir_fd)

    def rename(self, new_name):
        """Rename within the directory (``new_name``: a name, no directory)."""
        if not self._same():
            raise NotOurFile(self.path, "the name was replaced while it was open")
        os.rename(self.name, new_name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)

    def close(self):
        for fd in (self.fd, self.dir_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_own(path, flags=os.O_RDONLY):
    """Open ``path`` as described above: an ``OwnFile``, None when it is gone, NotOurFile when
    it is not livesnap's to change."""
    found = _look(path)                      # no open at all of a device, FIFO or link
    if found is None:
        return None
    dfd, name, before, dst = found
    try:
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY |
                         os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ENOENT:
                os.close(dfd)
                return None
            if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise NotOurFile(path, "it changed into something else (%s)"
                                 % os.strerror(e.errno))
            raise
        try:
            st = os.fstat(fd)
            _vet(path, st, dst)
            if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
                raise NotOurFile(path, "it was replaced while it was opened")
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        try:
            os.close(dfd)
        except OSError:
            pass
        raise
    return OwnFile(path, fd, dfd, name, st)


def remove(path):
    """Unlink ``path`` if it is ours: True, False when it is gone, NotOurFile otherwise."""
    f = open_own(path)
    if f is None:
        return False
    with f:
        try:
            f.unlink()
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
    return True


def create(path, mode=0o600):
    """Create ``path`` as a new empty regular file of ``mode`` (at most: the umask narrows
    it), never through a link; FileExistsError when the name is taken."""
    dfd, name = _open_dir(path)
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode & 0o600, dir_fd=dfd)
        os.close(fd)
    finally:
        os.close(dfd)
