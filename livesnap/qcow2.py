"""What livesnap reads of a qcow2 image's header itself: virtual size, backing file and
backing format, without starting ``qemu-img`` (a process of ~15-35 ms per command, on a
host where the guest's vCPUs keep the cores busy).

Only the plain case is answered: version 2 or 3, no encryption, no internal snapshot, no
external data file, no incompatible feature but "dirty", a backing file name that is a path (not ``json:``) with
its format recorded in the header, and tables that lie inside the file. Anything else --
an odd, damaged or truncated header included -- returns None, and the caller asks
``qemu-img``, whose answer (or error) stays the reference. Layout: QEMU's
docs/interop/qcow2.txt.

``data_file(path)`` reads one thing more: the external data file an image names, which the
engine refuses (an image's data outside its file: left behind when the image is deleted).
"""
import os
import struct

MAGIC = b"QFI\xfb"
V2_HEADER = 72
V3_MIN_HEADER = 104
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_DATA_FILE = 0x44415441
EXTERNAL_DATA_FILE = 1 << 2                 # incompatible feature bit
EXT_END = 0
DIRTY = 1
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 << 20


class Header(object):
    def __init__(self, size, backing, backing_format):
        self.size = size
        self.backing = backing                # as written in the image, or None
        self.backing_format = backing_format


def read_header(path):
    """The image's ``Header``, or None when this reader does not vouch for it."""
    try:
        with open(path, "rb") as f:
            head = f.read(V2_HEADER)
            if len(head) < V2_HEADER or head[:4] != MAGIC:
                return None
            (version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
             l1_offset, refcount_offset, refcount_clusters, nb_snapshots,
             snapshots_offset) = struct.unpack(">IQIIQIIQQIIQ", head[4:V2_HEADER])
            if version not in (2, 3) or not 9 <= cluster_bits <= 21 or crypt != 0 or \
                    nb_snapshots != 0:
                return None
            cluster = 1 << cluster_bits
            # the L1 table must map the whole virtual size, and not be absurdly large
            if l1_size * 8 > MAX_L1_BYTES or size > l1_size * (cluster // 8) * cluster:
                return None
            file_size = os.fstat(f.fileno()).st_size or f.seek(0, os.SEEK_END)   # an LV
            f.seek(V2_HEADER)
            header_length = V2_HEADER
            if version == 3:
                more = f.read(V3_MIN_HEADER - V2_HEADER)
                if len(more) < V3_MIN_HEADER - V2_HEADER:
                    return None
                incompatible, _compatible, _autoclear, refcount_order, header_length = \
                    struct.unpack(">QQQII", more)
                if incompatible & ~DIRTY or refcount_order > 6 or \
                        not V3_MIN_HEADER <= header_length <= cluster:
                    return None
                if header_length > V3_MIN_HEADER and f.read(1) != b"\0":
                    return None                   # a compression type other than zlib
            # the tables a reader needs must lie inside the file (else: truncated)
            if refcount_clusters == 0 or refcount_offset == 0 or refcount_offset % cluster or \
                    l1_offset % cluster or snapshots_offset % cluster or \
                    snapshots_offset >= 1 << 63 or \
                    refcount_offset + refcount_clusters * cluster > file_size or \
                    (l1_size and l1_offset + 8 * l1_size > file_size):
                return None
            f.seek(0)
            first = f.read(cluster)
    except (OSError, struct.error):
        return None
    extensions = _extensions(first, header_length, backing_offset or len(first))
    if extensions is None:
        return None
    backing = backing_format = None
    if backing_offset:
        if not 0 < backing_size <= MAX_BACKING_NAME or \
                backing_offset + backing_size > len(first):
            return None
        backing = os.fsdecode(first[backing_offset:backing_offset + backing_size])
        if backing.startswith("json:") or ":" in backing.split("/", 1)[0] or "\0" in backing:
            return None                           # a protocol or an options string
        raw = extensions.get(EXT_BACKING_FORMAT)
        if not raw or b"\0" in raw:
            return None                           # qemu-img would probe it
        backing_format = raw.decode("ascii", "replace")
    return Header(size & ~511, backing, backing_format)     # QEMU counts whole sectors


def _extensions(first, offset, end):
    """The header extensions between ``offset`` and ``end`` (the backing file name, or the
    first cluster's end), as QEMU reads them: {type: data}, or None when one of them runs
    past ``end`` or is of a kind this reader does not vouch for (bitmaps, an external data
    file's name, an encryption header, unknown kinds)."""
    found = {}
    while True:
        if offset + 8 > end:
            return found if offset >= end else None
        kind, length = struct.unpack(">II", first[offset:offset + 8])
        if length > end - offset - 8:
            return None                           # QEMU checks this before the kind
        if kind == EXT_END:
            return found
        if kind not in (EXT_BACKING_FORMAT, EXT_FEATURE_NAMES):
            return None
        found[kind] = first[offset + 8:offset + 8 + length]
        offset += 8 + ((length + 7) & ~7)


def data_file(path):
    """The external data file a qcow2 image names (its ``data_file``) as written (QEMU 7.2
    opens a relative name relative to the opening process's working directory, not the
    image's), or None: not a qcow2 image, no data file, or a header this reader cannot
    follow that far. A version 3 image with the "external data file" feature but no name
    for it gives ``""``: QEMU then needs the name from its options."""
    try:
        with open(path, "rb") as f:
            head = f.read(V3_MIN_HEADER)
            if len(head) < V3_MIN_HEADER or head[:4] != MAGIC:
                return None
            version, backing_offset, _bs, cluster_bits = struct.unpack(">IQII", head[4:24])
            if version != 3 or not 9 <= cluster_bits <= 21:
                return None
            incompatible, _c, _a, _r, header_length = struct.unpack(">QQQII", head[72:104])
            cluster = 1 << cluster_bits
            if not V3_MIN_HEADER <= header_length <= cluster:
                return None
            f.seek(0)
            first = f.read(cluster)
    except (OSError, struct.error):
        return None
    end = min(backing_offset or len(first), len(first))
    offset = header_length
    name = None
    while offset + 8 <= end:
        kind, length = struct.unpack(">II", first[offset:offset + 8])
        if kind == EXT_END or length > end - offset - 8:
            break
        if kind == EXT_DATA_FILE:
            name = os.fsdecode(first[offset + 8:offset + 8 + length])
            break
        offset += 8 + ((length + 7) & ~7)
    if not incompatible & EXTERNAL_DATA_FILE and name is None:
        return None
    return name or ""
