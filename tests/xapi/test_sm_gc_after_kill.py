"""livesnap killed in the middle of a command, then XAPI's storage manager acting BEFORE
``livesnap recover`` runs, as after a host crash or reboot: SM's own scan of the SR (the
``SR.scan`` any client makes when the SR is back) and a full real GC pass (SM v3.2.12,
cleanup.py, to its end), only then ``recover``. After it: every snapshot reads what it read
when taken, the disk every byte written before (offline) or every acknowledged guest write
(a running VM, its ack log), the real ``vhd-util check`` passes on every image, SM's GC
finds nothing left to do, and livesnap's ``check`` is clean.

livesnap's journal is in its catalog, not in SM's journals; these tests show what SM's GC
does to each half-done state it can meet. The kill points are the ones the crash tests use:
every journal step of the operation's plan (``<op>:before:i``, ``<op>:after:i``, the plan read
from the command's dry run), the commit (``<op>:committed:0``) and the datapath's points
inside a step (a pause after a rename, a fold's last pause, an inflated LV)."""
import os
import subprocess
import xmlrpc.client

import pytest

from conftest_paths import PLUGIN
from testxen import blktap as txblktap
from testxen.verify import assert_intact
from test_sm_gc import (MiB, Scenario, _fold_sr, _fold_vm, activate_lvs,  # noqa: F401
                        blktap, lvhd_scenario, scenario, sm, sm_tree)


def _killed(world, fn, fault, **args):
    """The plugin run as xapi runs it, killed (SIGKILL) at ``fault``."""
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, args), methodname=fn)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=world.env(LIVESNAP_FAULT=fault), timeout=120)
    assert p.returncode == -9, (fault, p.returncode, p.stdout, p.stderr)


def _points(world, vm_uuid, fn, op, extra, **args):
    """Every journal step of the plan ``fn`` would carry out now (its dry run), before and
    after, the commit, then ``extra`` (datapath points)."""
    plan = world.ok(fn, vm_uuid=vm_uuid, dry_run="true", **args)
    n = len(plan["steps"])
    assert n >= 1, plan
    return (["%s:%s:%d" % (op, w, i) for i in range(n) for w in ("before", "after")]
            + ["%s:committed:0" % op] + list(extra))


def _sm_then_recover(world, sm, sr, vm_uuid):
    """SM first: its scan and a full GC pass over the half-done state; then recover."""
    activate_lvs(world, sr)
    world.xapi.scan(sr)                 # SR.scan: SM's driver scan, records as xapi makes them
    sm.gc(sr)
    return world.ok("recover", vm_uuid=vm_uuid)


def _check_after(world, sm, sr, sc):
    """Every snapshot of ``sc`` as taken (``sc.expected``), every image sound, nothing left
    for SM's GC, livesnap's check clean."""
    activate_lvs(world, sr)
    images = sc.images()
    assert sorted(images) == sorted(sc.expected), (images, sorted(sc.expected))
    for name, data in sorted(sc.expected.items()):
        assert sc.blktap.check(images[name]) is None, (name, sc.blktap.check(images[name]))
        assert sc.blktap.read(images[name]) == data, "snapshot %s reads differently" % name
    for path in world.xapi.sr_images(sr).values():
        assert sc.blktap.check(path) is None, (path, sc.blktap.check(path))
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view
    sm.gc(sr)
    activate_lvs(world, sr)
    for name, data in sorted(sc.expected.items()):
        assert sc.blktap.read(images[name]) == data, "snapshot %s, second GC" % name
    r = world.ok("check", vm_uuid=sc.vm.uuid)
    assert r.get("ok", True) and not r.get("problems"), r


def _sr(request, kind):
    return request.getfixturevalue("scenario" if kind == "file" else "lvhd_scenario").sr


# -- offline: a halted VM ----------------------------------------------------------------------

def _create(sc):
    """Killed in ``create s1``: s1 is there as the disk read, or not there."""
    sc.write()
    before = sc.blktap.read(sc.disk)
    return ("snapshot_create", "create", {"name": "s1"}, [],
            lambda listed: ({"s1": before} if "s1" in listed else {}, before))


def _delete_merge(sc):
    """s1, s2; killed in ``delete s1`` (one child, s2's image: merged offline)."""
    sc.write(); sc.create("s1")
    sc.write(); sc.create("s2")
    sc.write()
    sc.activate()
    before = sc.blktap.read(sc.disk)
    s2 = sc.expected["s2"]
    return ("snapshot_delete", "delete", {"name": "s1"}, ["lvm:inflated:0", "lvm:replaced:0"],
            lambda listed: ({"s2": s2}, before))


def _revert_keep(sc):
    """s1; killed in ``revert s1 keep_current=k1``: reverted (the disk reads s1, k1 what the
    disk read) or not (the disk as it was, no k1)."""
    sc.write(); sc.create("s1")
    sc.write()
    sc.activate()
    before = sc.blktap.read(sc.disk)
    s1 = sc.expected["s1"]

    def outcome(listed):
        if "k1" in listed:
            return {"s1": s1, "k1": before}, s1
        return {"s1": s1}, before
    return ("snapshot_revert", "revert", {"name": "s1", "keep_current": "k1"}, [], outcome)


# the points run by default (the whole suite's time); LIVESNAP_EVERY_KILL_POINT=1 runs every
# point of the plan (about 3 minutes). On the code before the GC hold, delete failed at
# every point between its first step and its last, revert on LVHD at revert:after:0.
SAMPLE = {("file", "create"): ["create:after:0"], ("lvhd", "create"): ["create:after:0"],
          ("file", "delete"): ["delete:after:1"], ("lvhd", "delete"): ["delete:after:0"],
          ("file", "revert"): ["revert:after:0"], ("lvhd", "revert"): ["revert:after:0"]}


@pytest.mark.parametrize("kind", ["file", "lvhd"])
@pytest.mark.parametrize("shape", [_create, _delete_merge, _revert_keep],
                         ids=lambda f: f.__name__[1:])
def test_offline_killed_then_sm_then_recover(request, world, blktap, sm, kind, shape):
    sr = _sr(request, kind)
    probe = Scenario(world, blktap, sm, sr)
    fn, op, args, extra, _ = shape(probe)
    points = _points(world, probe.vm.uuid, fn, op, extra, **args)
    if not os.environ.get("LIVESNAP_EVERY_KILL_POINT"):
        assert set(SAMPLE[kind, op]) <= set(points), (SAMPLE[kind, op], points)
        points = SAMPLE[kind, op]
    covered, failed = [], {}
    for fault in points:
        sc = Scenario(world, blktap, sm, sr)
        fn, op, args, _, outcome = shape(sc)
        try:
            _killed(world, fn, fault, vm_uuid=sc.vm.uuid, **args)
        except AssertionError:
            # a datapath point this shape does not pass (the file SR has no LVs)
            if fault.split(":")[0] in ("lvm",):
                continue
            raise
        try:
            _sm_then_recover(world, sm, sr, sc.vm.uuid)
            activate_lvs(world, sr)
            sc.expected, disk = outcome(sc.images())
            _check_after(world, sm, sr, sc)
            assert sc.blktap.read(sc.disk) == disk, "the disk after recover"
        except AssertionError as e:
            failed[fault] = str(e)[:300]
            continue
        covered.append(fault)
    print("\nkilled then SM then recover (%s %s): ok %s, failed %s" % (kind, op, covered,
                                                                      sorted(failed)))
    assert not failed, failed


# -- online: a running VM, the host going down with livesnap ------------------------------------

def _host_down(world, vm):
    """The host crashes: each tapdisk is SIGKILLed (paused or not), then its guest (a write
    in flight is never acked); the VM is halted. The ack logs, by disk."""
    logs = {}
    for t, td in vm.tapdisks.items():
        logs[t] = vm.ack_log(t)
        txblktap.kill(td.pid, td.minor)
        g = world.tapdisks.guests.pop((td.pid, td.minor))
        g.kill()
        g.wait()
        world.tapdisks.disks.pop((td.pid, td.minor), None)
    vm.tapdisks = {}
    rec = world.xapi.record("VM", vm.ref)
    rec["power_state"], rec["resident_on"] = "Halted", "OpaqueRef:NULL"
    return logs


@pytest.mark.parametrize("kind,fault", [
    ("ext", "tapdisk:folded:0"), ("ext", "delete:after:0"), ("ext", "tapdisk:renamed:0"),
    ("lvm", "tapdisk:renamed:0"), ("lvm", "lvm:inflated:0"), ("lvm", "tapdisk:folded:0"),
    ("lvm", "lvm:replaced:0"), ("ext", "merge:reparented:0"), ("lvm", "merge:reparented:0")])
def test_fold_killed_host_down_then_sm_then_recover(request, world, blktap, sm, kind, fault):
    """The only snapshot of a running VM deleted (its base folded into the running leaf),
    livesnap killed inside the fold and the host going down with it; SM's scan and GC run on
    the SR before ``recover``: afterwards one image at the VM's path with every acknowledged
    guest write and every byte written before, SM finds nothing to do, check is clean."""
    sr = _fold_sr(request, world, sm, kind)
    vm, disk = _fold_vm(world, blktap, sr)
    before = txblktap.read(disk, 8 * MiB, 24 * MiB)
    vm.start()
    _killed(world, "snapshot_delete", fault, vm_uuid=vm.uuid, name="s1")
    logs = _host_down(world, vm)
    _sm_then_recover(world, sm, sr, vm.uuid)
    activate_lvs(world, sr)
    assert world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"] == []
    assert_intact(logs["xvda"], disk)
    assert txblktap.read(disk, 8 * MiB, 24 * MiB) == before
    for path in world.xapi.sr_images(sr).values():
        assert blktap.check(path) is None, (path, blktap.check(path))
    view = sm.classify(sr)
    assert view["coalesceable"] == view["leaf_coalesceable"] == view["garbage"] == [], view
    r = world.ok("check", vm_uuid=vm.uuid)
    assert r.get("ok", True) and not r.get("problems"), r


# -- the hold itself: in XAPI's database, taken back by recover, the administrator's kept ------

@pytest.mark.parametrize("admin_off", [False, True], ids=["gc-on", "gc-off-by-admin"])
def test_gc_hold_outlives_the_kill_and_recover_lets_go(world, blktap, sm, scenario, admin_off):
    """A kill inside a delete leaves SM's switch ``other_config:gc=false`` on the SR with the
    VM as holder (SM's GC then exits at once: no image goes); a second VM's operation on the
    same SR meanwhile holds and lets go without ending the first hold; recover lets go. The
    SR's switches are then as before: on, or off when the administrator had set it off."""
    x = world.xapi
    oc = x.record("SR", scenario.sr)["other_config"]
    if admin_off:
        oc["gc"] = "false"
    sc = scenario
    sc.write(); sc.create("s1")
    sc.write(); sc.create("s2")
    _killed(world, "snapshot_delete", "delete:after:0", vm_uuid=sc.vm.uuid, name="s1")
    held = ("-," if admin_off else "") + sc.vm.uuid      # "-": gc was off before livesnap
    assert oc.get("gc") == "false" and oc.get("livesnap-gc-held") == held, oc
    files = sorted(os.listdir(x.sr_dir(sc.sr)))
    sm.gc(sc.sr)
    assert "GC is disabled for this SR" in sm.log()
    assert sorted(os.listdir(x.sr_dir(sc.sr))) == files
    other = Scenario(world, blktap, sm, sc.sr)
    other.write(); other.create("t1")
    assert oc.get("gc") == "false" and oc.get("livesnap-gc-held") == held, oc
    world.ok("recover", vm_uuid=sc.vm.uuid)
    assert "livesnap-gc-held" not in oc, oc
    assert oc.get("gc") == ("false" if admin_off else None), oc


def test_the_follower_recovers_a_killed_operation_and_ends_its_hold(world, blktap, sm,
                                                                    scenario, monkeypatch):
    """A delete killed mid-way leaves its journal open and SM's GC held off the SR
    (``gc=false``). The host's follower (xapi-follow), with no snapshot deleted outside
    livesnap, finds the open operation at its next comparison and recovers it: the delete
    finished, the hold ended, SM's switch back on; a second comparison has nothing to do."""
    from test_follow_service import _in_process_follower
    x = world.xapi
    sc = scenario
    sc.write(); sc.create("s1")
    sc.write(); sc.create("s2")
    _killed(world, "snapshot_delete", "delete:after:0", vm_uuid=sc.vm.uuid, name="s1")
    oc = x.record("SR", sc.sr)["other_config"]
    assert oc.get("gc") == "false" and oc.get("livesnap-gc-held") == sc.vm.uuid, oc
    reports = []
    f = _in_process_follower(world, sm, monkeypatch, reports)
    try:
        out, = f.reconcile()
        assert out["vm_uuid"] == sc.vm.uuid and "error" not in out, out
        assert out["recovered"]["op"] == "delete", out
        assert "livesnap-gc-held" not in oc and oc.get("gc", "true") != "false", oc
        assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=sc.vm.uuid)
                ["snapshots"]] == ["s2"]
        assert f.reconcile() == []
    finally:
        f.platform.session.xenapi.session.logout()
    r = world.ok("check", vm_uuid=sc.vm.uuid)
    assert r.get("ok", True) and not r.get("problems"), r
