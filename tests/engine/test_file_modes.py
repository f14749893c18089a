"""New qcow2 images (overlays made by qemu-img, revert's new leaf) are created 0600, never
wider than the image they replace (issue 16, class 7; the VHD side: tests/xen/
test_file_modes.py)."""
import os
import stat

import pytest

from livesnap.engine.engine import Engine

from helpers import URI


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("old_mode", [0o600, 0o640])
def test_qcow2_offline_new_overlays_are_0600(make_dom, old_mode):
    """The qcow2 side of the rule (new overlays by qemu-img, revert's new leaf)."""
    dom = make_dom(ndisks=1)
    for f in dom.files():
        os.chmod(os.path.join(dom.dir, f), old_mode)
    engine = Engine(connect=URI, state_dir=dom.state_dir)
    engine.create(dom.name, "s1")
    leaf = dom.sources()["vda"]
    assert _mode(leaf) == 0o600
    engine.revert(dom.name, "s1")
    assert _mode(dom.sources()["vda"]) == 0o600
    engine.delete(dom.name, "s1")                         # a merge: no new file, no wider
    for f in dom.files():
        assert _mode(os.path.join(dom.dir, f)) & ~old_mode & 0o777 == 0, f
