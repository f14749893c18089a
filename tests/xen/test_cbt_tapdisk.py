"""tapdisk's CBT log across a pause (blktap drivers/tapdisk-control.c
``tapdisk_control_resume_vbd``): a tapdisk started with its log (``tap-ctl create -C``, as SM
attaches a VDI with CBT on) keeps recording writes after an unpause only when the unpause names
the log (``-c``, what SM's tapdisk-pause passes and livesnap's ``tap_ctl.paused(cbtlog=)``);
an unpause without it drops the log, so every later write goes unrecorded (the next
incremental backup misses them). Also livesnap's cbt-util wrapper on the real tool."""

import pytest

from livesnap.tools import cbt_util, tap_ctl
from testxen import blktap, cbt, nbd

MiB = 1 << 20


def _tracked(xen, tmp_path):
    path = str(tmp_path / "disk.vhd")
    blktap.create(path, 8 * MiB)
    log = str(tmp_path / "disk.cbtlog")
    cbt.enable(log, 8 * MiB)
    cbt.activate(log)
    pid, minor = xen.tapdisks.create(path, guest=False, cbtlog=log)
    return path, log, tap_ctl.get(pid, minor)


def _write(td, block):
    with nbd.Client(blktap.nbd_socket(td.pid, td.minor), timeout=60) as c:
        c.write(block * cbt.BLOCK, b"\x5a" * 4096)


@pytest.mark.parametrize("how", ["paused", "unpause"])
def test_an_unpause_naming_the_log_keeps_it_one_without_drops_it(xen, tmp_path, how):
    path, log, td = _tracked(xen, tmp_path)
    _write(td, 3)
    assert cbt.blocks(log) == {3}
    if how == "paused":
        with tap_ctl.paused(td.pid, td.minor, path=path, cbtlog=log):
            pass
    else:
        tap_ctl.pause(td.pid, td.minor)
        tap_ctl.unpause(td.pid, td.minor, path, cbtlog=log)
    _write(td, 7)
    assert cbt.blocks(log) == {3, 7}
    with tap_ctl.paused(td.pid, td.minor, path=path):       # as livesnap did before: no -c
        pass
    _write(td, 9)
    assert cbt.blocks(log) == {3, 7}                          # tapdisk closed the log
    with tap_ctl.paused(td.pid, td.minor, path=path, cbtlog=log):
        pass
    _write(td, 11)
    assert cbt.blocks(log) == {3, 7, 11}                      # reopened by the next -c


def test_cbt_util_wrapper_on_the_real_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("CBT_UTIL", blktap.cbt_util_bin())
    a, b = str(tmp_path / "a.cbtlog"), str(tmp_path / "b.cbtlog")
    cbt_util.create(a, 8 * MiB)
    cbt_util.create(b, 8 * MiB)
    assert cbt_util.get_size(a) == 8 * MiB
    assert cbt_util.get_parent(a) == cbt_util.get_child(a) == cbt_util.NULL_UUID
    assert cbt_util.get_consistent(a) is False
    u = "6a3c1b5e-0d0e-4c71-9d35-5a0f2a6f8b11"
    cbt_util.set_(a, parent=u, consistent=True)
    assert (cbt_util.get_parent(a), cbt_util.get_child(a), cbt_util.get_consistent(a)) == \
        (u, cbt_util.NULL_UUID, True)
    with open(a, "r+b") as f:                                 # block 10 set in a
        f.seek(48 + 1)
        f.write(b"\x04")
    cbt_util.coalesce(a, b)
    assert cbt.blocks(b) == {10}
    with pytest.raises(cbt_util.CbtUtilError) as ei:
        cbt_util.get_parent(str(tmp_path / "missing.cbtlog"))
    assert "missing.cbtlog" in str(ei.value) and ei.value.rc == 2
    with pytest.raises(ValueError):
        cbt_util.set_(a)
