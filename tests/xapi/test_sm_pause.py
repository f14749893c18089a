"""SM's pause protocol around livesnap's pauses (issue 13 item 6): while livesnap has a VDI's
real tapdisk paused, the VDI's SM lock (``/var/lock/sm/<vdi>/vdi``) is held and its
``sm_config`` says ``paused``, as SM's ``tap_pause`` leaves them; a VDI SM is working on
(paused, relinking, mirrored) is refused before anything changes (changed-block tracking:
tests/xapi/test_cbt.py)."""
import fcntl
import os
import subprocess
import time
import xmlrpc.client

import pytest

from conftest_paths import PLUGIN
from helpers import LockHolder
from livesnap.tools import tap_ctl


def _call(world, fn, args, **env):
    return subprocess.Popen([PLUGIN, xmlrpc.client.dumps((world.session, args), methodname=fn)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, env=world.env(**env))


def _locked(path):
    """Another process holds a POSIX write lock on ``path``."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _paused(td):
    d = tap_ctl.get(td.pid, td.minor)
    return bool((d.state or 0) & tap_ctl.PAUSED)


def _vdi(world, vm, target):
    u = os.path.basename(vm.paths[target])[:-len(".vhd")]
    ref, = [r for r, rec in world.xapi.objects["VDI"].items() if rec["uuid"] == u]
    return ref, u


def test_a_pause_holds_the_vdi_lock_and_says_paused(world):
    """Caught inside the pause (the plugin made to sleep there): every paused VDI's
    sm_config has ``paused``, its SM lock is held; afterwards both are gone."""
    vm = world.add_vm()
    vm.start()
    seen = {}
    p = _call(world, "snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"},
              LIVESNAP_FAULT="tapdisk:renamed:0:sleep=3",
              LIVESNAP_FAULT_REACHED=os.path.join(world.base, "reached"))
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(world.base, "reached")):
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.02)
        for t in vm.paths:
            ref, u = _vdi(world, vm, t)
            seen[t] = (dict(world.xapi.record("VDI", ref)["sm_config"]),
                       _locked(os.path.join(world.sm_lock_dir, u, "vdi")))
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    (reply,), _ = xmlrpc.client.loads(out)
    assert reply["Status"] == "Success", (reply, err)
    for t, (sm_config, locked) in seen.items():
        assert sm_config.get("paused") == "true" and locked, (t, sm_config, locked)
    for t in vm.paths:
        ref, u = _vdi(world, vm, t)
        assert "paused" not in world.xapi.record("VDI", ref)["sm_config"]
        assert not [k for k in world.xapi.record("VDI", ref)["sm_config"] if "livesnap" in k]
        assert not _locked(os.path.join(world.sm_lock_dir, u, "vdi"))
    vm.stop()


@pytest.mark.parametrize("state", ["paused", "relinking", "mirror"])
@pytest.mark.parametrize("fn", ["snapshot_create", "snapshot_delete"])
def test_a_vdi_sm_works_on_is_refused_with_nothing_changed(world, state, fn):
    """A VDI SM has paused, relinks or mirrors: the create or delete is refused (LIVESNAP_STORAGE_BUSY, naming the disk and why), no file,
    record or tapdisk changed."""
    vm = world.add_vm()
    vm.start()
    if fn == "snapshot_delete":
        world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    world.ok("snapshot_list", vm_uuid=vm.uuid)      # livesnap's catalog made (adoption)
    ref, u = _vdi(world, vm, "xvdb")
    rec = world.xapi.record("VDI", ref)
    rec["sm_config"][state] = "true"
    def files():
        """Every file with its size and mtime; the VM's leaves (the guest writes them) by
        name only."""
        leaves = set(vm.paths.values())
        return {p: (None if p in leaves else v) for p, v in world.snapshot_of_files().items()
                if not p.endswith(".lock")}
    before_files = files()
    before_vdis = sorted(r["uuid"] for r in world.xapi.objects["VDI"].values())
    desc = world.fail(fn, {"vm_uuid": vm.uuid, "name": "s1"}, "LIVESNAP_STORAGE_BUSY")
    assert "xvdb" in desc[1] and u in desc[1], desc
    assert files() == before_files
    assert sorted(r["uuid"] for r in world.xapi.objects["VDI"].values()) == before_vdis
    for td in vm.tapdisks.values():
        assert not _paused(td)
    assert state in rec["sm_config"]                    # SM's keys left as they are
    del rec["sm_config"][state]
    world.ok(fn, vm_uuid=vm.uuid, name="s1")
    vm.stop()


def test_killed_inside_a_pause_recover_takes_its_own_mark_back(world):
    """The plugin killed inside a pause leaves the VDI marked paused (with livesnap's mark
    beside SM's key) and its tapdisk paused: ``recover`` finishes, unpauses and removes both
    keys; a ``paused`` without livesnap's mark (SM's) is never taken over."""
    vm = world.add_vm()
    vm.start()
    p = _call(world, "snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"},
              LIVESNAP_FAULT="tapdisk:renamed:0")
    p.communicate(timeout=120)
    assert p.returncode == -9
    marked = [t for t in vm.paths
              if world.xapi.record("VDI", _vdi(world, vm, t)[0])["sm_config"].get("paused")]
    assert marked, "killed inside the pause: some VDI is marked paused"
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["op"] == "create"
    for t in vm.paths:
        sm_config = world.xapi.record("VDI", _vdi(world, vm, t)[0])["sm_config"]
        assert "paused" not in sm_config and "livesnap-paused" not in sm_config, sm_config
    for td in vm.tapdisks.values():
        assert not _paused(td)
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] == ["s1"]
    vm.stop()


def test_a_pause_waits_for_sms_vdi_lock(world):
    """While SM holds a VDI's lock (its tapdisk-pause plugin at work), livesnap's pause of
    that VDI waits, and goes on when SM lets go."""
    vm = world.add_vm(ndisks=1)
    vm.start()
    ref, u = _vdi(world, vm, "xvda")
    holder = LockHolder(os.path.join(world.sm_lock_dir, u, "vdi"))
    try:
        p = _call(world, "snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"})
        time.sleep(2.0)
        assert p.poll() is None                                 # waiting for SM's lock
        assert not _paused(vm.tapdisks["xvda"])
        holder.release()
        out, err = p.communicate(timeout=120)
    finally:
        holder.kill()
    (reply,), _ = xmlrpc.client.loads(out)
    assert reply["Status"] == "Success", (reply, err)
    vm.stop()
