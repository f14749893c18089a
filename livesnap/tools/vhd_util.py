"""vhd-util, one function per verb the datapath needs (binary chosen by ``VHD_UTIL``).

``VHD_UTIL`` may name a binary or a command line (split like a shell would, e.g.
``"livesnap vhd"``). Unset: ``vhd-util`` when it is on PATH, else livesnap's own compatible
command, ``python -m livesnap.vhd``.

Output formats (VHD-FORMAT.md §2): ``query -v`` virtual MiB (floored), ``-s`` physical bytes,
``-p`` the parent path or "<name> has no parent", ``-f`` "hidden: N", ``-d`` "chain depth: N";
``check`` prints problems then "<name> appears invalid; dumping metadata" (rc EINVAL) or
"<name> is valid". Exit codes are positive errnos; the known ones become::

    livesnap.errors.BadImage
     +-- VhdUtilError         any known vhd-util failure (path, reason; cmd, rc, out, err)
          +-- VhdUtilNotFound     ENOENT: the file or a parent does not exist
          +-- VhdUtilInvalid      EINVAL: not a valid VHD / not allowed on this VHD
          +-- VhdUtilRange        ERANGE: child bigger than parent, size out of range
          +-- VhdUtilNoSpace      ENOSPC: snapshot -l limit exceeded, or no space left
          +-- VhdUtilNameTooLong  ENAMETOOLONG: the parent path does not fit the locator
          +-- VhdUtilLoop         ELOOP: the parent chain loops
          +-- VhdUtilIOError      EIO

Other exit codes raise the runner's ``CommandFailed``.
"""
import collections
import errno
import logging
import shlex
import shutil
import sys

from livesnap.errors import BadImage, CommandFailed, InvalidOutput
from livesnap.tools import runner

log = logging.getLogger(__name__)
MiB = 1 << 20


class VhdUtilError(BadImage):
    fields = ("path", "reason")
    msg = "vhd-util failed on {self.path}: {self.reason}"
    cmd = None
    rc = None
    out = ""
    err = ""


class VhdUtilNotFound(VhdUtilError):
    pass


class VhdUtilInvalid(VhdUtilError):
    pass


class VhdUtilRange(VhdUtilError):
    pass


class VhdUtilNoSpace(VhdUtilError):
    pass


class VhdUtilNameTooLong(VhdUtilError):
    pass


class VhdUtilLoop(VhdUtilError):
    pass


class VhdUtilIOError(VhdUtilError):
    pass


ERRORS = {errno.ENOENT: VhdUtilNotFound, errno.EINVAL: VhdUtilInvalid,
          errno.ERANGE: VhdUtilRange, errno.ENOSPC: VhdUtilNoSpace,
          errno.ENAMETOOLONG: VhdUtilNameTooLong, errno.ELOOP: VhdUtilLoop,
          errno.EIO: VhdUtilIOError}

Query = collections.namedtuple("Query", "virtual_size physical_size parent hidden depth")
Query.__doc__ = """``query -v -s -p -f -d``: virtual size in bytes (from MiB, floored by
vhd-util), physical size in bytes, parent path or None, hidden (bool), chain depth."""


def command():
    """The vhd-util command line as a list."""
    env = runner.binary("VHD_UTIL", None)
    if env:
        return shlex.split(env)
    if shutil.which("vhd-util"):
        return ["vhd-util"]
    return [sys.executable, "-m", "livesnap.vhd"]


def _run(verb, path, args):
    argv = command() + [verb, "-n", path] + [str(a) for a in args]
    rc, out, err = runner.run_rc(argv)
    if rc == 0:
        return out
    cls = ERRORS.get(rc)
    if cls is None:
        raise CommandFailed(argv, rc, out, err)
    text = (err or out or "").strip()
    reason = "%s (rc=%d %s)" % (" ".join(text.splitlines()[-3:]) or "(no output)", rc,
                                errno.errorcode.get(rc, ""))
    e = cls(path, reason)
    e.cmd, e.rc, e.out, e.err = argv, rc, out, err
    raise e


# --- verbs --------------------------------------------------------------------------------

def create(path, size_mib, max_size_mib=None, reserve=False):
    """``create -n PATH -s MiB [-S MiB] [-r]``."""
    args = ["-s", int(size_mib)]
    if max_size_mib:
        args += ["-S", int(max_size_mib)]
    if reserve:
        args.append("-r")
    _run("create", path, args)


def snapshot(path, parent, limit=None, raw_parent=False, max_size_mib=None, link_empty=False):
    """``snapshot -n PATH -p PARENT [-l LIMIT] [-m] [-S MiB] [-e]``; returns the parent the child
    really got (vhd-util skips empty differencing parents unless ``link_empty``)."""
    args = ["-p", parent]
    if limit is not None:
        args += ["-l", int(limit)]
    if raw_parent:
        args.append("-m")
    if max_size_mib:
        args += ["-S", int(max_size_mib)]
    if link_empty:
        args.append("-e")
    _run("snapshot", path, args)
    return None if raw_parent else parent_of(path)


def parse_query(argv, out, flags):
    """Parse ``query`` output for ``flags`` (a string of the letters v s p f d), in vhd-util's
    print order: -v, -s, -p, -f, -d. Returns a dict of the fields found."""
    lines = [l for l in out.splitlines() if l.strip()]
    res = {}
    i = 0

    def take(what):
        if i >= len(lines):
            raise InvalidOutput(argv, out, "no line for %s" % what)
        return lines[i].strip()

    try:
        if "v" in flags:
            res["virtual_size"] = int(take("-v")) * MiB
            i += 1
        if "s" in flags:
            text = take("-s")
            if text.startswith("failed"):
                raise InvalidOutput(argv, out, text)
            res["physical_size"] = int(text)
            i += 1
        if "p" in flags:
            text = lines[i].rstrip("\n") if i < len(lines) else take("-p")
            res["parent"] = None if text.endswith(" has no parent") else text.strip()
            if text.startswith("query failed") or text.startswith("error"):
                raise InvalidOutput(argv, out, text)
            i += 1
        if "f" in flags:
            text = take("-f")
            if not text.startswith("hidden: "):
                raise InvalidOutput(argv, out, "expected 'hidden: N', got %r" % text)
            res["hidden"] = bool(int(text.split(":", 1)[1]))
            i += 1
        if "d" in flags:
            text = take("-d")
            if not text.startswith("chain depth: "):
                raise InvalidOutput(argv, out, "expected 'chain depth: N', got %r" % text)
            res["depth"] = int(text.split(":", 1)[1])
            i += 1
    except ValueError as e:
        raise InvalidOutput(argv, out, str(e))
    return res


def _query(path, flags):
    args = ["-" + f for f in flags]
    out = _run("query", path, args)
    return parse_query(command() + ["query", "-n", path] + args, out, flags)


def query(path):
    """``query -v -s -p -f -d`` as a ``Query``."""
    r = _query(path, "vspfd")
    return Query(r["virtual_size"], r["physical_size"], r["parent"], r["hidden"], r["depth"])


def virtual_size(path):
    """Virtual size in bytes (vhd-util reports whole MiB)."""
    return _query(path, "v")["virtual_size"]


def physical_size(path):
    return _query(path, "s")["physical_size"]


def parent_of(path):
    """The parent's path (as vhd-util resolves it), or None for a dynamic disk."""
    return _query(path, "p")["parent"]


def hidden(path):
    return _query(path, "f")["hidden"]


def depth(path):
    return _query(path, "d")["depth"]


def parse_check(name, out):
    """The problems ``check`` printed (before "appears invalid"); [] when "is valid"."""
    problems = []
    for line in out.splitlines():
        if line.strip().endswith("is valid") and not problems:
            return []
        if "appears invalid" in line:
            return problems
        if line.strip():
            problems.append(line.strip())
    return problems


def check(path, ignore_missing_footer=False, ignore_parent_uuid=False, ignore_time=False,
          fast=False, parents=False):
    """``check -n PATH [-i] [-I] [-t] [-B] [-p]``: [] when valid, else the problems."""
    args = []
    for flag, on in (("-i", ignore_missing_footer), ("-I", ignore_parent_uuid),
                     ("-t", ignore_time), ("-B", fast), ("-p", parents)):
        if on:
            args.append(flag)
    argv = command() + ["check", "-n", path] + args
    rc, out, err = runner.run_rc(argv)
    if rc == 0:
        return []
    if rc == errno.EINVAL and "invalid" in out:
        return parse_check(path, out) or ["%s appears invalid" % path]
    if rc in ERRORS:
        e = ERRORS[rc](path, (err or out).strip() or "check failed with rc=%d" % rc)
        e.cmd, e.rc, e.out, e.err = argv, rc, out, err
        raise e
    raise CommandFailed(argv, rc, out, err)


def coalesce(path, sparse=False):
    """``coalesce -n PATH [-s]``: merge PATH's data into its immediate parent; returns the
    number of sectors coalesced when vhd-util reports it, else None."""
    out = _run("coalesce", path, ["-s"] if sparse else [])
    for line in out.splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "Coalesced" and words[1].isdigit():
            return int(words[1])
    return None


def set_parent(path, parent, raw=False):
    """``modify -n PATH -p PARENT [-m]``: reparent (sets prt_uuid from PARENT's footer)."""
    _run("modify", path, ["-p", parent] + (["-m"] if raw else []))


def set_physical_size(path, nbytes):
    """``modify -n PATH -s BYTES``: move the footer to BYTES-512 (inflate/deflate on LVM)."""
    _run("modify", path, ["-s", int(nbytes)])


def set_hidden(path, value=True):
    """``set -n PATH -f hidden -v 0|1``."""
    _run("set", path, ["-f", "hidden", "-v", 1 if value else 0])


def repair(path, use_backup=False):
    """``repair -n PATH [-b]``: rewrite the primary footer at the end of data."""
    _run("repair", path, ["-b"] if use_backup else [])


def resize(path, size_mib, journal=None, fast=False):
    """``resize -n PATH -s MiB (-j JOURNAL | -f)``: grow the virtual size (offline)."""
    if not journal and not fast:
        raise ValueError("resize needs a journal or fast=True")
    args = ["-s", int(size_mib)]
    args += ["-f"] if fast else ["-j", journal]
    _run("resize", path, args)
