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
    """Every LV of these disks' VGs linked again: on a pool the master's deactivations
    leave host2's devices alone; here both hosts share one /dev (testxen/sm_hosts.py)."""
    from livesnap.tools import lvm
    from testxen import lvm as standin
    vg = standin.Vg(os.environ["TESTXEN_LVM_ROOT"])
    for path in paths:
        for name in vg.loops():
            if name.startswith("VHD-") and not os.path.exists(os.path.join(
                    os.path.dirname(path), name)):
                lvm.activate(lvm.split_path(path)[0], name)


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
    assert [(h, p, f) for h, p, f, a in calls if p == "tapdisk-pause"] == \
        [(host2.ref, "tapdisk-pause", "pause"), (host2.ref, "tapdisk-pause", "unpause")], calls
    assert host2.refcounts() == {leaf: [0, 1]}, host2.log()[-3000:]
    assert _images(world, lvhd) == {leaf}
    _host2_view([disk])
    vm.stop()
    assert host2.detach(_vdi_ref(x, leaf)) == {}
    _no_refcount_warnings(sm)


def _roles(calls, roles):
    """The calls as (plugin, fn or action, role of the LV/VDI named): SM's refcounted
    refresh of a resized LV (activate, refresh, deactivate: lvRefreshOnSlaves) counts as a
    refresh; names not in ``roles`` ({uuid: role}) are "other"."""
    def role(v):
        for u, r in roles.items():
            if v in (u, "VHD-" + u):
                return r
        return "other"
    out = []
    for host, plugin, fn, args in calls:
        if plugin == "tapdisk-pause":
            out.append((plugin, fn, role(args["vdi_uuid"])))
            continue
        acts = []
        i = 1
        while "action%d" % i in args:
            acts.append((args["action%d" % i], role(args.get("lvName%d" % i) or
                                                    args.get("uuid%d" % i))))
            i += 1
        if [a for a, _ in acts] == ["activate", "refresh", "deactivate"]:
            acts = [("refresh", acts[1][1])]
        out.extend((plugin, a, r) for a, r in acts)
    return out


def _in_pauses(calls):
    """Every on-slave call lies between a pause and its unpause of the same host."""
    paused = set()
    for host, plugin, fn, args in calls:
        if plugin == "tapdisk-pause":
            (paused.add if fn == "pause" else paused.discard)(host)
        elif host not in paused:
            return False
    return not paused



def followed_by_a_remote_fold(x, out, since, host2):
    """The follower's report ``out`` of s1 deleted outside livesnap: the base copy folded
    into the leaf running on host2, every plugin call since ``since`` to host2, each of its
    on-slave calls inside a pause."""
    assert "error" not in out, out
    res = out["result"]
    assert res["followed_sm"]["deleted"] == ["s1"], res
    assert res["datapath"] == "tapdisk-remote" and \
        [m["method"] for m in res["merges"]] == ["fold"], res
    calls = sm_hosts.plugin_calls(x, since)
    assert calls and {c[0] for c in calls} == {host2.ref} and _in_pauses(calls), calls
def _fold_shape(world, blktap, lvhd, host2):
    """A VM on host2 over one base copy left by a deleted snapshot's face: s1 taken
    offline, data both sides, then started on host2."""
    before = _images(world, lvhd)
    vm = world.add_vm(ndisks=1, sr=lvhd, size=16 * MiB)
    disk = vm.paths["xvda"]
    blktap.write(disk, 8 * MiB, 2 * MiB, 0x31)
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    blktap.write(disk, 10 * MiB, 2 * MiB, 0x32)
    face = _uuid(r["disks"][0]["image"])
    base, = _images(world, lvhd) - before - {_uuid(disk), face}
    _on_host2(world, host2, vm)
    return vm, disk, r, base


def _sms_leaf_coalesce_calls(world, blktap, sm, lvhd, host2):
    """SM's own GC leaf-coalescing that shape (the face deleted as SM deletes it)."""
    x = world.xapi
    vm, disk, r, base = _fold_shape(world, blktap, lvhd, host2)
    _remove_face(world, lvhd, "s1", r)
    assert host2.refcounts()[_uuid(disk)] == [0, 1]
    since = len(x.calls)
    sm.gc(lvhd)
    calls = sm_hosts.plugin_calls(x, since)
    _host2_view([disk])
    vm.stop()
    host2.detach(_vdi_ref(x, _uuid(disk)))
    return _roles(calls, {_uuid(disk): "leaf", base: "base"})


def test_delete_folds_the_base_into_a_leaf_running_on_another_host(world, blktap, sm, lvhd,  # noqa: F811,E501
                                                                   host2):
    """livesnap on the master deletes s1 of a VM running on host2: its face goes, its base
    copy folds into the running leaf. The tapdisk there is paused and reopened through
    SM's tapdisk-pause on host2 for every pause, each pause updates host2's LV views with
    SM's on-slave (every call inside a pause), and the actions on the leaf and the base are
    those SM's own leaf-coalesce makes for the same shape on the same LVs; the guest's
    writes all kept, SM's GC finds nothing to do, the counts as SM leaves them on both
    hosts."""
    x = world.xapi
    vm, disk, r, base = _fold_shape(world, blktap, lvhd, host2)
    leaf = _uuid(disk)
    td = vm.tapdisks["xvda"]
    acks = len(vm.ack_log("xvda"))
    since = len(x.calls)
    out = world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    calls = sm_hosts.plugin_calls(x, since)
    assert out["datapath"] == "tapdisk-remote" and \
        [m["method"] for m in out["merges"]] == ["fold"], out
    # every pause reported, each one remote pause (its XAPI round trips included)
    assert len(out["pauses"]) == len([c for c in calls if c[2] == "pause"]), (out, calls)
    assert calls and {c[0] for c in calls} == {host2.ref}, calls
    assert _in_pauses(calls), calls
    ours = _roles(calls, {leaf: "leaf", base: "base"})
    assert ours.count(("tapdisk-pause", "pause", "leaf")) >= 2, ours      # the fold's pauses
    assert _images(world, lvhd) == {leaf}
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)       # the guest writes on
    assert host2.refcounts() == {leaf: [0, 1]}, host2.log()[-3000:]
    assert _as_sm_rebuilds(sm, lvhd) == {}                     # nothing counted on the master
    view = sm.classify(lvhd)
    assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [] and \
        view["garbage"] == [], view
    assert not [ln for ln in host2.log().splitlines() if "Traceback" in ln]
    _host2_view([disk])
    vm.stop()
    assert host2.detach(_vdi_ref(x, leaf)) == {}
    _no_refcount_warnings(sm)

    # the same shape leaf-coalesced by SM's own GC: every action SM takes on the leaf's
    # and the base's LVs on host2 livesnap took too
    theirs = _sms_leaf_coalesce_calls(world, blktap, sm, lvhd, host2)
    missing = [c for c in theirs if c[2] != "other" and c not in ours]
    assert not missing, (missing, theirs, ours)


def test_create_on_the_master_of_a_vm_running_on_another_host(world, blktap, sm, lvhd,  # noqa: F811,E501
                                                              host2):
    """A snapshot of a VM running on host2, taken on the master: one pause through host2's
    tapdisk-pause, host2's view updated as SM's LVHD snapshot does (LVHDSR.py
    ``_updateSlavesPreClone``: the leaf's LV deactivated there; ``_updateSlavesOnClone``:
    the leaf refreshed, the new base copy activated with host2's count), nothing of the
    face there; host2's counts then those SM's attach and snapshot leave: the leaf (0, 1),
    the base (1, 0)."""
    x = world.xapi
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    leaf = _uuid(disk)
    _on_host2(world, host2, vm)
    td = vm.tapdisks["xvda"]
    acks = len(vm.ack_log("xvda"))
    since = len(x.calls)
    r = world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    face = _uuid(r["disks"][0]["image"])
    base, = _images(world, lvhd) - {leaf, face}
    calls = sm_hosts.plugin_calls(x, since)
    assert _in_pauses(calls), calls
    assert _roles(calls, {leaf: "leaf", base: "base", face: "face"}) == [
        ("tapdisk-pause", "pause", "leaf"),
        ("on-slave", "deactivateNoRefcount", "leaf"),
        ("on-slave", "refresh", "leaf"), ("on-slave", "activate", "base"),
        ("tapdisk-pause", "unpause", "leaf")], calls
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)
    assert host2.refcounts() == {leaf: [0, 1], base: [1, 0]}
    assert _as_sm_rebuilds(sm, lvhd) == {}
    assert "paused" not in x.record("VDI", _vdi_ref(x, leaf))["sm_config"]
    _host2_view([disk])
    vm.stop()
    assert host2.detach(_vdi_ref(x, leaf)) == {}
    _no_refcount_warnings(sm)


def _host3(x):
    return x._add("host", {"name_label": "host3", "hostname": "host3", "enabled": True,
                           "PBDs": [], "resident_VMs": []})


@pytest.mark.parametrize("case", ["resident-not-master", "neither", "local-sr", "mixed"])
def test_who_acts_for_a_running_lvhd_vm(world, sm, lvhd, host2, case):
    """Only the master works on a running LVHD VM of another host, and only when every disk
    is on a shared LVHD SR. Run on the VM's own host that is not the master, or on a host
    that is neither: refused naming the master (the plugin says which host to call). The
    VM on another host with a disk on an SR the master cannot reach (not shared, or a
    file SR): refused naming the VM's host. Nothing changes."""
    x = world.xapi
    vm = world.add_vm("lv", ndisks=1, sr=lvhd, size=8 * MiB)
    if case == "mixed":
        vdi = x.add_vdi(world.sr, 8 * MiB)
        from testxen import blktap as txblktap
        txblktap.create(x.vdi_path(vdi), 8 * MiB)
        x.add_vbd(vm.ref, vdi, userdevice="1")
    x.record("VM", vm.ref)["power_state"] = "Running"
    if case == "resident-not-master":
        x.record("VM", vm.ref)["resident_on"] = x.host             # runs here
        x.record("pool", x.pool)["master"] = host2.ref
        named, why = host2.uuid, "pool master"
    elif case == "neither":
        x.record("VM", vm.ref)["resident_on"] = host2.ref
        other = _host3(x)
        x.record("pool", x.pool)["master"] = other
        named, why = x.record("host", other)["uuid"], "pool master"
    else:
        x.record("VM", vm.ref)["resident_on"] = host2.ref
        if case == "local-sr":
            x.record("SR", lvhd)["shared"] = False
        named, why = host2.uuid, "runs on host"
    lvs = sorted(os.listdir(os.path.dirname(vm.paths["xvda"])))
    since = len(x.calls)
    desc = world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"},
                      "LIVESNAP_WRONG_HOST")
    assert named in desc[1] and why in desc[1], desc
    assert sorted(os.listdir(os.path.dirname(vm.paths["xvda"]))) == lvs
    assert sm_hosts.plugin_calls(x, since) == []
    assert "paused" not in x.record("VDI", _vdi_ref(x, _uuid(vm.paths["xvda"])))["sm_config"]


def _killed(world, fn, fault, **args):
    import subprocess
    import xmlrpc.client
    from conftest_paths import PLUGIN
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, args), methodname=fn)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=world.env(LIVESNAP_FAULT=fault),
                       timeout=300)
    assert p.returncode == -9, (p.returncode, p.stdout, p.stderr)


@pytest.mark.parametrize("fn,fault", [("snapshot_create", "tapdisk:renamed:0"),
                                      ("snapshot_delete", "tapdisk:renamed:0"),
                                      ("snapshot_delete", "tapdisk:folded:0"),
                                      ("snapshot_delete", "lvm:replaced:0")])
def test_killed_inside_a_remote_pause_then_recovered(world, blktap, sm, lvhd, host2,  # noqa: F811,E501
                                                     fn, fault):
    """livesnap killed inside a pause of the tapdisk on host2 (the leaf frozen, the fold's
    last pause, between the fold's LV rename and its counts): the tapdisk there stays
    paused and the VDI keeps SM's paused key until ``recover`` on the master, which finishes
    the operation, unpauses it through tapdisk-pause, removes the keys; the guest writes
    on, every acknowledged write kept, SM's GC finds nothing to do."""
    x = world.xapi
    vm, disk, r, base = _fold_shape(world, blktap, lvhd, host2)
    leaf = _uuid(disk)
    ref = _vdi_ref(x, leaf)
    td = vm.tapdisks["xvda"]
    name = "s2" if fn == "snapshot_create" else "s1"
    _killed(world, fn, fault, vm_uuid=vm.uuid, name=name)
    sm_config = x.record("VDI", ref)["sm_config"]
    assert sm_config.get("paused") == "true" and sm_config.get("livesnap-paused-on"), sm_config
    out = world.ok("recover", vm_uuid=vm.uuid)
    assert out["recovered"] is not None, out
    sm_config = x.record("VDI", ref)["sm_config"]
    assert "paused" not in sm_config and "livesnap-paused" not in sm_config, sm_config
    acks = len(vm.ack_log("xvda"))
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)       # running again
    names = [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]]
    assert names == (["s1", "s2"] if fn == "snapshot_create" else []), names
    view = sm.classify(lvhd)
    assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [], view
    # host2's counts as SM's attach and snapshot / leaf-coalesce leave them there: the
    # leaf's binary count, one count on each hidden image under it
    counts = host2.refcounts()
    assert counts.pop(leaf) == [0, 1], counts
    assert all(c == [1, 0] for c in counts.values()), counts
    assert len(counts) == (2 if fn == "snapshot_create" else 0), counts
    _host2_view([disk])
    vm.stop()


def test_two_snapshots_then_both_deleted_on_another_host(world, blktap, sm, lvhd, host2):  # noqa: F811,E501
    """s1 and s2 taken on the master of a VM running on host2, s1 deleted (its base copy
    merged with s2's, host2's chain relinked inside a pause), s2 deleted (folded into the
    leaf): after each, host2 counts the leaf (0, 1) and each hidden image under it (1, 0),
    as SM's attach, snapshot and coalesce leave them there, no count of an image gone; the master counts nothing; SM's GC has nothing to do; the guest writes on."""
    x = world.xapi
    vm = world.add_vm(ndisks=1, sr=lvhd, size=8 * MiB)
    disk = vm.paths["xvda"]
    leaf = _uuid(disk)
    _on_host2(world, host2, vm)
    td = vm.tapdisks["xvda"]

    def check(n_bases):
        from livesnap import vhd
        chain = [_uuid(p) for p in vhd.chain_paths(disk)]
        counts = host2.refcounts()
        assert counts == dict([(leaf, [0, 1])] + [(u, [1, 0]) for u in chain[1:]]), \
            (counts, chain)
        assert len(chain) == 1 + n_bases, chain
        assert _as_sm_rebuilds(sm, lvhd) == {}
        view = sm.classify(lvhd)
        assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [], view
        acks = len(vm.ack_log("xvda"))
        world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)
        assert "paused" not in x.record("VDI", _vdi_ref(x, leaf))["sm_config"]

    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    check(1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s2")
    check(2)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    check(1)
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s2")
    check(0)
    assert _images(world, lvhd) == {leaf}
    _host2_view([disk])
    vm.stop()
    assert host2.detach(_vdi_ref(x, leaf)) == {}
    _no_refcount_warnings(sm)


def test_cbt_kept_across_remote_pauses(world, sm, lvhd, host2):
    """A tracked disk (CBT on, its tapdisk writing the log) of a VM running on host2: a
    snapshot and its delete (a fold: several pauses) taken on the master. Each unpause on
    host2 is SM's tapdisk-pause's, which names the VDI's log (``-c``) as livesnap's local
    unpause does: the blocks written after each are in the leaf's log, and XAPI's changed
    blocks between the snapshot and the disk are exactly those written after it."""
    from test_cbt import _snapshot_vdi, _start_tracked, _stop, _write
    from testxen import cbt
    x = world.xapi
    vm, disks = _start_tracked(world, sr=lvhd)
    (u, ref, leaf_log), = disks.values()
    sr_dir = os.path.dirname(leaf_log)
    host2.attach(ref, vm.paths["xvda"])
    x.record("VM", vm.ref)["resident_on"] = host2.ref
    td = vm.tapdisks["xvda"]
    _write(td, {1, 5}, 1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    s1 = _snapshot_vdi(world, ref, "s1")
    assert cbt.blocks(cbt.log_path(sr_dir, s1)) == {1, 5}
    _write(td, {7, 9}, 2)
    assert cbt.changed_blocks(sr_dir, s1, u) == {7, 9}
    assert [ln for ln in host2.log().splitlines() if "'unpause'" in ln and "'-c'" in ln]
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    _write(td, {11}, 3)
    assert cbt.blocks(leaf_log) == {1, 5, 7, 9, 11}
    _host2_view([vm.paths["xvda"]])
    _stop(world, vm, disks)


def test_create_makes_sms_own_snapshot_calls(world, blktap, sm, lvhd, host2):  # noqa: F811
    """The control for create: SM's own LVHD ``vdi_snapshot`` run on the master of a VDI
    attached on host2 (its tap_pause, ``_updateSlavesPreClone``, ``_updateSlavesOnClone``,
    tap_unpause, through the same plugins), and livesnap's snapshot of another such VM:
    the same calls on the same roles of LVs, in the same order."""
    x = world.xapi
    ours = []
    theirs = []
    for who in ("sm", "livesnap"):
        before = _images(world, lvhd)
        vm = world.add_vm(who, ndisks=1, sr=lvhd, size=8 * MiB)
        disk = vm.paths["xvda"]
        leaf = _uuid(disk)
        _on_host2(world, host2, vm)
        since = len(x.calls)
        if who == "sm":
            sm.run("sm-snapshot", lvhd, _vdi_ref(x, leaf), leaf)      # on the master
        else:
            world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
        calls = sm_hosts.plugin_calls(x, since)
        base = [u for u in _images(world, lvhd) - before - {leaf}
                if x.record("VDI", _vdi_ref(x, u)).get("managed") is False]
        assert len(base) == 1, (base, _images(world, lvhd) - before)
        (theirs if who == "sm" else ours).extend(_roles(calls, {leaf: "leaf",
                                                                base[0]: "base"}))
        assert host2.refcounts()[leaf] == [0, 1]
        assert host2.refcounts()[base[0]] == [1, 0]
        _host2_view([disk])
        vm.stop()
        host2.detach(_vdi_ref(x, leaf))
    assert ours == theirs, (ours, theirs)


def test_masters_follower_folds_for_a_vm_running_on_another_host(world, blktap, sm, lvhd,  # noqa: F811,E501
                                                                 host2, monkeypatch):
    """s1's face deleted outside livesnap (as SM's LVHDVDI.delete does) while the VM runs on
    host2: the master's follower (xapi-follow) owns the VM (LVHD) and folds the base copy
    into the running leaf through host2's tapdisk-pause and on-slave, as the plugin's own
    delete does; with host2 the master, this host's follower skips it when XAPI does not
    record its catalog's host (the master's, as before), and says WRONG_HOST naming the
    master when it does (its catalog is here: to be handed to the master)."""
    from test_follow_service import _due, _in_process_follower
    x = world.xapi
    vm, disk, r, base = _fold_shape(world, blktap, lvhd, host2)
    leaf = _uuid(disk)
    td = vm.tapdisks["xvda"]
    acks = len(vm.ack_log("xvda"))
    _remove_face(world, lvhd, "s1", r)
    reports = []
    f = _in_process_follower(world, sm, monkeypatch, reports)
    try:
        # no key recording the catalog's host (an older livesnap's catalog): the follower
        # of host2 as master would own it; this one skips it without a word
        from livesnap.platforms import xapi_catalog
        other_config = x.record("VM", vm.ref)["other_config"]
        key = other_config.pop(xapi_catalog.KEY)
        x.record("pool", x.pool)["master"] = host2.ref
        assert f.reconcile() == [] and reports == []
        assert _images(world, lvhd) == {leaf, base}
        # with the key, this host (the catalog's) owns it, but only the master may write
        # LVM: refused naming the master, the catalog to be handed to it; nothing changed
        other_config[xapi_catalog.KEY] = key
        _due(f)
        refused, = f.reconcile()
        assert refused["wrong_host"] and host2.uuid in refused["error"] and \
            "catalog_move" in refused["error"], refused
        assert _images(world, lvhd) == {leaf, base}
        # the master's: folded through host2
        x.record("pool", x.pool)["master"] = x.host
        _due(f)
        since = len(x.calls)
        out, = f.reconcile()
    finally:
        f.platform.session.xenapi.session.logout()
    followed_by_a_remote_fold(x, out, since, host2)
    assert _images(world, lvhd) == {leaf}
    world.tapdisks.wait_acks(td.pid, td.minor, acks + 3)       # the guest writes on
    assert host2.refcounts() == {leaf: [0, 1]}, host2.log()[-3000:]
    view = sm.classify(lvhd)
    assert view["coalesceable"] == [] and view["leaf_coalesceable"] == [] and \
        view["garbage"] == [], view
    _host2_view([disk])
    vm.stop()
    assert host2.detach(_vdi_ref(x, leaf)) == {}
    _no_refcount_warnings(sm)
