"""Small image helpers for tests that use the writer guest."""

import subprocess


def create_qcow2(path, size_mib, backing=None, backing_format="qcow2"):
    """qemu-img create a qcow2 of size_mib MiB (optionally on a backing image); returns path."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", str(backing), "-F", backing_format]
    cmd += [str(path), "%dM" % size_mib]
    subprocess.run(cmd, check=True)
    return str(path)
