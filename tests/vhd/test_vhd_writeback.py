"""A merge pushes the data it wrote to the disk in steps (fdatasync of the target every
``writeback_step`` bytes, the engine's WRITEBACK_STEP unless told), so that a running guest's
writes on the same disk never queue behind the writeback of the whole merge; the tapdisk
datapath, whose merges run beside the guest (a fold's rounds), asks for smaller steps than an
offline merge. Counted, not timed: the fdatasync calls on the target during one merge."""
import os

import pytest

from livesnap import vhd
from livesnap.datapaths.vhd_files import TapdiskDatapath, VhdOfflineDatapath
from livesnap.vhd import merge

MiB = 1 << 20


def _chain(tmp_path, child_mib, parent_mib=0):
    """parent.vhd (64 MiB, ``parent_mib`` written at the end) <- child.vhd (``child_mib``
    written at 0, in 1 MiB writes of pattern i)."""
    parent, child = str(tmp_path / "parent.vhd"), str(tmp_path / "child.vhd")
    vhd.create(parent, 64 * MiB)
    for i in range(parent_mib):
        vhd.write(parent, (63 - i) * MiB, bytes([0x50]) * MiB)
    vhd.snapshot(child, parent)
    for i in range(child_mib):
        vhd.write(child, i * MiB, bytes([i + 1]) * MiB)
    return parent, child


@pytest.fixture
def pushes(monkeypatch):
    """The paths each fdatasync of this test pushed (its fd's file)."""
    seen = []
    real = os.fdatasync

    def counting(fd):
        seen.append(os.readlink("/proc/self/fd/%d" % fd))
        return real(fd)
    monkeypatch.setattr(merge.os, "fdatasync", counting)
    return seen


@pytest.mark.parametrize("step_mib, want", [(None, 0), (8, 2), (4, 5), (1, 10)])
def test_coalesce_pushes_the_parent_every_step(tmp_path, pushes, step_mib, want):
    """Counted per 2 MiB block copied: a step under a block pushes after each block."""
    parent, child = _chain(tmp_path, 20)
    step = step_mib and step_mib * MiB
    assert vhd.coalesce(child, writeback_step=step) == 20 * MiB // 512
    assert len(pushes) == want and set(pushes) <= {parent}
    assert merge.WRITEBACK_STEP > 20 * MiB                 # the default pushes none of 20
    for i in range(20):
        assert vhd.read(parent, i * MiB, MiB) == bytes([i + 1]) * MiB


@pytest.mark.parametrize("step_mib, want", [(None, 0), (8, 1), (3, 3)])
def test_pull_pushes_the_child_every_step(tmp_path, pushes, step_mib, want):
    parent, child = _chain(tmp_path, 0, parent_mib=12)
    vhd.pull(child, writeback_step=step_mib and step_mib * MiB)
    assert len(pushes) == want and set(pushes) <= {child}
    assert vhd.read(child, 63 * MiB, MiB) == bytes([0x50]) * MiB


class Domain(object):
    name = "vm"

    def disks(self):
        return []

    def snapshottable(self, disk):
        return True


@pytest.mark.parametrize("datapath, step", [(TapdiskDatapath, 8 * MiB),
                                            (VhdOfflineDatapath, merge.WRITEBACK_STEP)])
def test_a_datapath_s_commit_pushes_in_its_own_steps(tmp_path, pushes, datapath, step):
    """The tapdisk datapath's merge runs beside the guest: it pushes every 8 MiB; offline
    the engine's step (no push for 20 MiB)."""
    assert datapath.writeback_step in (None, step)
    parent, child = _chain(tmp_path, 20)
    dp = datapath(Domain())
    dp.do_commit({"path": parent, "child_path": child, "disk": "xvda", "grandchildren": [],
                  "child_in_chain": False})
    assert len(pushes) == 20 * MiB // step and set(pushes) <= {parent}
    assert not os.path.exists(child)                       # merged away
    assert vhd.read(parent, 19 * MiB, MiB) == bytes([20]) * MiB
