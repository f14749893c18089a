"""Changed-block tracking in the test bed, as SM 3.2.12 does it (drivers/VDI.py, cbtutil.py)
with the real cbt-util (testxen/blktap.py) and the real tapdisk's log driver:

* ``enable(log, size)``: SM's ``_create_cbt_log`` (``cbt-util create``, then consistent);
* ``activate(log)``: SM's ``VDI.activate`` before tapdisk opens the VDI: the log marked not
  consistent (tapdisk will have it open); the tapdisk is then started with ``-C log``;
* ``header(log)``: parent, child, consistent, size as ``cbt-util get`` prints them;
* ``blocks(log)``: the set of 64 KiB block numbers whose bit is set (``cbt-util get -b``,
  read as SM reads it: bitarray of the bytes, ``bytereverse``: bit j of byte i is block
  8 i + j, as tapdisk's ``set_bit`` on little-endian longs leaves it);
* ``changed_blocks(sr_dir, vdi_from, vdi_to)``: SM's ``VDI.list_changed_blocks`` loop: from
  the log after ``vdi_from``, through child uuids, OR every bitmap up to ``vdi_to``'s;
  ``Unrelated`` when the chain ends first (SM: CBTChangedBlocksError).
"""
import os
import subprocess

from testxen import blktap

BLOCK = 64 * 1024
NULL = "00000000-0000-0000-0000-000000000000"


class Unrelated(Exception):
    pass


def log_path(sr_dir, vdi_uuid):
    return os.path.join(sr_dir, vdi_uuid + ".cbtlog")


def _cbt(*args):
    rc, out, err = blktap.cbt_util(*args)
    assert rc == 0, (args, rc, out, err)
    return out.strip()


def enable(log, size):
    _cbt("create", "-n", log, "-s", str(size))
    _cbt("set", "-n", log, "-f", "1")


def activate(log):
    _cbt("set", "-n", log, "-f", "0")


def deactivate(log):
    _cbt("set", "-n", log, "-f", "1")


def _readable(log):
    """An LV log (SM leaves a detached VDI's inactive) is activated to be read."""
    from livesnap.tools import lvm
    if not os.path.exists(log) and lvm.split_path(log):
        lvm.activate(*lvm.split_path(log))


def header(log):
    _readable(log)
    return {"parent": _cbt("get", "-n", log, "-p"), "child": _cbt("get", "-n", log, "-c"),
            "consistent": _cbt("get", "-n", log, "-f") == "1",
            "size": int(_cbt("get", "-n", log, "-s"))}


def blocks(log):
    _readable(log)
    p = subprocess.run([blktap.cbt_util_bin(), "get", "-n", log, "-b"], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == 0, p.stderr
    return {8 * i + j for i, byte in enumerate(p.stdout) for j in range(8) if byte >> j & 1}


def _exists(log):
    from livesnap.tools import lvm
    if os.path.exists(log):
        return True
    return bool(lvm.split_path(log)) and lvm.lv_exists(*lvm.split_path(log))


def changed_blocks(sr_dir, vdi_from, vdi_to):
    if vdi_from == vdi_to:
        raise ValueError("Source and target VDI are same")
    merged = None
    curr = vdi_from
    while True:
        nxt = header(log_path(sr_dir, curr))["child"]
        if not _exists(log_path(sr_dir, nxt)):
            raise Unrelated("%s and %s: the chain ends at %s" % (vdi_from, vdi_to, curr))
        curr = nxt
        bits = blocks(log_path(sr_dir, curr))
        merged = bits if merged is None else merged | bits
        if curr == vdi_to:
            return merged
