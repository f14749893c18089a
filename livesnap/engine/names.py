"""What new image paths may be: one the file system (or LVM) can hold, checked before an
operation is journaled (``path_problem``). The rules for snapshot names and descriptions
are in ``livesnap.text``.
"""
import os
import re

from livesnap.text import UNPRINTABLE_RE, printable

# -- new image paths -----------------------------------------------------------------------

LV_NAME_MAX = 127
LV_NAME_RE = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*\Z")
# what LVM keeps for its own volumes (lvcreate refuses these names; checked with LVM 2.03)
LV_RESERVED_PREFIXES = ("snapshot", "pvmove")
LV_RESERVED_PARTS = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig",
                     "_mimage", "_mlog", "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta",
                     "_vdata", "_vorigin", "_wcorig")


def _room_for_trash():
    """Bytes a file name needs beyond itself: an image is renamed to its trash name
    (``.<name>.livesnap-free``) when it is freed in the background."""
    from livesnap.datapaths.trash import SUFFIX
    return len(b".") + len(SUFFIX.encode())


def _pathconf(directory, name, default):
    try:
        return os.pathconf(directory, name)
    except (OSError, ValueError):
        return default


def path_problem(path):
    """Why an image cannot be created at ``path`` whatever the state of the host (its name
    is too long for the file system or LVM, or holds characters no tool can take), or None.
    These paths can never exist: a journaled step that needs one cannot be carried out."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return "it is not an absolute path"
    bad = UNPRINTABLE_RE.search(path)
    if bad:
        return "it contains the control character U+%04X" % ord(bad.group())
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        return "it cannot be encoded for the file system"
    from livesnap.tools import lvm
    lv = lvm.split_path(path)
    if lv is not None:
        name = lv[1]
        if len(name) > LV_NAME_MAX:
            return ("its LV name is %d characters long; LVM allows at most %d"
                    % (len(name), LV_NAME_MAX))
        if not LV_NAME_RE.match(name) or name in (".", ".."):
            return "%r is not a name LVM allows for an LV" % name
        reserved = [r for r in LV_RESERVED_PARTS if r in name] + [
            r for r in LV_RESERVED_PREFIXES if name.startswith(r)]
        if reserved:
            return "%r holds %r, which LVM keeps for its own volumes" % (name, reserved[0])
        return None
    directory, base = os.path.split(raw)
    extra = _room_for_trash()
    name_max = _pathconf(directory if os.path.isdir(directory) else b"/", "PC_NAME_MAX", 255)
    path_max = _pathconf(directory if os.path.isdir(directory) else b"/", "PC_PATH_MAX", 4096)
    if len(base) + extra > name_max:
        return ("its file name is %d bytes long; image names in %s may be at most %d bytes "
                "(%d the file system allows, less %d for livesnap's trash name)"
                % (len(base), printable(os.fsdecode(directory)), name_max - extra, name_max,
                   extra))
    if len(raw) + extra >= path_max:
        return ("it is %d bytes long; paths may be at most %d bytes (PATH_MAX %d, less %d "
                "for livesnap's trash name)" % (len(raw), path_max - extra - 1, path_max,
                                                 extra))
    return None


def place_problem(path):
    """Why an image cannot be created at ``path`` on this host now (its directory is missing
    or not writable), or None. Not for LV paths (LVM makes their device nodes)."""
    from livesnap.tools import lvm
    if lvm.split_path(path) is not None:
        return None
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        return "its directory %s does not exist" % printable(directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        return "its directory %s is not writable" % printable(directory)
    return None


def new_paths(steps, existing=()):
    """Every image path ``steps`` create or rename an image to (paths in ``existing``, the
    tree's images before the plan, are not new), in order, without repeats."""
    out = []
    existing = set(existing)

    def add(p):
        if p and p not in existing and p not in out:
            out.append(p)
    for step in steps:
        op = step["op"]
        if op == "snapshot":
            for it in step["items"]:
                add(it["frozen_path"])
                add(it["leaf_path"])
                add(it.get("face_path"))
        elif op == "internal_snapshot":
            add(step["frozen_path"])
            add(step["leaf_path"])
        elif op == "new_leaf":
            add(step["leaf_path"])
        elif op == "keep_leaf":
            add(step.get("kept_path"))
        elif op == "clone":
            add(step["frozen_path"])
        elif op == "fold":
            add(step.get("spare_path"))
    return out
