"""LVM, one function per verb, plus inflate/deflate of a VHD on an LV as XAPI's SM does.

Binaries: a per-command variable (``LVCREATE``, ``LVRENAME``, ``LVRESIZE``, ``LVREMOVE``,
``LVCHANGE``, ``LVS``) wins; else ``LVM`` names the multi-call binary (``$LVM lvcreate ...``);
else the command name itself. Sizes are bytes (passed to LVM as ``<n>b``).

Inflate/deflate (SM lvhdutil.inflate/deflate; XEN-NOTES.md §1.3): a VHD on an LV keeps its
footer at the end of the LV, so the LV is grown first and the footer then moved to the new end
with ``vhd-util modify -s``; to shrink, the footer moves first and the LV follows. LV sizes are
rounded up to the LV extent (SM: 4 MiB). SM's "full" size of a leaf is
``virtual size + metadata for 2 TiB + bitmaps``, rounded to the extent (``full_size``).

Metadata writes (``lvcreate``, ``lvrename``, ``lvresize``, ``lvremove``, ``lvchange -p``) run
with ``LVM_SYSTEM_DIR`` set to SM's master configuration, ``/etc/lvm/master``
(``$LIVESNAP_LVM_MASTER_DIR`` for tests), when that directory exists. On a XenServer /
XCP-ng host SM's package makes ``/etc/lvm/lvm.conf`` read-only (``metadata_read_only = 1``:
every host shares the SR's volume group, and only the pool master may write its metadata)
and a writable copy in
``/etc/lvm/master`` (sm.spec ``%post``); SM's SR process on the master points
``LVM_SYSTEM_DIR`` there (SR.py ``if dconf["SRmaster"] == "true"``, lvutil.MASTER_LVM_CONF).
livesnap writes LVM metadata only on the master (``XapiDomain.refuse_wrong_host``). Reads and
activation (``lvs``, ``vgs``, ``lvchange -a``) keep the caller's environment, as SM's on-slave
plugin runs them with the read-only default. Without the directory (not an SM host) every
command keeps the caller's environment.

Errors: "not found" -> ``LvNotFound``, "already exists" -> ``LvExists``, "Insufficient free
space" -> ``LvNoSpace`` (a ``livesnap.errors.NoSpace``); others are ``CommandFailed``.
"""
import logging
import os

from livesnap.errors import CommandFailed, InvalidOutput, NoSpace, NotFound, Conflict
from livesnap.tools import runner, vhd_util

log = logging.getLogger(__name__)

MiB = 1 << 20
MASTER_CONF_DIR = "/etc/lvm/master"     # SM: lvutil.MASTER_LVM_CONF
EXTENT = 4 * MiB                  # SM: lvutil.LVM_SIZE_INCREMENT
MSIZE = 2 << 40                   # SM: lvhdutil.MSIZE, metadata preallocated for 2 TiB
VHD_BLOCK = 2 * MiB
FOOTER = 512


class LvNotFound(NotFound):
    fields = ("vg", "lv", "reason")
    msg = "logical volume {self.vg}/{self.lv} not found: {self.reason}"


class LvExists(Conflict):
    fields = ("vg", "lv", "reason")
    msg = "logical volume {self.vg}/{self.lv} already exists: {self.reason}"


class LvNoSpace(NoSpace):
    fields = ("path", "needed", "available", "reason")
    msg = "not enough space in volume group for {self.path} ({self.needed} bytes): {self.reason}"


def _bin(cmd):
    own = runner.binary(cmd.upper(), None)
    if own:
        return [own]
    lvm = runner.binary("LVM", None)
    if lvm:
        return [lvm, cmd]
    return [cmd]


def master_conf_dir():
    """SM's LVM configuration for metadata writes on the pool master, if this host has it."""
    d = os.environ.get("LIVESNAP_LVM_MASTER_DIR") or MASTER_CONF_DIR
    return d if os.path.isdir(d) else None


def _env(write):
    """The environment of an LVM command: a metadata write with ``LVM_SYSTEM_DIR`` at SM's
    master configuration (where there is one), anything else as the caller's."""
    master = master_conf_dir() if write else None
    if master is None:
        return None
    env = dict(os.environ)
    env["LVM_SYSTEM_DIR"] = master
    return env


def _run(cmd, args, vg, lv, size=None, write=True):
    argv = _bin(cmd) + [str(a) for a in args]
    rc, out, err = runner.run_rc(argv, env=_env(write))
    if rc == 0:
        return out
    text = " ".join((err or out).strip().split())
    low = text.lower()
    if "not found" in low or "failed to find" in low:
        e = LvNotFound(vg, lv, text)
    elif "already exists" in low:
        e = LvExists(vg, lv, text)
    elif "insufficient free space" in low or "insufficient suitable" in low:
        e = LvNoSpace("%s/%s" % (vg, lv), size, None, text)
    else:
        raise CommandFailed(argv, rc, out, err)
    e.cmd, e.rc, e.out, e.err = argv, rc, out, err
    raise e


def _size(nbytes):
    if nbytes <= 0 or nbytes % 512:
        raise ValueError("LV size %r must be a positive multiple of 512" % nbytes)
    return "%db" % nbytes


def round_extent(nbytes, extent=EXTENT):
    return -(-nbytes // extent) * extent


def lv_path(vg, lv):
    return os.path.join("/dev", vg, lv)


def lvcreate(vg, lv, size, tag=None, active=True):
    """``lvcreate -n LV -L <size>b [--addtag TAG] [-an] VG`` (size rounded up by LVM)."""
    args = ["-n", lv, "-L", _size(size)]
    if tag:
        args += ["--addtag", tag]
    if not active:
        args += ["-an", "--zero", "n"]
    _run("lvcreate", args + [vg], vg, lv, size)


def lvrename(vg, old, new):
    """``lvrename VG OLD NEW``."""
    _run("lvrename", [vg, old, new], vg, old)


def lvresize(vg, lv, size, allow_shrink=False):
    """``lvresize [-f] -L <size>b VG/LV``; shrinking needs ``allow_shrink`` (passes ``-f``)."""
    args = (["-f"] if allow_shrink else []) + ["-L", _size(size), "%s/%s" % (vg, lv)]
    _run("lvresize", args, vg, lv, size)


def lvremove(vg, lv):
    """``lvremove -f VG/LV``."""
    _run("lvremove", ["-f", "%s/%s" % (vg, lv)], vg, lv)


def set_readonly(vg, lv, readonly=True):
    """``lvchange -p r|rw VG/LV``. LVM refuses (rc 5) a change to the permission the LV
    already has ("... is already writable" / "already read only"): that counts as done."""
    try:
        _run("lvchange", ["-p", "r" if readonly else "rw", "%s/%s" % (vg, lv)], vg, lv)
    except CommandFailed as e:
        if "already" not in (e.err or "") + (e.out or ""):
            raise


def activate(vg, lv, active=True):
    """``lvchange -ay|-an VG/LV``: the LV's device ``/dev/VG/LV`` appears / goes."""
    _run("lvchange", ["-ay" if active else "-an", "%s/%s" % (vg, lv)], vg, lv, write=False)


def add_tag(vg, lv, tag):
    """``lvchange --addtag TAG VG/LV`` (a tag the LV has already: LVM does nothing)."""
    _run("lvchange", ["--addtag", tag, "%s/%s" % (vg, lv)], vg, lv)


def lv_exists(vg, lv):
    """Whether LVM's metadata has ``VG/LV``, active or not (``lvs``)."""
    try:
        lv_size(vg, lv)
        return True
    except LvNotFound:
        return False


def lv_size(vg, lv):
    """``lvs --noheadings --units b --nosuffix -o lv_size VG/LV``: the size in bytes."""
    argv_args = ["--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size", "%s/%s" % (vg, lv)]
    out = _run("lvs", argv_args, vg, lv, write=False)
    text = out.strip()
    try:
        return int(text.split()[0].split(".")[0])
    except (ValueError, IndexError):
        raise InvalidOutput(_bin("lvs") + argv_args, out, "no size")


def lv_tags(vg, lv):
    """``lvs --noheadings -o lv_tags VG/LV``: the LV's tags (LvNotFound when there is none)."""
    out = _run("lvs", ["--noheadings", "-o", "lv_tags", "%s/%s" % (vg, lv)], vg, lv)
    return [t for t in out.strip().split(",") if t]


def vg_extent_size(vg):
    """``vgs --noheadings --units b --nosuffix -o vg_extent_size VG``: the VG's extent, in
    bytes (LVM rounds every LV size up to it)."""
    args = ["--noheadings", "--units", "b", "--nosuffix", "-o", "vg_extent_size", vg]
    out = _run("vgs", args, vg, None)
    try:
        return int(out.strip().split()[0].split(".")[0])
    except (ValueError, IndexError):
        raise InvalidOutput(_bin("vgs") + args, out, "no size")


def vg_free(vg):
    """``vgs --noheadings --units b --nosuffix -o vg_free VG``: free bytes in the VG."""
    args = ["--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", vg]
    out = _run("vgs", args, vg, None, write=False)
    try:
        return int(out.strip().split()[0].split(".")[0])
    except (ValueError, IndexError):
        raise InvalidOutput(_bin("vgs") + args, out, "no size")


def split_path(path, dev_root="/dev"):
    """(vg, lv) of an LV's device path ``/dev/<vg>/<lv>``, else None."""
    parts = os.path.normpath(path).split(os.sep)
    root = os.path.normpath(dev_root).split(os.sep)
    if len(parts) == len(root) + 2 and parts[:len(root)] == root \
            and parts[-2] not in ("", "mapper", "disk", "xen", "sm", "shm", "pts") \
            and not parts[-2].startswith("."):
        return parts[-2], parts[-1]
    return None


# --- VHD on LV ----------------------------------------------------------------------------

def empty_overhead(virtual_size):
    """SM vhdutil.calcOverheadEmpty: footers + header + locators, BAT, batmap (4 KiB-rounded)."""
    size_mb = virtual_size // MiB
    overhead = 3 * 1024 + (size_mb // 2) * 4
    overhead = -(-overhead // 512) * 512
    overhead += (size_mb // 2) // 8
    return -(-overhead // 4096) * 4096


def bitmap_overhead(virtual_size):
    """SM vhdutil.calcOverheadBitmap: one 4 KiB-aligned bitmap per 2 MiB block."""
    return -(-virtual_size // VHD_BLOCK) * 4096


def full_size(virtual_size, max_size=MSIZE, extent=EXTENT):
    """SM lvhdutil.calcSizeVHDLV: the LV size of a fully inflated VHD leaf."""
    return round_extent(virtual_size + empty_overhead(max_size) + bitmap_overhead(virtual_size),
                        extent)


def thin_size(max_size=MSIZE, extent=EXTENT):
    """SM LVHDVDI._snapshot's ``thinpr``: the LV size of an empty VHD whose metadata is
    preallocated for ``max_size`` (a new child not inflated to its full size)."""
    return round_extent(empty_overhead(max_size), extent)


def inflate(vg, lv, path, size=None, extent=EXTENT, vhd=vhd_util):
    """Grow the LV to ``size`` (default: ``full_size`` of the VHD's virtual size), rounded to
    ``extent``, then move the VHD footer to the new end. No-op when the LV (its device,
    ``path``) is big enough. Returns the LV size.

    ``vhd`` reads and moves the footer: ``vhd-util`` (``query -v``/``-s``, ``modify -s``) by
    default; anything with the same ``virtual_size``, ``physical_size`` and
    ``set_physical_size`` functions (the datapath passes the in-process VHD engine)."""
    if size is None:
        size = full_size(vhd.virtual_size(path), extent=extent)
    new = round_extent(size, extent)
    cur = device_size(path)
    if new <= cur:
        return cur
    lvresize(vg, lv, new)
    _zero(path, new - FOOTER, FOOTER)            # SM: util.zeroOut of the new footer sector
    vhd.set_physical_size(path, new)
    return new


def deflate(vg, lv, path, size=None, extent=EXTENT, vhd=vhd_util):
    """Shrink the LV to ``size`` (default: the VHD's physical size), rounded up to ``extent``:
    first move the footer (``vhd-util modify -s``), then ``lvresize -f``. No-op when the LV
    (its device, ``path``) is not bigger. Returns the LV size. ``vhd`` as for ``inflate``."""
    if size is None:
        size = vhd.physical_size(path)
    new = round_extent(size, extent)
    cur = device_size(path)
    if new >= cur:
        return cur
    vhd.set_physical_size(path, new)
    lvresize(vg, lv, new, allow_shrink=True)
    return new


def device_size(path):
    """The size of the LV as its device shows it (what the VHD footer's place follows)."""
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


def _zero(path, offset, length):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.lseek(fd, offset, os.SEEK_SET)
        os.write(fd, b"\0" * length)
    finally:
        os.close(fd)
