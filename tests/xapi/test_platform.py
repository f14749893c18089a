"""``XapiPlatform`` through a real XenAPI session (PyPI ``XenAPI``) to the stand-in: VM -> VBDs
-> VDIs -> SR -> path, what is snapshottable, what is refused."""
import json
import os
import uuid

import pytest
import XenAPI

from livesnap.errors import DatapathError, DomainNotFound, UsageError
from livesnap.platforms.xapi import XapiError, XapiPlatform, userdevice_target


@pytest.fixture
def platform(world):
    return XapiPlatform(world.xenapi_session(), sr_mount_base=world.sr_base)


def test_disks_and_paths(world, platform):
    x = world.xapi
    vm = x.add_vm("vm1", power_state="Halted")
    lvm = x.add_sr("lvmoiscsi")
    iso = x.add_sr("iso")
    file_vdi = x.add_vdi(world.sr)
    lv_vdi = x.add_vdi(lvm)
    raw_vdi = x.add_vdi(world.sr, vdi_type="aio")
    old_vdi = x.add_vdi(lvm, vdi_type=None)             # no vdi_type: VHD
    iso_vdi = x.add_vdi(iso)
    x.add_vbd(vm, file_vdi, userdevice="0", device="xvda")
    x.add_vbd(vm, lv_vdi, userdevice="1", mode="RO")
    x.add_vbd(vm, raw_vdi, userdevice="2")
    x.add_vbd(vm, userdevice="3", type="CD")            # empty CD drive
    x.add_vbd(vm, iso_vdi, userdevice="4", type="CD")
    x.add_vbd(vm, old_vdi, userdevice="27")
    dom = platform.lookup(x.record("VM", vm)["uuid"])
    assert dom.kind == "xen" and dom.name == "vm1" and dom.uuid == x.record("VM", vm)["uuid"]
    assert platform.lookup("vm1").uuid == dom.uuid
    disks = {d.target: d for d in dom.disks()}
    assert sorted(disks) == ["xvda", "xvdab", "xvdb", "xvdc"]
    sr_uuid, lvm_uuid = x.record("SR", world.sr)["uuid"], x.record("SR", lvm)["uuid"]
    loc = lambda v: x.record("VDI", v)["location"]   # noqa: E731
    assert disks["xvda"].path == os.path.join(world.sr_base, sr_uuid, loc(file_vdi) + ".vhd")
    assert disks["xvda"].fmt == "vhd" and not disks["xvda"].readonly
    assert disks["xvdb"].path == "/dev/VG_XenStorage-%s/VHD-%s" % (lvm_uuid, loc(lv_vdi))
    assert disks["xvdb"].readonly and disks["xvdb"].source_type == "block"
    assert disks["xvdc"].fmt == "aio" and disks["xvdc"].path.endswith(".raw")
    assert disks["xvdab"].fmt == "vhd" and disks["xvdab"].path.endswith("/VHD-" + loc(old_vdi))
    assert [t for t, d in sorted(disks.items()) if dom.snapshottable(d)] == ["xvda", "xvdab"]
    assert dom.state_name() == "shut off" and dom.is_running() is False
    x.record("VM", vm)["power_state"] = "Suspended"
    assert dom.state_name() == "suspended"
    # XAPI says Running, yet no tapdisk serves the disks: refuse rather than work offline
    x.record("VM", vm)["power_state"] = "Running"
    with pytest.raises(DatapathError):
        dom.is_running()


def test_userdevice_targets():
    assert [userdevice_target(n) for n in (0, 1, 25, 26, 27, 51, 52)] == \
        ["xvda", "xvdb", "xvdz", "xvdaa", "xvdab", "xvdaz", "xvdba"]


def test_refusals(world, platform):
    x = world.xapi
    with pytest.raises(DomainNotFound):
        platform.lookup(str(uuid.uuid4()))
    with pytest.raises(DomainNotFound):
        platform.lookup("no-such-vm")
    x.add_vm("twin")
    x.add_vm("twin")
    with pytest.raises(UsageError, match="2 VMs"):
        platform.lookup("twin")
    for fields, word in (({"is_a_template": True}, "template"),
                         ({"is_a_snapshot": True}, "snapshot"),
                         ({"is_control_domain": True}, "control domain")):
        ref = x.add_vm("special", **fields)
        with pytest.raises(UsageError, match=word):
            platform.lookup(x.record("VM", ref)["uuid"])
    # a VDI location that would climb out of the SR
    vm = x.add_vm("evil")
    x.add_vbd(vm, x.add_vdi(world.sr, location="../../../etc/passwd"))
    with pytest.raises(UsageError, match="cannot name a file"):
        platform.lookup("evil")
    vm = x.add_vm("evil2")
    x.add_vbd(vm, x.add_vdi(world.sr, location="abc\n"))
    with pytest.raises(UsageError, match="cannot name a file"):
        platform.lookup("evil2")
    # two disks in one slot
    vm = x.add_vm("dup")
    x.add_vbd(vm, x.add_vdi(world.sr), userdevice="0")
    x.add_vbd(vm, x.add_vdi(world.sr), userdevice="0")
    with pytest.raises(UsageError, match="two disks"):
        platform.lookup("dup")
    # an expired session: a XapiError naming the call
    platform.session.xenapi.session.logout()
    with pytest.raises(XapiError, match="VM.get_by_name_label"):
        platform.lookup("dup")


def test_via_host_call_plugin(world, tmp_path):
    """xe host-call-plugin's path: the plugin installed by install-plugin, called through
    XenAPI host.call_plugin, run by the stand-in as xapi runs it."""
    from livesnap.cli import install_plugin
    plugins = os.path.join(world.base, "plugins")
    r = install_plugin.install(plugins)
    path = os.path.join(plugins, "livesnap")
    assert r["installed"] == path and os.stat(path).st_mode & 0o777 == 0o755
    assert os.listdir(plugins) == ["livesnap"]
    world.xapi.plugins_dir = plugins
    vm = world.add_vm()
    s = world.xenapi_session()
    host = s.xenapi.session.get_this_host(s.handle)
    out = json.loads(s.xenapi.host.call_plugin(host, "livesnap", "snapshot_create",
                                               {"vm_uuid": vm.uuid, "name": "s1"}))
    assert out["snapshot"] == "s1"
    out = json.loads(s.xenapi.host.call_plugin(host, "livesnap", "snapshot_list",
                                               {"vm_uuid": vm.uuid}))
    assert [x["name"] for x in out["snapshots"]] == ["s1"]
    with pytest.raises(XenAPI.Failure) as e:
        s.xenapi.host.call_plugin(host, "livesnap", "snapshot_delete",
                                  {"vm_uuid": vm.uuid, "name": "zz"})
    assert e.value.details[0] == "LIVESNAP_SNAPSHOT_NOT_FOUND"
    with pytest.raises(XenAPI.Failure) as e:
        s.xenapi.host.call_plugin(host, "livesnap", "snapshot_delete",
                                  {"vm_uuid": vm.uuid, "name": "$(reboot)"})
    assert e.value.details[0] == "LIVESNAP_INVALID_ARGUMENT"
    with pytest.raises(XenAPI.Failure) as e:
        s.xenapi.host.call_plugin(host, "../livesnap", "snapshot_list", {"vm_uuid": vm.uuid})
    assert e.value.details == ["XENAPI_MISSING_PLUGIN", "../livesnap"]
    assert install_plugin.uninstall(plugins)["removed"] == path
    assert install_plugin.uninstall(plugins)["removed"] is None
    assert os.listdir(plugins) == []
