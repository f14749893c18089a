"""qemu-img, one function per verb (binary overridable by ``QEMU_IMG``).

Failures to open an image (corrupt header, missing backing file, a backing loop) become
``BadImage``; every other failure is the runner's ``CommandFailed``.
"""
import json
import logging
import os
import stat

from livesnap.errors import BadImage, CommandFailed, InvalidOutput
from livesnap.tools import runner

log = logging.getLogger(__name__)


def _bin():
    return runner.binary("QEMU_IMG", "qemu-img")


def _open_error(path, e):
    return BadImage(path, (e.err or e.out).strip().replace("qemu-img: ", "") or "cannot open")


def _json(argv, path):
    """Run a qemu-img command with JSON output on image ``path``; its parsed output."""
    try:
        out = runner.run(argv)
    except CommandFailed as e:
        raise _open_error(path, e)
    try:
        return json.loads(out)
    except ValueError as e:
        raise InvalidOutput(argv, out, str(e))


def info(path, backing_chain=False, force_share=False):
    """``qemu-img info --output=json``: a dict, or a list of dicts (leaf first) for the chain."""
    argv = [_bin(), "info", "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("-U")
    argv.append(path)
    data = _json(argv, path)
    for entry in (data if backing_chain else [data]):
        for key in ("filename", "format", "virtual-size"):
            if key not in entry:
                raise InvalidOutput(argv, json.dumps(data), "no %r" % key)
    return data


def backing_path(entry, image_path):
    """The absolute path of an info entry's backing file, or None."""
    return resolve_backing(entry.get("full-backing-filename") or entry.get("backing-filename"),
                           image_path)


def resolve_backing(name, image_path):
    """A backing file name as an image records it, as an absolute path (a relative one is
    relative to the image's directory, as QEMU opens it), or None."""
    if not name:
        return None
    if not os.path.isabs(name):
        name = os.path.join(os.path.dirname(os.path.abspath(image_path)), name)
    return os.path.normpath(name)


def create(path, fmt="qcow2", size=None, backing=None, backing_fmt=None):
    """Create an image readable and writable by its owner only (mode 0600: qemu-img creates
    it under umask 077; an empty file already at ``path`` keeps its mode)."""
    argv = [_bin(), "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
    argv.append(path)
    if size is not None:
        argv.append(str(size))
    old = os.umask(0o077)
    try:
        runner.run(argv)
    except CommandFailed as e:
        if backing is not None and ("Could not open" in e.err or "backing" in e.err):
            raise _open_error(backing, e)
        raise
    finally:
        os.umask(old)


def bitmaps(path):
    """The persistent dirty bitmaps of a qcow2 image: [{"name", "granularity", "flags"}]
    (``qemu-img info``'s format-specific data; [] for other formats)."""
    data = info(path, force_share=True)
    specific = (data.get("format-specific") or {}).get("data") or {}
    return list(specific.get("bitmaps") or [])


def bitmap_add(path, name, granularity=None, disabled=False):
    """Add an empty persistent dirty bitmap (enabled unless ``disabled``) to a qcow2 image
    not in use."""
    argv = [_bin(), "bitmap", "--add"]
    if granularity:
        argv += ["-g", str(granularity)]
    if disabled:
        argv.append("--disable")
    runner.run(argv + [path, name])


def bitmap_merge(path, name, source, source_name=None, source_fmt="qcow2", add=False,
                 granularity=None, disabled=False):
    """Merge the bitmap ``source_name`` (default ``name``) of the image ``source`` into the
    bitmap ``name`` of ``path``, a qcow2 image not in use: the union of the two. With
    ``add``, the bitmap is added first (``granularity``, ``disabled`` as ``bitmap_add``),
    in the same command: qemu-img writes the bitmaps when it closes the image, so a command
    that does not finish leaves no empty bitmap behind."""
    argv = [_bin(), "bitmap"]
    if add:
        argv.append("--add")
        if granularity:
            argv += ["-g", str(granularity)]
    argv += ["--merge", source_name or name, "-b", source, "-F", source_fmt]
    if add and disabled:
        argv.append("--disable")
    runner.run(argv + [path, name])


def allocated(path, fmt="qcow2", force_share=False):
    """[(offset, length)] of the areas an image holds itself, data or zeroes, leaving its
    backing file out (``qemu-img map`` of the image opened without one; on a block device,
    an LV, through QEMU's ``host_device`` driver). ``force_share``: ``-U``, an image a QEMU
    has open."""
    proto = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
    spec = {"driver": fmt, "backing": None, "file": {"driver": proto, "filename": path}}
    argv = [_bin(), "map", "--output=json"] + (["-U"] if force_share else []) + [
        "json:" + json.dumps(spec)]
    extents = _json(argv, path)
    found = []
    for e in extents:
        if not e.get("present", True):      # (a qemu-img without "present": all of it)
            continue
        if found and found[-1][0] + found[-1][1] == e["start"]:
            found[-1] = (found[-1][0], found[-1][1] + e["length"])
        else:
            found.append((e["start"], e["length"]))
    return found


def commit(top, base):
    """Copy ``top``'s data into ``base`` (an ancestor of top); top is left as it was."""
    runner.run([_bin(), "commit", "-q", "-b", base, top])


def rebase(path, backing, backing_fmt=None, unsafe=False):
    """Change ``path``'s backing file; without ``unsafe`` the data that would change is copied
    into ``path`` first (a pull). ``backing=None`` makes the image stand alone."""
    argv = [_bin(), "rebase", "-q"]
    if unsafe:
        argv.append("-u")
    argv += ["-b", backing or ""]
    if backing:
        argv += ["-F", backing_fmt or "qcow2"]
    argv.append(path)
    runner.run(argv)


def measure(path=None, out_fmt="qcow2", size=None):
    """``qemu-img measure``: {"required": bytes, "fully-allocated": bytes} of converting
    ``path`` to ``out_fmt``, or of a new ``out_fmt`` image of ``size`` bytes."""
    argv = [_bin(), "measure", "--output=json", "-O", out_fmt]
    argv += ["--size", str(size)] if size is not None else [path]
    out = runner.run(argv)
    try:
        return json.loads(out)
    except ValueError as e:
        raise InvalidOutput(argv, out, str(e))


def check(path, force_share=False):
    """``qemu-img check``: the parsed report; corruption raises ``BadImage``, leaks (rc 3) only
    warn, as vdsm does. ``force_share``: ``-U``, an image a QEMU has open."""
    argv = [_bin(), "check", "--output=json"] + (["-U"] if force_share else []) + [path]
    rc, out, err = runner.run_rc(argv)
    if rc == 3:
        log.warning("%s has leaked clusters (harmless): %s", path, out.strip())
    elif rc != 0:
        raise BadImage(path, (err or out).strip() or "check failed with rc=%d" % rc)
    try:
        return json.loads(out)
    except ValueError as e:
        raise InvalidOutput(argv, out, str(e))


def compare(a, b, force_share=True):
    """True when the two images read the same (``qemu-img compare``; rc 1 = differ)."""
    argv = [_bin(), "compare", "-q"]
    if force_share:
        argv.append("-U")
    argv += [a, b]
    rc, out, err = runner.run_rc(argv)
    if rc == 0:
        return True
    if rc == 1:
        return False
    raise CommandFailed(argv, rc, out, err)
