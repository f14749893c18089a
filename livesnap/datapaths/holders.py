"""Which processes have a file open, read from ``/proc/<pid>/fd`` (what ``fuser`` does).

An image a process holds open is never removed or re-created by livesnap, whatever libvirt
or a definition says about it: libvirt's view of a running domain can be stale (a libvirtd
that restarted in the middle of a snapshot reloads the state it saved before QEMU switched
to the overlay), QEMU's open files cannot be. A process whose descriptors cannot be read
(gone meanwhile, or another user's when livesnap does not run as root) is not seen.
"""
import os
import stat


def open_by(path):
    """[pid, ...] of the other processes that have the file (or block device) ``path``
    names open now; [] when there is no such file."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    want = (st.st_dev, st.st_ino)
    # a block device (an LV) may be opened through another node of the same device (its
    # /dev/mapper node, /dev/dm-N): matched by its device number
    rdev = st.st_rdev if stat.S_ISBLK(st.st_mode) else None
    me = os.getpid()
    pids = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        fd_dir = os.path.join("/proc", name, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                s = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == want or (
                    rdev is not None and stat.S_ISBLK(s.st_mode) and s.st_rdev == rdev):
                pids.append(int(name))
                break
    return sorted(pids)
