"""cbt-util, blktap's tool for changed-block-tracking logs (binary chosen by ``CBT_UTIL``;
SM runs ``/usr/sbin/cbt-util``, drivers/constants.py), one function per verb, with the
arguments SM's drivers/cbtutil.py gives it.

A CBT log (``<vdi uuid>.cbtlog`` beside the VDIs of a file SR) is a header (parent log uuid,
child log uuid, consistency flag, disk size in bytes) and a bitmap of 64 KiB blocks that
tapdisk sets as the guest writes (blktap drivers/block-log.c, the log opened with
``tap-ctl create -C`` / ``unpause -c``). The logs of one disk form a chain through their
parent and child uuids: a snapshot VDI's log holds the blocks written between the snapshot
before it and itself, the leaf's log those written since the last snapshot. A null uuid
(``00000000-...``) means none; ``get_parent``/``get_child`` give it as it is, as SM's do.

Exit codes are errnos (EINVAL for a usage error, whose text goes to stdout; ENOENT for a missing
log): every failure is ``CbtUtilError`` carrying the command, its rc and its last lines.
"""
import logging

from livesnap.errors import DatapathError, InvalidOutput
from livesnap.tools import runner

log = logging.getLogger(__name__)

NULL_UUID = "00000000-0000-0000-0000-000000000000"
BLOCK_SIZE = 64 * 1024          # CBT_BLOCK_SIZE (blktap include/cbt-util.h, SM constants.py)


class CbtUtilError(DatapathError):
    fields = ("path", "reason")
    msg = "cbt-util failed on CBT log {self.path}: {self.reason}"
    cmd = None
    rc = None


def _bin():
    return runner.binary("CBT_UTIL", "cbt-util")


def _run(path, args):
    argv = [_bin()] + list(args)
    rc, out, err = runner.run_rc(argv)
    if rc != 0:
        text = " ".join((err or out or "(no output)").strip().splitlines()[-3:])
        e = CbtUtilError(path, "%s: rc=%s: %s" % (args[0], rc, text))
        e.cmd, e.rc = argv, rc
        raise e
    return out


def create(path, size):
    """``cbt-util create -n PATH -s SIZE``: a new log for a disk of ``size`` bytes, every block
    clear, null parent and child, not consistent (SM then sets the flag)."""
    _run(path, ["create", "-n", path, "-s", str(int(size))])


def _get(path, flag):
    argv_flag = {"parent": "-p", "child": "-c", "consistent": "-f", "size": "-s"}[flag]
    out = _run(path, ["get", "-n", path, argv_flag]).strip()
    if not out:
        raise InvalidOutput([_bin(), "get", "-n", path, argv_flag], out, "empty")
    return out


def get_parent(path):
    return _get(path, "parent")


def get_child(path):
    return _get(path, "child")


def get_consistent(path):
    out = _get(path, "consistent")
    try:
        return bool(int(out))
    except ValueError:
        raise InvalidOutput([_bin(), "get", "-n", path, "-f"], out, "not a number")


def get_size(path):
    out = _get(path, "size")
    try:
        return int(out)
    except ValueError:
        raise InvalidOutput([_bin(), "get", "-n", path, "-s"], out, "not a number")


def set_(path, parent=None, child=None, consistent=None):
    """``cbt-util set -n PATH [-p PARENT] [-c CHILD] [-f 0|1]``: one call for the fields
    given (SM sets one per call; the header is rewritten as a whole either way)."""
    args = ["set", "-n", path]
    if parent is not None:
        args += ["-p", str(parent)]
    if child is not None:
        args += ["-c", str(child)]
    if consistent is not None:
        args += ["-f", "1" if consistent else "0"]
    if len(args) == 3:
        raise ValueError("cbt_util.set_ needs a field to set")
    _run(path, args)


def coalesce(parent_path, child_path):
    """``cbt-util coalesce -p PARENT -c CHILD``: the parent log's blocks ORed into the child
    log's bitmap (the child's file is rewritten: no tapdisk may have it open meanwhile)."""
    _run(child_path, ["coalesce", "-p", parent_path, "-c", child_path])
