"""Image formats behind one interface: qcow2 (and raw) through qemu-img, VHD through the
pure-Python VHD engine. Only what the engine needs to validate and adopt chains."""
import collections
import os

from livesnap.tools import qemu_img

ImageInfo = collections.namedtuple("ImageInfo", "path fmt backing alloc virtual_size")


def info(path, fmt):
    """One image: its format, absolute backing path (or None), allocated bytes, size."""
    if fmt == "vhd":
        from livesnap import vhd
        q = vhd.query(path)
        return ImageInfo(os.path.abspath(path), "vhd",
                         os.path.abspath(q.parent) if q.parent else None,
                         q.physical_size, q.virtual_size)
    entry = qemu_img.info(path, force_share=True)
    return ImageInfo(os.path.abspath(path), entry["format"], qemu_img.backing_path(entry, path),
                     entry.get("actual-size", 0), entry["virtual-size"])


def chain(path, fmt):
    """The image and its backing chain, leaf first."""
    if fmt == "vhd":
        from livesnap import vhd
        return [info(p, "vhd") for p in vhd.chain_paths(path)]
    entries = qemu_img.info(path, backing_chain=True, force_share=True)
    out = []
    for i, entry in enumerate(entries):
        p = os.path.abspath(entry["filename"])
        backing = os.path.abspath(entries[i + 1]["filename"]) if i + 1 < len(entries) else None
        out.append(ImageInfo(p, entry["format"], backing, entry.get("actual-size", 0),
                             entry["virtual-size"]))
    return out
