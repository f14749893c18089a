"""A VM on a shared file SR that moved to another host of the pool (issue 13): the host
holding its livesnap catalog (livesnap/platforms/xapi_catalog.py) keeps acting on it,
wherever it runs, pausing its tapdisk there through SM's own tapdisk-pause plugin
(``host.call_plugin``, livesnap/platforms/xapi_pool.py; a file has no LV views to update);
a command on the host it now runs on, which has no catalog of it, is refused naming the
catalog's host.

The second host is testxen/sm_hosts.py's (SM's own tapdisk-pause runs for it, over this
machine's real tapdisk of the VM); a live migration is its effect on the records: SM's
attach on host2 (``sm_config`` ``host_<host2>``, its tap device), ``resident_on`` host2 -- the
guest's tapdisk, one machine here, goes on writing."""
import os

import pytest

from testxen import sm_hosts

from test_sm_gc import blktap, sm, sm_tree  # noqa: F401  (fixtures)
from test_pool_member import followed_by_a_remote_fold

MiB = 1 << 20


def _uuid(path):
    return os.path.basename(path)[:-len(".vhd")]


def _images(world):
    return {_uuid(p) for p in world.xapi.sr_images(world.sr).values()}


def _vdi_ref(x, uuid):
    ref, = [r for r, rec in x.objects["VDI"].items() if rec["uuid"] == uuid]
    return ref


@pytest.fixture
def host2(world, sm):
    return sm_hosts.Host(world.xapi, sm, world.sr)


def _migrate(world, host2, vm):
    """The running VM live-migrated to host2, as SM's attach there leaves its records (the
    file SR's attach keeps no refcounts): its tap device there names the image, sm_config
    ``host_<host2>`` (the master's attach key gone with the master's tapdisk), resident_on
    host2."""
    x = world.xapi
    for t, path in vm.paths.items():
        ref = _vdi_ref(x, _uuid(path))
        rec = x.record("VDI", ref)
        d = os.path.join(host2.backend, x.record("SR", world.sr)["uuid"])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, rec["uuid"]), "w") as f:
            f.write(path)
        for k in [k for k in rec["sm_config"] if k.startswith("host_")]:
            del rec["sm_config"][k]
        rec["sm_config"]["host_" + host2.ref] = "RW"
    x.record("VM", vm.ref)["resident_on"] = host2.ref


def _on_host2(world, host2):
    """A session the stand-in says is on host2, and host2's own state directory."""
    session = world.xapi.login()
    world.xapi.session_hosts[session] = host2.ref
    return session, os.path.join(world.base, "state-host2")


def _in_pauses(calls):
    paused = set()
    for host, plugin, fn, args in calls:
        if plugin == "tapdisk-pause":
            (paused.add if fn == "pause" else paused.discard)(host)
        else:
            return False
    return not paused


def test_snapshot_on_the_master_migrated_then_deleted_from_the_master(world, blktap, sm,  # noqa: F811,E501
                                                                      host2):
    """s1 taken on the master while the VM runs there; the VM migrates to host2. On host2,
    which has no catalog of it, every command is refused naming the master (where its
    catalog is), nothing made there. On the master, s1's delete folds its base copy into
    the leaf running on host2 through host2's tapdisk-pause (every call a pause or its
    unpause, nothing else sent there), the guest writes on with every acknowledged write
    kept, SM's GC finds nothing to do."""
    x = world.xapi
    vm = world.add_vm(ndisks=1, size=16 * MiB)
    disk = vm.paths["xvda"]
    blktap.write(disk, 8 * MiB, 2 * MiB, 0x31)
    vm.start()
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    assert r["datapath"] == "tapdisk", r
    face = _uuid(r["disks"][0]["image"])
    _migrate(world, host2, vm)
    master = x.record("host", x.host)["uuid"]

    session, state2 = _on_host2(world, host2)
    before = world.snapshot_of_files()
    for fn, args in [("snapshot_delete", {"name": "s1"}), ("snapshot_create", {"name": "s2"}),
                     ("snapshot_list", {}), ("recover", {})]:
        reply = world.run_plugin(fn, dict(args, vm_uuid=vm.uuid), session=session,
                                 LIVESNAP_STATE_DIR=state2)
        desc = reply.get("ErrorDescription") or reply
        assert desc[0] == "LIVESNAP_WRONG_HOST" and master in desc[1], (fn, desc)
    def files(got):            # the running leaf aside (the guest writes on)
        return {p: v for p, v in got.items() if not p.endswith(".lock") and p != disk}
    assert files(world.snapshot_of_files()) == files(before)
    assert not [n for n in os.listdir(state2) if n.endswith(".db")] \
        if os.path.isdir(state2) else True

    td = vm.tapdisks["xvda"]
    acks = len(vm.ack_log("xvda"))
    since = len(x.calls)
    out = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    calls = sm_hosts.plugin_calls(x, since)
    assert out["datapath"] == "tapdisk-remote" and \
        [m["method"] for m in out["merges"]] == ["fold"], out
    assert calls and {c[0] for c in calls} == {host2.ref} and _in_pauses(calls), calls
    assert len(out["pauses"]) == len([c for c in calls if c[2] == "pause"]), (out, calls)
    assert _images(world) == {_uuid(disk)}, _images(world)
    assert face not in _images(world)
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)       # the guest writes on
    sm_config = x.record("VDI", _vdi_ref(x, _uuid(disk)))["sm_config"]
    assert "paused" not in sm_config and "livesnap-paused" not in sm_config, sm_config
    view = sm.classify(world.sr)
    assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [] and \
        view["garbage"] == [], view
    assert not [ln for ln in host2.log().splitlines() if "Traceback" in ln]
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    vm.stop()                                 # every acknowledged write in the disk


def test_create_on_the_catalogs_host_of_a_vm_running_elsewhere(world, blktap, sm, host2):  # noqa: F811,E501
    """The catalog made on the master (a first snapshot), the VM then on host2: a new
    snapshot taken on the master pauses the tapdisk on host2 once (pause, unpause), the
    guest writes on; without the catalog on the master (none made, no key) it would be
    host2's VM, refused naming host2 as before."""
    x = world.xapi
    vm = world.add_vm(ndisks=1, size=8 * MiB)
    fresh = world.add_vm("fresh", ndisks=1, size=8 * MiB)
    vm.start()
    fresh.start()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _migrate(world, host2, vm)
    _migrate(world, host2, fresh)
    desc = world.fail("snapshot_create", {"vm_uuid": fresh.uuid, "name": "s1"},
                      "LIVESNAP_WRONG_HOST")
    assert host2.uuid in desc[1] and "runs on host" in desc[1], desc
    td = vm.tapdisks["xvda"]
    acks = len(vm.ack_log("xvda"))
    since = len(x.calls)
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    calls = sm_hosts.plugin_calls(x, since)
    assert r["datapath"] == "tapdisk-remote", r
    assert [(h, p, f) for h, p, f, a in calls] == [
        (host2.ref, "tapdisk-pause", "pause"), (host2.ref, "tapdisk-pause", "unpause")], calls
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] == \
        ["s1", "s2"]
    vm.stop()
    fresh.stop()


def test_the_catalogs_follower_folds_after_an_xe_delete_of_a_vm_running_elsewhere(  # noqa: F811,E501
        world, blktap, sm, host2, monkeypatch):
    """s1 taken on the master, the VM migrated to host2, s1's face deleted with xe (SM's
    own FileVDI.delete): host2's follower, the VM's resident host, leaves it alone even
    with a catalog of it (XAPI records the master as the catalog's host; before, the
    resident host owned a running file-SR VM while the catalog was elsewhere, and nobody
    merged); the master's follower folds the base copy into the leaf running on host2
    through host2's tapdisk-pause; SM's GC finds nothing, the guest's writes are kept."""
    from test_follow_service import _due, _in_process_follower
    x = world.xapi
    vm = world.add_vm(ndisks=1, size=16 * MiB)
    disk = vm.paths["xvda"]
    blktap.write(disk, 8 * MiB, 2 * MiB, 0x31)
    vm.start()
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _migrate(world, host2, vm)
    sm.vdi_delete(world.sr, _vdi_ref(x, _uuid(r["disks"][0]["image"])))
    td = vm.tapdisks["xvda"]
    acks = len(vm.ack_log("xvda"))
    reports = []
    f = _in_process_follower(world, sm, monkeypatch, reports)
    try:
        f.here = host2.ref                    # as host2's follower sees it: not its VM
        assert f.reconcile() == [] and reports == []
        assert len(_images(world)) == 2
        f.here = x.host
        _due(f)
        since = len(x.calls)
        out, = f.reconcile()
    finally:
        f.platform.session.xenapi.session.logout()
    followed_by_a_remote_fold(x, out, since, host2)
    assert _in_pauses(sm_hosts.plugin_calls(x, since))         # files: no on-slave call
    assert _images(world) == {_uuid(disk)}
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)
    view = sm.classify(world.sr)
    assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [] and \
        view["garbage"] == [], view
    vm.stop()


@pytest.mark.parametrize("fn,fault", [("snapshot_create", "tapdisk:renamed:0"),
                                      ("snapshot_delete", "tapdisk:folded:0")])
def test_killed_inside_a_remote_pause_then_recovered(world, blktap, sm, host2, fn, fault):  # noqa: F811,E501
    """The catalog's host killed inside a pause of the tapdisk on host2 (file SR): the VDI
    keeps SM's paused key and livesnap's marks until ``recover`` on the catalog's host,
    which finishes the operation and unpauses host2's tapdisk through tapdisk-pause; the
    guest writes on, every acknowledged write kept, SM's GC finds nothing to do."""
    import subprocess
    import xmlrpc.client
    from conftest_paths import PLUGIN
    x = world.xapi
    vm = world.add_vm(ndisks=1, size=16 * MiB)
    disk = vm.paths["xvda"]
    blktap.write(disk, 8 * MiB, 2 * MiB, 0x31)
    vm.start()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    _migrate(world, host2, vm)
    name = "s2" if fn == "snapshot_create" else "s1"
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {
        "vm_uuid": vm.uuid, "name": name}), methodname=fn)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True,
        env=world.env(LIVESNAP_FAULT=fault), timeout=300)
    assert p.returncode == -9, (p.returncode, p.stderr)
    ref = _vdi_ref(x, _uuid(disk))
    sm_config = x.record("VDI", ref)["sm_config"]
    assert sm_config.get("paused") == "true" and sm_config.get("livesnap-paused-on"), sm_config
    out = world.ok("recover", vm_uuid=vm.uuid)
    assert out["recovered"] is not None, out
    sm_config = x.record("VDI", ref)["sm_config"]
    assert "paused" not in sm_config and "livesnap-paused" not in sm_config, sm_config
    td = vm.tapdisks["xvda"]
    world.tapdisks.wait_acks(td.pid, td.minor, len(vm.ack_log("xvda")) + 3)
    names = [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]]
    assert names == (["s1", "s2"] if fn == "snapshot_create" else []), names
    view = sm.classify(world.sr)
    assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [], view
    vm.stop()
