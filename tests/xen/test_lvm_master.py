"""LVM metadata writes go through SM's master configuration, as in dom0 (issue 13, point 4).

The ``lvm_vg`` fixture configures LVM as SM's package leaves dom0 (testxen.lvm.dom0_conf): the
default configuration (``LVM_SYSTEM_DIR``, /etc/lvm) has ``metadata_read_only = 1`` and the
LVM stand-in refuses metadata writes under it as XenServer's LVM does; the master one
(``$LIVESNAP_LVM_MASTER_DIR``, /etc/lvm/master) is writable. livesnap's LVM wrapper must run
every metadata write with ``LVM_SYSTEM_DIR`` at the master one (SM: lvutil.MASTER_LVM_CONF,
set by SR.py on the master), and reads and activation as the caller's."""
import os
import subprocess

import pytest

from livesnap.errors import CommandFailed
from livesnap.tools import lvm
from testxen import lvm as standin

MiB = 1 << 20
LVM = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "testxen", "lvm")


def _raw(*args, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([LVM] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=e)


def test_the_test_bed_refuses_writes_with_dom0s_default_configuration(lvm_vg):
    """The control: the stand-in under the default (read-only) configuration refuses a
    create, a rename, a resize, a permission change and a removal, changing nothing; it reads
    and activates; under the master configuration the same create runs."""
    vg = lvm_vg.name
    lvm.lvcreate(vg, "VHD-a", 8 * MiB)
    for args in (["lvcreate", "-n", "VHD-b", "-L", "8m", vg], ["lvrename", vg, "VHD-a", "VHD-c"],
                 ["lvresize", "-L", "12m", vg + "/VHD-a"], ["lvchange", "-p", "r", vg + "/VHD-a"],
                 ["lvchange", "--addtag", "hidden", vg + "/VHD-a"],
                 ["lvremove", "-f", vg + "/VHD-a"]):
        p = _raw(*args)
        assert p.returncode == 5 and standin.READ_ONLY_MESSAGE in p.stderr, (args, p)
    assert sorted(lvm_vg.loops()) == ["VHD-a"]
    assert lvm.lv_size(vg, "VHD-a") == 8 * MiB
    assert _raw("lvs", vg).returncode == 0
    assert _raw("lvchange", "-an", vg + "/VHD-a").returncode == 0
    assert not os.path.exists("/dev/%s/VHD-a" % vg)
    assert _raw("lvchange", "-ay", vg + "/VHD-a").returncode == 0
    assert os.path.exists("/dev/%s/VHD-a" % vg)
    p = _raw("lvcreate", "-n", "VHD-b", "-L", "8m", vg,
             LVM_SYSTEM_DIR=os.environ["LIVESNAP_LVM_MASTER_DIR"])
    assert p.returncode == 0, p


def _every_write(vg):
    lvm.lvcreate(vg, "VHD-a", 8 * MiB)
    lvm.lvresize(vg, "VHD-a", 16 * MiB)
    lvm.lvresize(vg, "VHD-a", 12 * MiB, allow_shrink=True)
    lvm.lvrename(vg, "VHD-a", "VHD-b")
    lvm.set_readonly(vg, "VHD-b", True)
    lvm.set_readonly(vg, "VHD-b", False)
    lvm.lvcreate(vg, "VHD-c", 4 * MiB, tag="jvhd", active=False)
    lvm.lvremove(vg, "VHD-c")


def test_livesnap_writes_lvm_metadata_with_the_master_configuration(lvm_vg):
    """Every write of livesnap's wrapper runs in dom0's configuration (the caller's default
    refuses it) and reads and activation run too."""
    vg = lvm_vg.name
    _every_write(vg)
    assert sorted(lvm_vg.loops()) == ["VHD-b"]
    assert lvm.lv_size(vg, "VHD-b") == 12 * MiB
    lvm.activate(vg, "VHD-b", False)
    lvm.activate(vg, "VHD-b", True)
    assert lvm.vg_free(vg) > 0


@pytest.mark.parametrize("step", ["lvcreate", "lvresize", "lvrename", "set_readonly",
                                  "lvremove"])
def test_without_the_master_configuration_each_write_is_refused(lvm_vg, monkeypatch, step):
    """A host without /etc/lvm/master (not SM's): writes keep the caller's configuration,
    which in dom0 refuses them (so the wrapper's success above is the master one's)."""
    vg = lvm_vg.name
    lvm.lvcreate(vg, "VHD-a", 8 * MiB)
    monkeypatch.setenv("LIVESNAP_LVM_MASTER_DIR", os.path.join(os.path.dirname(
        os.environ["LIVESNAP_LVM_MASTER_DIR"]), "absent"))
    assert lvm.master_conf_dir() is None
    call = {"lvcreate": lambda: lvm.lvcreate(vg, "VHD-b", 8 * MiB),
            "lvresize": lambda: lvm.lvresize(vg, "VHD-a", 16 * MiB),
            "lvrename": lambda: lvm.lvrename(vg, "VHD-a", "VHD-b"),
            "set_readonly": lambda: lvm.set_readonly(vg, "VHD-a", True),
            "lvremove": lambda: lvm.lvremove(vg, "VHD-a")}[step]
    with pytest.raises(CommandFailed) as e:
        call()
    assert standin.READ_ONLY_MESSAGE in e.value.err
    assert sorted(lvm_vg.loops()) == ["VHD-a"] and lvm.lv_size(vg, "VHD-a") == 8 * MiB
    lvm.activate(vg, "VHD-a", False)                    # activation needs no master
    lvm.activate(vg, "VHD-a", True)
