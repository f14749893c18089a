"""qemu-io, for the one thing livesnap asks of it (binary overridable by ``QEMU_IO``)."""
from livesnap.tools import runner

BATCH = 512          # commands per qemu-io process (its argv stays small)


def _bin():
    return runner.binary("QEMU_IO", "qemu-io")


def write_zeroes(path, extents, fmt="qcow2"):
    """Write zeroes over each ``(offset, length)`` of an image not in use (``write -z``: in
    a qcow2 image, zero clusters, no data written); its enabled dirty bitmaps mark them."""
    extents = list(extents)
    for i in range(0, len(extents), BATCH):
        argv = [_bin(), "-f", fmt]
        for offset, length in extents[i:i + BATCH]:
            argv += ["-c", "write -z %d %d" % (offset, length)]
        runner.run(argv + [path])
