"""VHD on-disk structures as blktap's libvhd writes them: pack, unpack, checksums. Pure, no I/O.

All integers are big-endian. See ../shared/VHD-FORMAT.md section 1 for the byte offsets.
"""
import struct
import time
import uuid as uuidlib

SECTOR = 512
SECTOR_SHIFT = 9
BLOCK_SIZE = 2 * 1024 * 1024          # the only block size blktap writes
MAX_BLOCK_SIZE = BLOCK_SIZE           # libvhd rejects bigger blocks
MAX_SIZE = 2 * 1024 ** 4              # 2 TiB: 1 Mi BAT entries (SM's -S default)
UNUSED = 0xFFFFFFFF                   # BAT entry of an unallocated block

FOOTER_COOKIE = b"conectix"
POISON_COOKIE = b"v_poison"           # a disabled VHD (vhd-util refuses it)
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"

FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2                # must always be set
FF_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
CREATOR_APP = b"tap\0"
CREATOR_OS = 0


def version(major, minor):
    return (major << 16) | minor


CREATOR_VERSION = version(1, 3)
BATMAP_VERSION = version(1, 2)

TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFF = 4
TYPE_NAMES = {TYPE_FIXED: "fixed", TYPE_DYNAMIC: "dynamic", TYPE_DIFF: "differencing"}

HEADER_OFFSET = 512
TABLE_OFFSET = 1536
ALL_ONES64 = 0xFFFFFFFFFFFFFFFF

# Parent locator platform codes.
PLAT_NONE = 0
PLAT_WI2R = 0x57693272     # "Wi2r" (deprecated)
PLAT_WI2K = 0x5769326B     # "Wi2k" (deprecated)
PLAT_W2RU = 0x57327275     # "W2ru" relative, UTF-16LE
PLAT_W2KU = 0x57326B75     # "W2ku" absolute, UTF-16LE (blktap stores a relative path anyway)
PLAT_MAC = 0x4D616320      # "Mac " alias record, not decoded
PLAT_MACX = 0x4D616358     # "MacX" file URL, UTF-8
KNOWN_PLATFORMS = (PLAT_WI2R, PLAT_WI2K, PLAT_W2RU, PLAT_W2KU, PLAT_MAC, PLAT_MACX)
N_LOCATORS = 8

VHD_EPOCH = 946684800                 # 2000-01-01 00:00:00 UTC in Unix time

NULL_UUID = b"\0" * 16

_FOOTER = struct.Struct(">8sIIQI4sIIQQIII16sBB426s")
_HEADER = struct.Struct(">8sQQIIII16sII512s")
_LOCATOR = struct.Struct(">IIIIQ")
_BATMAP_HDR = struct.Struct(">8sQIIIB65s")
assert _FOOTER.size == 512 and _HEADER.size == 576 and _LOCATOR.size == 24


def checksum(buf):
    """Ones' complement of the unsigned byte sum (footer, header, batmap)."""
    return (~sum(buf)) & 0xFFFFFFFF


def pad_sectors(nbytes):
    """Bytes rounded up to whole sectors."""
    return (nbytes + SECTOR - 1) // SECTOR * SECTOR


def secs_round_up_no_zero(nbytes):
    return max(1, (nbytes + SECTOR - 1) // SECTOR)


def blocks_for(size, block_size=BLOCK_SIZE):
    return (size + block_size - 1) // block_size


def now_vhd():
    return to_vhd_time(time.time())


def to_vhd_time(unix_time):
    return max(0, int(unix_time) - VHD_EPOCH) & 0xFFFFFFFF


def from_vhd_time(ts):
    return ts + VHD_EPOCH


def new_uuid():
    return uuidlib.uuid4().bytes


def uuid_str(raw):
    return str(uuidlib.UUID(bytes=bytes(raw)))


def chs(size):
    """Geometry (cylinders, heads, sectors per track) for ``size`` bytes, the VHD spec algorithm."""
    total = size // SECTOR
    if total > 65535 * 16 * 255:
        total = 65535 * 16 * 255
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def geometry(size):
    c, h, s = chs(size)
    return (c << 16) | (h << 8) | s


def geometry_sectors(geom):
    return (geom >> 16) * ((geom >> 8) & 0xFF) * (geom & 0xFF)


class Footer(object):
    """The 512-byte footer (and its backup copy at offset 0)."""
    __slots__ = ("cookie", "features", "ff_version", "data_offset", "timestamp", "crtr_app",
                 "crtr_ver", "crtr_os", "orig_size", "curr_size", "geometry", "type",
                 "checksum", "uuid", "saved", "hidden", "reserved")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name, 0))

    @classmethod
    def new(cls, size, disk_type, uid=None, timestamp=None):
        return cls(cookie=FOOTER_COOKIE, features=FEATURE_RESERVED, ff_version=FF_VERSION,
                   data_offset=ALL_ONES64 if disk_type == TYPE_FIXED else HEADER_OFFSET,
                   timestamp=now_vhd() if timestamp is None else timestamp,
                   crtr_app=CREATOR_APP, crtr_ver=CREATOR_VERSION, crtr_os=CREATOR_OS,
                   orig_size=size, curr_size=size, geometry=geometry(size), type=disk_type,
                   checksum=0, uuid=uid or new_uuid(), saved=0, hidden=0, reserved=b"\0" * 426)

    @classmethod
    def unpack(cls, buf):
        """Unpack 512 bytes (a 511-byte short footer is padded with a zero byte)."""
        buf = bytes(buf)
        if len(buf) == 511:
            buf += b"\0"
        return cls(**dict(zip(cls.__slots__, _FOOTER.unpack(buf[:512]))))

    def pack(self, update_checksum=True):
        if update_checksum:
            self.checksum = 0
            self.checksum = checksum(self._pack())
        return self._pack()

    def _pack(self):
        return _FOOTER.pack(*[getattr(self, n) for n in self.__slots__])

    def computed_checksum(self):
        saved = self.checksum
        self.checksum = 0
        try:
            return checksum(self._pack())
        finally:
            self.checksum = saved

    def copy(self):
        return Footer(**{n: getattr(self, n) for n in self.__slots__})


class Locator(object):
    __slots__ = ("code", "data_space", "data_len", "res", "data_offset")

    def __init__(self, code=0, data_space=0, data_len=0, res=0, data_offset=0):
        self.code, self.data_space, self.data_len = code, data_space, data_len
        self.res, self.data_offset = res, data_offset

    def space_bytes(self):
        """data_space in bytes: blktap stores bytes, other writers sectors (< 512 means sectors)."""
        return self.data_space * SECTOR if self.data_space < SECTOR else self.data_space

    def pack(self):
        return _LOCATOR.pack(self.code, self.data_space, self.data_len, self.res, self.data_offset)


class Header(object):
    """The 1024-byte dynamic disk header at offset 512."""
    __slots__ = ("cookie", "data_offset", "table_offset", "hdr_ver", "max_bat_size", "block_size",
                 "checksum", "prt_uuid", "prt_ts", "res1", "prt_name", "loc", "res2")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name, 0))
        if not kw.get("loc"):
            self.loc = [Locator() for _ in range(N_LOCATORS)]

    @classmethod
    def new(cls, max_bat_size):
        return cls(cookie=HEADER_COOKIE, data_offset=ALL_ONES64, table_offset=TABLE_OFFSET,
                   hdr_ver=HEADER_VERSION, max_bat_size=max_bat_size, block_size=BLOCK_SIZE,
                   checksum=0, prt_uuid=NULL_UUID, prt_ts=0, res1=0, prt_name=b"\0" * 512,
                   res2=b"\0" * 256)

    @classmethod
    def unpack(cls, buf):
        buf = bytes(buf)
        vals = _HEADER.unpack(buf[:576])
        kw = dict(zip(cls.__slots__[:11], vals))
        kw["loc"] = [Locator(*_LOCATOR.unpack(buf[576 + 24 * i:600 + 24 * i]))
                     for i in range(N_LOCATORS)]
        kw["res2"] = buf[768:1024]
        return cls(**kw)

    def _pack(self):
        head = _HEADER.pack(*[getattr(self, n) for n in self.__slots__[:11]])
        return head + b"".join(l.pack() for l in self.loc) + self.res2

    def pack(self, update_checksum=True):
        if update_checksum:
            self.checksum = 0
            self.checksum = checksum(self._pack())
        return self._pack()

    def computed_checksum(self):
        saved = self.checksum
        self.checksum = 0
        try:
            return checksum(self._pack())
        finally:
            self.checksum = saved

    @property
    def parent_name(self):
        return decode_parent_name(self.prt_name)

    @property
    def bat_bytes(self):
        return pad_sectors(4 * self.max_bat_size)


def encode_parent_name(name):
    raw = name.encode("utf-16-be")
    if len(raw) > 512:
        raise ValueError("parent name too long")
    return raw + b"\0" * (512 - len(raw))


def decode_parent_name(raw):
    raw = bytes(raw)
    end = len(raw)
    for i in range(0, len(raw) - 1, 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            end = i
            break
    return raw[:end].decode("utf-16-be", "replace")


class BatmapHeader(object):
    __slots__ = ("cookie", "batmap_offset", "batmap_size", "batmap_version", "checksum",
                 "marker", "keyhash")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name, 0))

    @classmethod
    def new(cls, offset, size_sectors):
        return cls(cookie=BATMAP_COOKIE, batmap_offset=offset, batmap_size=size_sectors,
                   batmap_version=BATMAP_VERSION, checksum=0, marker=0, keyhash=b"\0" * 65)

    @classmethod
    def unpack(cls, buf):
        return cls(**dict(zip(cls.__slots__, _BATMAP_HDR.unpack(bytes(buf[:_BATMAP_HDR.size])))))

    def pack(self):
        raw = _BATMAP_HDR.pack(*[getattr(self, n) for n in self.__slots__])
        return raw + b"\0" * (SECTOR - len(raw))


def batmap_sectors(max_bat_size):
    """Size of the batmap in sectors for a BAT of ``max_bat_size`` entries (min 1)."""
    return secs_round_up_no_zero((max_bat_size + 7) // 8)


def batmap_checksum(batmap, curr_size, batmap_version=BATMAP_VERSION):
    """libvhd's vhd_checksum_batmap: over max(1, ceil((curr_size >> 24) / 512)) sectors."""
    n = secs_round_up_no_zero(curr_size >> 24) * SECTOR
    blob = bytes(batmap[:n])
    if len(blob) < n:
        blob += b"\0" * (n - len(blob))
    if batmap_version == version(1, 1):
        total = sum(b - 256 if b > 127 else b for b in blob)   # v1.1 summed signed chars
    else:
        total = sum(blob)
    return (~total) & 0xFFFFFFFF


def test_bit(bitmap, i):
    return bitmap[i >> 3] & (0x80 >> (i & 7)) != 0


def set_bit(bitmap, i):
    bitmap[i >> 3] |= 0x80 >> (i & 7)


def clear_bit(bitmap, i):
    bitmap[i >> 3] &= ~(0x80 >> (i & 7)) & 0xFF


def set_bits(bitmap, start, end):
    """Set bits [start, end) of a bytearray bitmap (MSB first)."""
    if start >= end:
        return
    first, last = start >> 3, (end - 1) >> 3
    if first == last:
        bitmap[first] |= (0xFF >> (start & 7)) & (0xFF << (7 - ((end - 1) & 7))) & 0xFF
        return
    bitmap[first] |= 0xFF >> (start & 7)
    if last > first + 1:
        bitmap[first + 1:last] = b"\xff" * (last - first - 1)
    bitmap[last] |= (0xFF << (7 - ((end - 1) & 7))) & 0xFF


def runs(bitmap, start, end):
    """Runs ``(begin, end, is_set)`` of equal bits in ``bitmap`` over bit range [start, end)."""
    out = []
    i = start
    while i < end:
        bit = test_bit(bitmap, i)
        j = _next_change(bitmap, i, end, bit)
        out.append((i, j, bit))
        i = j
    return out


def _next_change(bitmap, i, end, bit):
    """First index >= i in [i, end) whose bit differs from ``bit`` (or ``end``)."""
    same = 0xFF if bit else 0x00
    # finish the current byte bit by bit
    while i < end and i & 7:
        if test_bit(bitmap, i) != bit:
            return i
        i += 1
    # skip whole bytes equal to ``same``
    nbytes_end = end >> 3
    k = i >> 3
    if k < nbytes_end:
        stop = _find_not(bitmap, same, k, nbytes_end)
        i = stop << 3
    while i < end:
        if test_bit(bitmap, i) != bit:
            return i
        i += 1
    return end


def _find_not(buf, value, start, end):
    """First index in [start, end) whose byte != value, else end."""
    want = bytes((value,)) * 64
    k = start
    while k < end:
        n = min(64, end - k)
        if buf[k:k + n] != want[:n]:
            chunk = buf[k:k + n]
            for j in range(n):
                if chunk[j] != value:
                    return k + j
        k += n
    return end


def count_bits(bitmap, start=0, end=None):
    if end is None:
        end = len(bitmap) * 8
    return sum(e - b for b, e, s in runs(bitmap, start, end) if s)


def all_set(bitmap, nbits):
    full, rest = divmod(nbits, 8)
    if bitmap[:full] != b"\xff" * full:
        return False
    return all(test_bit(bitmap, i) for i in range(full * 8, nbits))


# --- parent locators ----------------------------------------------------------------------

def relative_path(child_path, parent_path):
    """The relative path from the child to the parent, './' prefixed, as libvhd writes it
    (over libvhd's canonical names: an LV by its /dev/mapper name; see paths.py)."""
    from livesnap.vhd import paths
    return paths.relative_path(child_path, parent_path)


def encode_locator(code, rel_path):
    if code == PLAT_MACX:
        return ("file://" + rel_path).encode("utf-8")
    if code in (PLAT_W2KU, PLAT_W2RU):
        return rel_path.replace("/", "\\").encode("utf-16-le")
    raise ValueError("cannot encode locator code %#x" % code)


def decode_locator(code, raw):
    """The path text of a locator, or None for codes blktap does not decode."""
    raw = bytes(raw)
    if code == PLAT_MACX:
        text = raw.decode("utf-8")
        if text.startswith("file://"):
            text = text[len("file://"):]
        return text.rstrip("\0")
    if code in (PLAT_W2KU, PLAT_W2RU):
        text = raw.decode("utf-16-le").rstrip("\0").replace("\\", "/")
        if text[:2].lower() == "c:":
            text = text[2:]
        return text
    return None


def code_name(code):
    try:
        raw = struct.pack(">I", code)
        if all(32 <= c < 127 for c in raw):
            return raw.decode("ascii")
    except struct.error:
        pass
    return "%#x" % code
