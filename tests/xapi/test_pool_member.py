"""A running VM with LVHD disks on a pool member that is not the SR master (issue 13): the
master acts, as SM does, reaching the VM's host through SM's own host plugins
(``tapdisk-pause``, ``on-slave``) with ``host.call_plugin`` (livesnap/platforms/xapi_pool.py).

The second host is testxen/sm_hosts.py: SM's own plugin code run for it (its own refcounts,
locks and log), the VM's real tapdisk on this machine. SM's own GC leaf-coalescing a VDI
attached there is the reference: livesnap's fold of the same chain must make the same calls
on the same LVs, leave the same counts on both hosts, pause and reopen the real tapdisk and
keep every acknowledged guest write."""
import os

import pytest

from testxen import sm_hosts

from test_sm_gc import blktap, sm, sm_tree  # noqa: F401  (fixtures)
from test_sm_refcounts import _as_sm_rebuilds, _images, _no_refcount_warnings, _uuid, lvhd  # noqa: F401,E501

MiB = 1 << 20


def _vdi_ref(x, uuid):
    ref, = [r for r, rec in x.objects["VDI"].items() if rec["uuid"] == uuid]
    return ref


@pytest.fixture
def host2(world, sm, lvhd):
    return sm_hosts.Host(world.xapi, sm, lvhd)


def _on_host2(world, host2, vm):
    """The halted VM started on host2: SM's attach there (refcounts in host2's namespace,
    sm_config host_<host2>), its real tapdisk, resident_on host2."""
    x = world.xapi
    for t, path in vm.paths.items():
        host2.attach(_vdi_ref(x, _uuid(path)), path)
    vm.start()
    x.record("VM", vm.ref)["resident_on"] = host2.ref


def _host2_view(paths):
    """The LVs of these chains linked again: on a pool SM's deactivation on the master
    leaves host2's devices alone; here both hosts share one /dev (testxen/sm_hosts.py)."""
    from livesnap import vhd
    from livesnap.tools import lvm
    for path in paths:
        vg, lv = lvm.split_path(path)
        if not os.path.exists(path):
            lvm.activate(vg, lv)
        for p in vhd.chain_paths(path)[1:]:
            if not os.path.exists(p):
                lvm.activate(*lvm.split_path(p))


def _remove_face(world, lvhd, name, r):
    """The snapshot's own VDI deleted behind livesnap's back as SM's LVHDVDI.delete does."""
    from livesnap.tools import lvm
    x = world.xapi
    for d in r["disks"]:
        vg, lv = lvm.split_path(d["image"])
        lvm.lvremove(vg, lv)
        del x.objects["VDI"][_vdi_ref(x, _uuid(d["image"]))]


def test_sms_gc_leaf_coalesce_of_a_vdi_attached_on_another_host(world, blktap, sm, lvhd,  # noqa: F811,E501
                                                                   host2):
    """The control: SM's GC on the master leaf-coalesces a VDI attached on host2 through
    SM's own plugins there: tapdisk-pause pause/unpause on host2, on-slave multi for the
    rename (old leaf LV deactivated, the new leaf refreshed, the parent's refcount cleaned)
    and the resize; the real tapdisk reopens, guest data intact, host2's counts as SM's."""
    x = world.xapi
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    leaf = _uuid(disk)
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    base, = _images(world, lvhd) - {leaf, _uuid(r["disks"][0]["image"])}
    _on_host2(world, host2, vm)
    assert host2.refcounts() == {leaf: [0, 1], base: [1, 0]}
    _remove_face(world, lvhd, "s1", r)
    since = len(x.calls)
    after = sm.gc(lvhd)
    assert list(after["vdis"]) == [leaf], (after, sm.log()[-3000:])
    calls = sm_hosts.plugin_calls(x, since)
    print(calls)
    assert [(h, p, f) for h, p, f, a in calls if p == "tapdisk-pause"] == \
        [(host2.ref, "tapdisk-pause", "pause"), (host2.ref, "tapdisk-pause", "unpause")], calls
    assert host2.refcounts() == {leaf: [0, 1]}, host2.log()[-3000:]
    assert _images(world, lvhd) == {leaf}
    _host2_view([disk])
    vm.stop()
    assert host2.detach(_vdi_ref(x, leaf)) == {}
    _no_refcount_warnings(sm)
