"""``livesnap vhd ...``: vhd-util's subcommands and flags (as XAPI's SM and the seed method use
them) on the pure-Python engine, plus ``pull``, ``read -R/-c`` and ``write``.

Exit codes as vhd-util: 0 ok, a positive errno on error (EINVAL 22, ENOENT 2, ERANGE 34,
ENOSPC 28, ...); argparse usage errors exit 2.
"""
import argparse
import errno
import sys
import time

from livesnap.vhd import format as fmt
from livesnap.vhd.check import check, repair
from livesnap.vhd.errors import VhdError, from_oserror
from livesnap.vhd.create import create, snapshot
from livesnap.vhd.edit import (drop_data, grow, set_hidden, set_marker, set_parent,
                               set_physical_size)
from livesnap.vhd.image import open_image
from livesnap.vhd.merge import coalesce, pull

MiB = 1 << 20

EPILOG = """examples:
  livesnap vhd create -n base.vhd -s 1024
  livesnap vhd snapshot -n leaf.vhd -p base.vhd
  livesnap vhd query -n leaf.vhd -v -s -p -f -d
  livesnap vhd coalesce -n leaf.vhd && livesnap vhd modify -n child.vhd -p base.vhd
  livesnap vhd read -n leaf.vhd -R 0 -c 4096 | xxd | head
"""


def _out(text):
    sys.stdout.write(text + "\n")


# --- commands -----------------------------------------------------------------------------

def cmd_create(a):
    create(a.name, a.size * MiB, max_size=a.max_size * MiB if a.max_size else None,
           fixed=a.reserve)
    return 0


def cmd_snapshot(a):
    snapshot(a.name, a.parent, max_size=a.max_size * MiB if a.max_size else None,
             raw_parent=a.raw, limit=a.limit, skip_empty=not (a.empty or a.raw))
    return 0


def cmd_query(a):
    with open_image(a.name, chain=a.depth or (a.parent and not a.unresolved)) as img:
        if a.virtual:
            _out("%d" % (img.virtual_size >> 20))
        if a.physical:
            _out("%d" % img.physical_size)
        if a.parent:
            if not img.is_differencing:
                _out("%s has no parent" % a.name)
            elif a.unresolved:
                locs = img.parent_locators()
                _out(locs[0][2] if locs else img.header.parent_name)
            else:
                _out(img.parent.path)
        if a.fields:
            _out("hidden: %d" % img.hidden)
        if a.marker:
            _out("marker: %d" % (img.batmap_hdr.marker if img.batmap_hdr is not None else 0))
        if a.depth:
            _out("chain depth: %d" % img.depth)
        if a.fast_resize:
            _out("%d" % (img.max_size >> 20))
        if a.allocated:
            _out("%d" % len(img.allocated_blocks()))
    return 0


def cmd_check(a):
    problems = check(a.name, ignore_missing_footer=a.ignore_missing,
                     ignore_parent_uuid=a.ignore_parent_uuid, ignore_time=a.ignore_time,
                     skip_bat_overlap=a.skip_bat, parents=a.parents, bitmaps=a.bitmaps)
    if problems:
        for p in problems:
            _out(p)
        _out("%s appears invalid; dumping metadata" % a.name)
        return errno.EINVAL
    if a.stats:
        with open_image(a.name, chain=False) as img:
            n = len(img.allocated_blocks())
            total = getattr(img, "nblocks", 0)
            _out("%d of %d blocks allocated" % (n, total))
    _out("%s is valid" % a.name)
    return 0


def _progress(enabled):
    if not enabled:
        return None
    state = {"last": -1}

    def show(done, total):
        pct = 100 * done // max(1, total)
        if pct != state["last"]:
            state["last"] = pct
            sys.stderr.write("\r%3d%%" % pct)
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return show


def cmd_coalesce(a):
    n = coalesce(a.name, progress=_progress(a.progress))
    _out("Coalesced %d sectors" % n)
    return 0


def cmd_pull(a):
    n = pull(a.name, reparent=a.reparent, progress=_progress(a.progress))
    _out("Pulled %d sectors" % n)
    return 0


def cmd_modify(a):
    if not (a.parent or a.size is not None or a.zero):
        raise VhdError(a.name, "nothing to modify (-p, -s or -z)")
    if a.parent:
        set_parent(a.name, a.parent, raw=a.raw)
    if a.zero:
        drop_data(a.name)
    if a.size is not None:
        set_physical_size(a.name, a.size)
    return 0


def cmd_set(a):
    if a.field == "hidden":
        set_hidden(a.name, a.value)
    elif a.field == "marker":
        set_marker(a.name, a.value)
    else:
        raise VhdError(a.name, "unknown field %r" % a.field)
    return 0


def cmd_repair(a):
    repair(a.name, use_backup=a.backup)
    return 0


def cmd_resize(a):
    if not (a.journal or a.fast):
        raise VhdError(a.name, "resize needs -j JOURNAL or -f")
    grow(a.name, a.size * MiB, fast_only=a.fast)
    return 0


def _emit(data, hexdump):
    if hexdump:
        for i in range(0, len(data), 16):
            chunk = data[i:i + 16]
            _out("%08x: %s" % (i, " ".join("%02x" % c for c in chunk)))
        return
    out = getattr(sys.stdout, "buffer", sys.stdout)
    sys.stdout.flush()
    out.write(data)
    out.flush()


def cmd_read(a):
    with open_image(a.name) as img:
        if a.print_headers:
            _print_headers(img)
        if a.byte is not None or a.sector is not None:
            off = a.byte if a.byte is not None else a.sector * 512
            count = a.count if a.count is not None else (1 if a.byte is None else 512)
            if a.byte is None:
                count *= 512
            _emit(img.read(off, count), a.hex)
        if a.bat is not None:
            _need_vhd(img)
            e = img.bat[a.bat] if 0 <= a.bat < img.nblocks else None
            if e is None:
                raise VhdError(a.name, "block %d out of range" % a.bat)
            _out("block: %d: " % a.bat + ("not allocated" if e == fmt.UNUSED else "%d" % e))
        if a.bat_bits:
            _need_vhd(img)
            _out("".join("0" if img.bat[b] == fmt.UNUSED else "1" for b in range(img.nblocks)))
        if a.bitmap is not None:
            _need_vhd(img)
            if img.bat[a.bitmap] == fmt.UNUSED:
                _out("block %d not allocated" % a.bitmap)
            else:
                bm = img.bitmap(a.bitmap)
                _out("".join("1" if fmt.test_bit(bm, i) else "0" for i in range(img.spb)))
        if a.batmap:
            _need_vhd(img)
            _out("".join("1" if img.is_full(b) else "0" for b in range(img.nblocks)))
        if a.extents:
            for off, n in img.sector_map():
                _out("0x%x 0x%x" % (off // 512, n // 512))
    return 0


def _need_vhd(img):
    if img.header is None:
        raise VhdError(img.path, "fixed disk has no BAT")


def cmd_write(a):
    if a.input and a.input != "-":
        try:
            with open(a.input, "rb") as f:
                data = f.read()
        except OSError as e:
            raise from_oserror(a.input, e)
    else:
        data = getattr(sys.stdin, "buffer", sys.stdin).read()
    with open_image(a.name, writable=True) as img:
        img.write(a.byte, data)
    return 0


def _ts(vhd_time):
    return time.asctime(time.gmtime(fmt.from_vhd_time(vhd_time)))


def _print_headers(img):
    f = img.footer
    c, h_, s = f.geometry >> 16, (f.geometry >> 8) & 0xFF, f.geometry & 0xFF
    lines = [
        "VHD Footer Summary:", "-------------------",
        "Cookie              : %s" % f.cookie.decode("ascii", "replace"),
        "Features            : (0x%08x)" % f.features,
        "File format version : Major: %d, Minor: %d" % (f.ff_version >> 16, f.ff_version & 0xFFFF),
        "Data offset         : %d" % f.data_offset,
        "Timestamp           : %s" % _ts(f.timestamp),
        "Creator Application : '%s'" % f.crtr_app.rstrip(b"\0").decode("ascii", "replace"),
        "Creator version     : Major: %d, Minor: %d" % (f.crtr_ver >> 16, f.crtr_ver & 0xFFFF),
        "Creator OS          : %s" % {0x5769326B: "Windows", 0x4D616320: "Macintosh"}.get(
            f.crtr_os, "Unknown!"),
        "Original disk size  : %d MB (%d Bytes)" % (f.orig_size >> 20, f.orig_size),
        "Current disk size   : %d MB (%d Bytes)" % (f.curr_size >> 20, f.curr_size),
        "Geometry            : Cyl: %d, Hds: %d, Sctrs: %d" % (c, h_, s),
        "                    : = %d MB (%d Bytes)" % ((c * h_ * s * 512) >> 20, c * h_ * s * 512),
        "Disk type           : %s" % {2: "Fixed hard disk", 3: "Dynamic hard disk",
                                      4: "Differencing hard disk"}.get(f.type, "Unknown"),
        "Checksum            : 0x%x|0x%x (%s)" % (f.checksum, f.computed_checksum(),
                                                  "Good!" if f.checksum == f.computed_checksum()
                                                  else "Bad!"),
        "UUID                : %s" % fmt.uuid_str(f.uuid),
        "Saved state         : %s" % ("Yes" if f.saved else "No"),
        "Hidden              : %d" % f.hidden, ""]
    h = img.header
    if h is not None:
        lines += [
            "VHD Header Summary:", "-------------------",
            "Cookie              : %s" % h.cookie.decode("ascii", "replace"),
            "Data offset (unusd) : %d" % h.data_offset,
            "Table offset        : %d" % h.table_offset,
            "Header version      : 0x%08x" % h.hdr_ver,
            "Max BAT size        : %d" % h.max_bat_size,
            "Block size          : %d (%d MB)" % (h.block_size, h.block_size >> 20),
            "Parent name         : %s" % h.parent_name,
            "Parent UUID         : %s" % fmt.uuid_str(h.prt_uuid),
            "Parent timestamp    : %s" % _ts(h.prt_ts),
            "Checksum            : 0x%x|0x%x (%s)" % (h.checksum, h.computed_checksum(),
                                                      "Good!" if h.checksum ==
                                                      h.computed_checksum() else "Bad!"), ""]
        for i, l in enumerate(h.loc):
            if l.code:
                lines.append("Parent locator %d    : %s space %d len %d offset %d" % (
                    i, fmt.code_name(l.code), l.data_space, l.data_len, l.data_offset))
        if img.batmap_hdr is not None:
            bh = img.batmap_hdr
            lines += ["", "VHD Batmap Summary:", "-------------------",
                      "Batmap offset       : %d" % bh.batmap_offset,
                      "Batmap size (secs)  : %d" % bh.batmap_size,
                      "Batmap version      : 0x%08x" % bh.batmap_version,
                      "Checksum            : 0x%x (%s)" % (bh.checksum,
                                                         "Good!" if img.batmap_valid else "Bad!"),
                      "Marker              : %d" % bh.marker]
    for line in lines:
        _out(line)


# --- parser -------------------------------------------------------------------------------

def _int(text):
    return int(text, 0)


def _add(sub, name, func, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the VHD file")
    p.set_defaults(vhd_func=func)
    return p


def _build(vsub):
    p = _add(vsub, "create", cmd_create, "create a dynamic VHD (-r: fixed)")
    p.add_argument("-s", dest="size", type=_int, required=True, metavar="MiB")
    p.add_argument("-r", dest="reserve", action="store_true", help="fixed (zero-filled) VHD")
    p.add_argument("-S", dest="max_size", type=_int, metavar="MiB",
                   help="preallocate BAT and batmap for this maximum size")

    p = _add(vsub, "snapshot", cmd_snapshot, "create a differencing child of PARENT")
    p.add_argument("-p", dest="parent", required=True, metavar="PARENT")
    p.add_argument("-l", dest="limit", type=_int, metavar="LIMIT", help="maximum chain depth")
    p.add_argument("-m", dest="raw", action="store_true", help="PARENT is a raw file")
    p.add_argument("-S", dest="max_size", type=_int, metavar="MiB")
    p.add_argument("-e", dest="empty", action="store_true",
                   help="link to PARENT even if it is an empty differencing disk")

    p = _add(vsub, "query", cmd_query, "print sizes, parent, flags of a VHD")
    for flag, dest, text in (("-v", "virtual", "virtual size in MiB"),
                             ("-s", "physical", "physical size in bytes"),
                             ("-p", "parent", "parent path"), ("-f", "fields", "hidden flag"),
                             ("-m", "marker", "marker byte"), ("-d", "depth", "chain depth"),
                             ("-S", "fast_resize", "maximum fast-resize size in MiB"),
                             ("-a", "allocated", "allocated block count"),
                             ("-u", "unresolved", "with -p: the locator text, unresolved")):
        p.add_argument(flag, dest=dest, action="store_true", help=text)

    p = _add(vsub, "check", cmd_check, "check a VHD's metadata")
    for flag, dest, text in (("-i", "ignore_missing", "tolerate a missing primary footer"),
                             ("-I", "ignore_parent_uuid", "do not compare the parent UUID"),
                             ("-t", "ignore_time", "skip 'time in future' checks"),
                             ("-B", "skip_bat", "skip the BAT overlap scan"),
                             ("-p", "parents", "check the parents too"),
                             ("-b", "bitmaps", "data under clear bitmap bits must be zero"),
                             ("-s", "stats", "print allocation stats")):
        p.add_argument(flag, dest=dest, action="store_true", help=text)

    p = _add(vsub, "coalesce", cmd_coalesce, "copy the child's data into its parent")
    p.add_argument("-s", dest="sparse", action="store_true", help="(always sparse)")
    p.add_argument("-p", dest="progress", action="store_true", help="progress on stderr")
    p.add_argument("-o", dest="output", metavar="NAME", help="(ignored, as in vhd-util)")
    p.add_argument("-a", dest="ancestor", metavar="NAME", help="(ignored, as in vhd-util)")
    p.add_argument("-x", dest="xx", action="store_true", help="(ignored)")

    p = _add(vsub, "pull", cmd_pull, "copy the parent's data into the child where it has none")
    p.add_argument("-p", dest="progress", action="store_true", help="progress on stderr")
    p.add_argument("-r", "--reparent", dest="reparent", action="store_true",
                   help="then point the child at its grandparent (dynamic if none)")

    p = _add(vsub, "modify", cmd_modify, "reparent (-p), set physical size (-s), drop data (-z)")
    p.add_argument("-p", dest="parent", metavar="NEWPARENT")
    p.add_argument("-m", dest="raw", action="store_true", help="NEWPARENT is raw")
    p.add_argument("-s", dest="size", type=_int, metavar="BYTES", help="physical size")
    p.add_argument("-z", dest="zero", action="store_true", help="drop all data")

    p = _add(vsub, "set", cmd_set, "set a field: -f hidden|marker -v VALUE")
    p.add_argument("-f", dest="field", required=True, choices=("hidden", "marker"))
    p.add_argument("-v", dest="value", type=_int, required=True, metavar="VALUE")

    p = _add(vsub, "read", cmd_read, "print metadata or chain-resolved data")
    p.add_argument("-p", dest="print_headers", action="store_true", help="print headers")
    p.add_argument("-R", dest="byte", type=_int, metavar="BYTE", help="read at byte offset")
    p.add_argument("-r", dest="sector", type=_int, metavar="SEC", help="read at sector")
    p.add_argument("-c", dest="count", type=_int, metavar="N",
                   help="bytes with -R, sectors with -r")
    p.add_argument("-x", dest="hex", action="store_true", help="hex dump instead of raw")
    p.add_argument("-b", dest="bat", type=_int, metavar="BLK", help="BAT entry")
    p.add_argument("-B", dest="bat_bits", action="store_true", help="BAT as a bit string")
    p.add_argument("-m", dest="bitmap", type=_int, metavar="BLK", help="block bitmap")
    p.add_argument("-a", dest="batmap", action="store_true", help="batmap bit string")
    p.add_argument("-e", dest="extents", action="store_true",
                   help="allocated extents (sector, count) of this image")

    p = _add(vsub, "write", cmd_write, "write bytes from FILE (or stdin) at byte offset")
    p.add_argument("-R", dest="byte", type=_int, required=True, metavar="BYTE")
    p.add_argument("-i", dest="input", metavar="FILE", help="input file (default stdin)")

    p = _add(vsub, "repair", cmd_repair, "rewrite the footers")
    p.add_argument("-b", dest="backup", action="store_true",
                   help="take the backup footer as truth")

    p = _add(vsub, "resize", cmd_resize, "grow the virtual size (offline)")
    p.add_argument("-s", dest="size", type=_int, required=True, metavar="MiB")
    p.add_argument("-j", dest="journal", metavar="JOURNAL", help="(accepted; grow is ordered)")
    p.add_argument("-f", dest="fast", action="store_true",
                   help="only within the -S preallocation")


def run(args):
    """Run parsed ``args``; the exit code (0 or a positive errno)."""
    try:
        return args.vhd_func(args)
    except VhdError as e:
        sys.stderr.write("error: %s\n" % e)
        return getattr(e, "errno", errno.EINVAL) or errno.EINVAL
    except BrokenPipeError:
        return errno.EPIPE
    except OSError as e:
        sys.stderr.write("error: %s\n" % e)
        return e.errno or errno.EIO


def register(subparsers):
    """Add ``vhd`` (with its sub-commands) to an argparse subparsers object."""
    p = subparsers.add_parser("vhd", help="VHD tool compatible with vhd-util",
                              description="VHD tool compatible with vhd-util", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    vsub = p.add_subparsers(dest="vhd_command", metavar="COMMAND")
    vsub.required = True
    _build(vsub)
    p.set_defaults(func=run)
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(prog="livesnap")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "vhd":
        argv = ["vhd"] + argv
    args = parser.parse_args(argv)
    return args.func(args)
