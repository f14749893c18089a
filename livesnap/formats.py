"""Image formats behind one interface: qcow2 (and raw) through qemu-img, VHD through the
pure-Python VHD engine. Only what the engine needs to validate and adopt chains.

A qcow2 chain whose headers ``livesnap.qcow2`` vouches for (the plain case: what livesnap
and libvirt create) is read without starting qemu-img; whatever it does not vouch for --
odd, damaged or truncated images included -- is read, and diagnosed, by qemu-img."""
import collections
import os
import stat

from livesnap import qcow2
from livesnap.tools import qemu_img

ImageInfo = collections.namedtuple("ImageInfo", "path fmt backing alloc virtual_size")


def info(path, fmt):
    """One image: its format, absolute backing path (or None), allocated bytes, size."""
    if fmt == "vhd":
        from livesnap import vhd
        _check_vhd_footers(path)
        q = vhd.query(path)
        return ImageInfo(os.path.abspath(path), "vhd",
                         os.path.abspath(q.parent) if q.parent else None,
                         q.physical_size, q.virtual_size)
    if fmt == "qcow2":
        h = qcow2.read_header(path)
        if h is not None:
            return _qcow2_info(path, h)
    entry = qemu_img.info(path, force_share=True)
    return ImageInfo(os.path.abspath(path), entry["format"], qemu_img.backing_path(entry, path),
                     _alloc(path, entry), entry["virtual-size"])


def _alloc(path, entry):
    """What an image holds itself: qemu-img's ``actual-size`` of a file; of a qcow2 on a
    block device (an LV, whose size says nothing), the bytes its own clusters map."""
    try:
        block = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        block = False
    if block and entry.get("format") == "qcow2":
        return sum(n for _, n in qemu_img.allocated(path, force_share=True))
    return entry.get("actual-size", 0)


def open_leaf_info(path):
    """A VHD leaf a tapdisk holds open read-write, from what tapdisk never rewrites (footer
    contents, header, locators): its BAT is not read, as it changes under the reader while
    tapdisk allocates; the allocation is the file's size (an LV: the BAT's end of data, read
    without validating it)."""
    from livesnap import vhd
    path = os.path.abspath(path)
    with vhd.open_header(path) as img:
        size, parent = img.virtual_size, img.parent_path()
    st = os.stat(path)
    alloc = st.st_size if not stat.S_ISBLK(st.st_mode) else vhd.data_end_unchecked(path)
    return ImageInfo(path, "vhd", os.path.abspath(parent) if parent else None, alloc, size)


def chain(path, fmt, open_leaf=False):
    """The image and its backing chain, leaf first. ``open_leaf``: ``path`` is a VHD leaf a
    tapdisk holds open (see ``open_leaf_info``); the images below it are read as usual."""
    if fmt == "vhd":
        from livesnap import vhd
        if open_leaf:
            top = open_leaf_info(path)
            return [top] + (chain(top.backing, fmt) if top.backing else [])
        return [info(p, "vhd") for p in vhd.chain_paths(path)]
    if fmt == "qcow2":
        fast = _plain_qcow2_chain(path)
        if fast is not None:
            return fast
    entries = qemu_img.info(path, backing_chain=True, force_share=True)
    out = []
    for i, entry in enumerate(entries):
        p = os.path.abspath(entry["filename"])
        backing = os.path.abspath(entries[i + 1]["filename"]) if i + 1 < len(entries) else None
        out.append(ImageInfo(p, entry["format"], backing, _alloc(p, entry),
                             entry["virtual-size"]))
    return out


MAX_CHAIN = 256


def _check_vhd_footers(path):
    """A VHD whose primary footer (or, the primary sound, whose backup copy) is damaged is
    refused, as ``vhd-util check`` refuses it, rather than read through the other copy and
    frozen into a snapshot: ``VhdCorrupt`` (a ``BadImage``)."""
    from livesnap import vhd
    from livesnap.vhd.check import footer_copies_problem
    problem = footer_copies_problem(path)
    if problem is not None:
        raise vhd.VhdCorrupt(os.path.abspath(path), problem)


def _qcow2_info(path, header, st=None):
    path = os.path.abspath(path)
    st = st or os.stat(path)
    alloc = st.st_blocks * 512
    if stat.S_ISBLK(st.st_mode):                 # an LV: what its clusters map
        alloc = _alloc(path, {"format": "qcow2"})
    return ImageInfo(path, "qcow2", qemu_img.resolve_backing(header.backing, path),
                     alloc, header.size)


def _plain_qcow2_chain(path):
    """The chain as ``chain()`` gives it, from the headers alone; None when any image of it
    is not plain (qemu-img then reads, or refuses, the whole chain)."""
    out, seen = [], set()
    p, fmt = path, "qcow2"
    while p is not None:
        p = os.path.abspath(p)
        if p in seen or len(out) >= MAX_CHAIN:
            return None                                  # a loop: qemu-img says so
        seen.add(p)
        try:
            st = os.stat(p)
        except OSError:
            return None
        if fmt == "raw" and stat.S_ISREG(st.st_mode):
            out.append(ImageInfo(p, "raw", None, st.st_blocks * 512, st.st_size))
            return out
        if fmt != "qcow2":
            return None
        h = qcow2.read_header(p)
        if h is None:
            return None
        e = _qcow2_info(p, h, st)
        out.append(e)
        p, fmt = e.backing, h.backing_format
    return out
