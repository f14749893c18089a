"""Putting a file into a system directory (hooks, plugins, systemd units) and taking it
away."""
import os


def install_executable(directory, name, text, mode=0o755):
    """Write ``text`` to ``directory/name`` with ``mode`` (0755), atomically (temp file,
    fsync, rename), creating the directory if needed. Returns the path; OSError propagates."""
    import tempfile  # only installs need it
    target = os.path.join(directory, name)
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o755)
    fd, tmp = tempfile.mkstemp(prefix="." + name + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def remove(path):
    """Remove ``path``: True if it was there, False if not; other OSErrors propagate."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
