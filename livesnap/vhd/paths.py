"""Paths as blktap's libvhd sees them: what a parent locator holds and how it is resolved.

libvhd (blktap ``vhd/lib/canonpath.c``, ``relative-path.c``, ``libvhd.c``):

* ``canonpath(path)``: a path one level under ``/dev/`` (``/dev/<vg>/<lv>``, an LV's device
  link) is replaced by its device-mapper name ``/dev/mapper/<vg>-<lv>`` with every ``-`` of
  the VG and LV names doubled (``VG_XenStorage-<sr>/VHD-<vdi>`` ->
  ``VG_XenStorage--<sr>-VHD--<vdi>``), if that exists; a ``/dev/mapper/<name>`` path is kept as
  it is; anything else is ``realpath``-ed (symlinks followed).
* A new child's locators hold the path from ``dirname(canonpath(child))`` to
  ``canonpath(parent)``, ``./``-prefixed (``vhd_parent_locator_write_at``, ``relative_path_to``),
  and its header's parent name is ``basename(canonpath(parent))``. So SM's ``vhd-util snapshot``
  on a host writes ``./VG_XenStorage--<sr>-VHD--<parent>`` into an LVHD child.
* A relative locator is resolved against ``dirname(canonpath(child))`` (``vhd_find_parent``):
  for an LVHD child that is ``/dev/mapper``, whatever name the child was opened by.

livesnap writes the same bytes. One difference, on purpose: the device-mapper spelling of an
LV path is used whether or not ``/dev/mapper/<name>`` exists where livesnap runs (libvhd would
fall back to ``realpath``, e.g. ``/dev/loopN`` or ``/dev/dm-N``, a name that does not survive a
reboot), and livesnap resolves such a locator of an LV child to the LV path
``/dev/<vg>/<lv>`` (which needs no active device: the chain of an inactive VDI can be walked).
Images livesnap names by their LV path (``/dev/<vg>/<lv>``) stay so named, never by their
``/dev/mapper`` name.
"""
import os

DEV = "/dev/"
MAPPER = "/dev/mapper/"
# /dev/<dir>/<name> paths that are not LV device links
NOT_VG = ("mapper", "disk", "xen", "sm", "shm", "pts", "drbd", "net", "cpu", "fd", "mqueue",
          "hugepages", "input", "snd", "dri", "bus", "char", "block", "vfio", "md")


def mapper_name(vg, lv):
    """The device-mapper name of LV ``lv`` of VG ``vg`` (every ``-`` doubled, ``-`` between)."""
    return "%s-%s" % (vg.replace("-", "--"), lv.replace("-", "--"))


def split_mapper_name(name):
    """(vg, lv) of a device-mapper name made by ``mapper_name``, else None."""
    i = 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1:i + 2] == "-":
                i += 2
                continue
            vg, lv = name[:i].replace("--", "-"), name[i + 1:].replace("--", "-")
            if vg and lv and mapper_name(vg, lv) == name:
                return vg, lv
            return None
        i += 1
    return None


def lv_of(path):
    """(vg, lv) of ``/dev/<vg>/<lv>`` or ``/dev/mapper/<vg>-<lv>``, else None (lexical)."""
    p = os.path.normpath(os.path.abspath(path))
    if not p.startswith(DEV):
        return None
    parts = p[len(DEV):].split("/")
    if len(parts) != 2:
        return None
    if parts[0] == "mapper":
        return split_mapper_name(parts[1])
    if parts[0] in NOT_VG or parts[0].startswith(".") or not parts[1]:
        return None
    return parts[0], parts[1]


def lv_path(path):
    """The ``/dev/<vg>/<lv>`` spelling of an LV path (either spelling), else None."""
    vg_lv = lv_of(path)
    return None if vg_lv is None else os.path.join(DEV, vg_lv[0], vg_lv[1])


def canonpath(path):
    """libvhd's canonpath (see the module docstring): the name libvhd resolves locators by."""
    p = os.path.normpath(os.path.abspath(path))
    if p.startswith(MAPPER) and "/" not in p[len(MAPPER):]:
        return p
    vg_lv = lv_of(p)
    if vg_lv is not None:
        return MAPPER + mapper_name(*vg_lv)
    return os.path.realpath(p)


def relative_path(child_path, parent_path):
    """The text of a new child's parent locators (libvhd's relative_path_to over canonpaths)."""
    rel = os.path.relpath(canonpath(parent_path), os.path.dirname(canonpath(child_path)))
    if not rel.startswith("../"):
        rel = "./" + rel
    return rel


def parent_name(parent_path):
    """The parent name a new child's header records: ``basename(canonpath(parent))``."""
    return os.path.basename(canonpath(parent_path))


def resolve(child_path, text):
    """Where locator ``text`` of the image at ``child_path`` points (libvhd's vhd_find_parent),
    spelled as livesnap names images; whether it exists or not.

    An absolute text is itself. A relative one is taken from ``dirname(canonpath(child))``; an
    LV found so is named ``/dev/<vg>/<lv>``, and so is a device-mapper name in a locator of an
    image on a device that libvhd reached by another name; a file is named through the
    child's own directory when that is the same file (``/var/run/...`` stays
    ``/var/run/...``), else as libvhd reaches it."""
    if os.path.isabs(text):
        text = os.path.normpath(text)
        return (lv_path(text) if text.startswith(MAPPER) else None) or text
    cdir = os.path.dirname(canonpath(child_path))
    where = os.path.normpath(os.path.join(cdir, text))
    lv = lv_path(where) if where.startswith(MAPPER) else None
    if lv is None and (cdir + "/").startswith(DEV) and "/" not in os.path.normpath(text):
        # a device-mapper name next to an image on a device reached by another name
        # (/dev/dm-N, a loop device): that LV
        vg_lv = split_mapper_name(os.path.normpath(text))
        lv = None if vg_lv is None else os.path.join(DEV, vg_lv[0], vg_lv[1])
    if lv is not None:
        return lv
    mine = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(child_path)), text))
    if mine != where:
        try:
            if os.path.samefile(mine, where):
                return mine
        except OSError:
            pass
    return where
