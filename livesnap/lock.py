"""One livesnap command per domain at a time: an exclusive, non-blocking flock."""
import errno
import fcntl
import os

from livesnap.errors import Busy, StateDirUnusable


class DomainLock(object):
    def __init__(self, path, domain):
        self.path = path
        self.domain = domain
        self.fd = None

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:                      # read-only, no permission, /proc/self
            raise StateDirUnusable(os.path.dirname(self.path) or ".", "cannot open the lock "
                                   "%s: %s" % (os.path.basename(self.path), e.strerror or e))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (IOError, OSError) as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise Busy(self.domain, self.path)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, ("%d\n" % os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        return False
