"""Which host may act (issue 13): a running VM's tapdisks are on the host it runs on
(``resident_on``), so livesnap must run there; an LVHD SR's LVM metadata is written only on
the pool master, as SM writes it. Elsewhere the plugin refuses before anything changes,
naming the host to call (LIVESNAP_WRONG_HOST)."""
import os

import pytest


def _other_host(x):
    return x._add("host", {"name_label": "host2", "hostname": "host2", "enabled": True,
                           "PBDs": [], "resident_VMs": []})


def _files(world):
    return {p: v for p, v in world.snapshot_of_files().items() if not p.endswith(".lock")}


@pytest.mark.parametrize("fn", ["snapshot_create", "snapshot_delete"])
def test_a_vm_running_on_another_host_is_refused_naming_it(world, fn):
    vm = world.add_vm(ndisks=1)
    vm.start()
    if fn == "snapshot_delete":
        world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    x = world.xapi
    other = _other_host(x)
    x.record("VM", vm.ref)["resident_on"] = other          # xapi says: it runs on host2
    leaf = vm.paths["xvda"]
    before = {p: v for p, v in _files(world).items() if p != leaf}
    desc = world.fail(fn, {"vm_uuid": vm.uuid, "name": "s1"}, "LIVESNAP_WRONG_HOST")
    assert x.record("host", other)["uuid"] in desc[1] and "runs on host" in desc[1], desc
    assert {p: v for p, v in _files(world).items() if p != leaf} == before
    x.record("VM", vm.ref)["resident_on"] = x.host
    world.ok(fn, vm_uuid=vm.uuid, name="s1")
    vm.stop()


def test_lvhd_metadata_only_on_the_pool_master(world, lvm_vg):
    """On a pool member that is not the master, an LVHD VM's snapshot is refused (its LVM
    metadata is the master's to write); on a file SR the same pool member may act."""
    x = world.xapi
    sr = world.add_lvm_sr(lvm_vg)
    lv_vm = world.add_vm("lv", ndisks=1, sr=sr)
    file_vm = world.add_vm("file", ndisks=1)
    other = _other_host(x)
    x.record("pool", x.pool)["master"] = other
    lvs_before = sorted(lvm_vg.loops())
    desc = world.fail("snapshot_create", {"vm_uuid": lv_vm.uuid, "name": "s1"},
                      "LIVESNAP_WRONG_HOST")
    assert x.record("host", other)["uuid"] in desc[1] and "pool master" in desc[1], desc
    assert sorted(lvm_vg.loops()) == lvs_before
    world.ok("snapshot_create", vm_uuid=file_vm.uuid, name="s1")
    x.record("pool", x.pool)["master"] = x.host
    world.ok("snapshot_create", vm_uuid=lv_vm.uuid, name="s1")
    assert len(lvm_vg.loops()) > len(lvs_before)
