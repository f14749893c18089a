"""Which host holds a VM's livesnap catalog (issue 13; livesnap/platforms/xapi_catalog.py).

The catalog lives in one host's state directory; the VM moves (live migration, a new pool
master). The host that makes it records itself in the VM's ``other_config``
(``livesnap_catalog`` = ``host=<uuid> vm=<uuid>``); a command on another host is refused
naming it (LIVESNAP_WRONG_HOST) instead of adopting the chain as new, and nothing changes.

"Another host" here: a session the stand-in says is on host2 (``session_hosts``, its
``session.get_this_host``) and that host's own state directory."""
import os

import pytest

from livesnap.platforms import xapi_catalog

KEY = xapi_catalog.KEY
FUNCTIONS = [("snapshot_create", {"name": "s2"}), ("snapshot_delete", {"name": "s1"}),
             ("snapshot_revert", {"name": "s1"}), ("snapshot_list", {}), ("recover", {}),
             ("check", {})]


def _host2(world):
    """host2 of the pool: (its ref, a session on it, its state directory)."""
    x = world.xapi
    ref = x._add("host", {"name_label": "host2", "hostname": "host2", "enabled": True,
                          "PBDs": [], "resident_VMs": []})
    session = x.login()
    x.session_hosts[session] = ref
    state = os.path.join(world.base, "state-host2")
    return ref, session, state


def _run(world, fn, args, session=None, state=None):
    env = {} if state is None else {"LIVESNAP_STATE_DIR": state}
    return world.run_plugin(fn, args, session=session, **env)


def _files(world, *dirs):
    out = {}
    for p, v in world.snapshot_of_files().items():
        if not p.endswith(".lock"):
            out[p] = v
    for d in dirs:
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if not name.endswith(".lock"):
                out[os.path.join(d, name)] = True
    return out


def _vdis(x):
    return sorted((r["uuid"], r.get("is_a_snapshot"), r.get("managed", True))
                  for r in x.objects["VDI"].values())


def test_the_catalogs_host_is_recorded_and_copies_do_not_count(world):
    """A first command records this host, with the VM's uuid, in the VM's other_config; the
    VM snapshot record livesnap makes (``VM.snapshot``, which copies other_config) carries a
    copy naming the VM, not itself: it is no claim on the snapshot record."""
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    assert KEY not in x.record("VM", vm.ref)["other_config"]
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    here = x.record("host", x.host)["uuid"]
    assert xapi_catalog.parse(x.record("VM", vm.ref)["other_config"][KEY]) == \
        {"host": here, "vm": vm.uuid}
    snaps = [r for r in x.objects["VM"].values() if r.get("is_a_snapshot")]
    assert snaps and all(xapi_catalog.parse(r["other_config"].get(KEY)) !=
                         {"host": here, "vm": r["uuid"]} for r in snaps), snaps


@pytest.mark.parametrize("fn,args", FUNCTIONS)
def test_a_command_on_another_host_is_refused_naming_the_catalogs_host(world, fn, args):
    """The VM's catalog is on host1 (s1 taken there); on host2, which has no catalog of it,
    every function is refused naming host1, before anything changes: no catalog made
    there, no image, no XAPI record, the key kept. host1 then works as before."""
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    ref2, s2, state2 = _host2(world)
    key = dict(x.record("VM", vm.ref)["other_config"])
    before, vdis = _files(world, state2), _vdis(x)
    reply = _run(world, fn, dict(args, vm_uuid=vm.uuid), s2, state2)
    assert reply["Status"] == "Failure", reply
    desc = reply["ErrorDescription"]
    assert desc[0] == "LIVESNAP_WRONG_HOST", (desc, world.last.stderr)
    assert x.record("host", x.host)["uuid"] in desc[1] and "catalog" in desc[1], desc
    assert _files(world, state2) == before and _vdis(x) == vdis
    assert not [n for n in os.listdir(state2) if n.endswith(".db")] \
        if os.path.isdir(state2) else True
    assert x.record("VM", vm.ref)["other_config"] == key
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] == \
        ["s1"]


def test_a_catalog_on_both_hosts_the_keys_host_is_the_vms(world):
    """host2 has a catalog of the VM too (an older livesnap adopted it there after a
    migration) but the key names host1: host2 is refused, naming host1 and its own stale
    catalog; nothing changes."""
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    ref2, s2, state2 = _host2(world)
    x.session_hosts[world.session] = ref2              # "older livesnap" on host2: no key
    r = _run(world, "snapshot_list", {"vm_uuid": vm.uuid}, state=state2)
    assert r["Status"] == "Success", r
    x.record("VM", vm.ref)["other_config"].pop(KEY)
    del x.session_hosts[world.session]
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    before = _files(world, state2)
    reply = _run(world, "snapshot_delete", {"vm_uuid": vm.uuid, "name": "s1"}, s2, state2)
    desc = reply["ErrorDescription"]
    assert desc[0] == "LIVESNAP_WRONG_HOST", desc
    assert x.record("host", x.host)["uuid"] in desc[1] and "not the VM's current" in desc[1]
    assert _files(world, state2) == before


def test_the_state_directory_lost_is_said_not_adopted(world):
    """The key names this host but its catalog is gone (state directory lost): every
    command is an error that says so, nothing adopted, nothing changed; with the key
    removed (as the message says) the chain is adopted as it is."""
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    for name in os.listdir(world.state_dir):
        os.unlink(os.path.join(world.state_dir, name))
    before, vdis = _files(world), _vdis(x)
    for fn, args in FUNCTIONS:
        desc = world.fail(fn, dict(args, vm_uuid=vm.uuid), "LIVESNAP_CATALOG_ERROR")
        assert "state directory was lost" in desc[1] and KEY in desc[1], desc
        assert _files(world) == before and _vdis(x) == vdis, fn
        assert not [n for n in os.listdir(world.state_dir) if n.endswith(".db")], fn
    x.record("VM", vm.ref)["other_config"].pop(KEY)
    world.ok("snapshot_list", vm_uuid=vm.uuid)
    assert KEY in x.record("VM", vm.ref)["other_config"]


def test_no_key_is_todays_behaviour_and_gets_one(world):
    """A catalog made by an older livesnap (no key): used, and the key written; a VM with no
    key and no catalog anywhere: adopted; a key copied from another VM (a clone's, a
    template's) counts as none."""
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    x.record("VM", vm.ref)["other_config"].pop(KEY)
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] == \
        ["s1"]
    assert xapi_catalog.parse(x.record("VM", vm.ref)["other_config"][KEY])["vm"] == vm.uuid
    clone = world.add_vm("clone", ndisks=1)
    ref2, s2, state2 = _host2(world)
    x.record("VM", clone.ref)["other_config"][KEY] = \
        x.record("VM", vm.ref)["other_config"][KEY]            # names vm, on host1
    r = _run(world, "snapshot_create", {"vm_uuid": clone.uuid, "name": "c1"}, s2, state2)
    assert r["Status"] == "Success", r
    assert xapi_catalog.parse(x.record("VM", clone.ref)["other_config"][KEY]) == \
        {"host": x.record("host", ref2)["uuid"], "vm": clone.uuid}


# -- catalog_move: a catalog handed to another host on purpose --------------------------------

def _serve_livesnap(world, ref2, state2):
    """host2's livesnap plugin for ``host.call_plugin``: the plugin run on host2 (a session
    on it, its state directory), as xapi runs it there."""
    from testxen.xapi import Failure

    def serve(session, fn, args):
        s = world.xapi.login()
        world.xapi.session_hosts[s] = ref2
        reply = world.run_plugin(fn, args, session=s, LIVESNAP_STATE_DIR=state2)
        if reply["Status"] != "Success":
            raise Failure(*reply["ErrorDescription"])
        return reply["Value"]
    world.xapi.host_plugins[(ref2, "livesnap")] = serve


def _dbs(d):
    return sorted(n for n in os.listdir(d) if n.endswith(".db")) if os.path.isdir(d) else []


def test_catalog_move_hands_the_catalog_over(world):
    """catalog_move on the holding host: host2 then holds the catalog (s1 listed and deleted
    there), XAPI's key names it, host1's catalog is gone and host1 is refused naming host2;
    moved back the same way."""
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    ref2, s2, state2 = _host2(world)
    _serve_livesnap(world, ref2, state2)
    uuid2 = x.record("host", ref2)["uuid"]
    out = world.ok("catalog_move", vm_uuid=vm.uuid, host_uuid=uuid2)
    assert out["to_host"] == uuid2, out
    assert _dbs(world.state_dir) == [] and _dbs(state2) == [vm.uuid + ".db"]
    assert xapi_catalog.parse(x.record("VM", vm.ref)["other_config"][KEY])["host"] == uuid2
    desc = world.fail("snapshot_list", {"vm_uuid": vm.uuid}, "LIVESNAP_WRONG_HOST")
    assert uuid2 in desc[1], desc
    r = _run(world, "snapshot_list", {"vm_uuid": vm.uuid}, s2, state2)
    assert r["Status"] == "Success", r
    assert '"s1"' in r["Value"]
    r = _run(world, "snapshot_create", {"vm_uuid": vm.uuid, "name": "s2"}, s2, state2)
    assert r["Status"] == "Success", r
    # and back: host1 receives it through its plugin
    _serve_livesnap_here(world)
    r = _run(world, "catalog_move", {"vm_uuid": vm.uuid,
                                     "host_uuid": x.record("host", x.host)["uuid"]}, s2, state2)
    assert r["Status"] == "Success", (r, world.last.stderr)
    assert _dbs(state2) == [] and _dbs(world.state_dir) == [vm.uuid + ".db"]
    names = [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]]
    assert names == ["s1", "s2"], names


def _serve_livesnap_here(world):
    from testxen.xapi import Failure

    def serve(session, fn, args):
        reply = world.run_plugin(fn, args, session=world.xapi.login())
        if reply["Status"] != "Success":
            raise Failure(*reply["ErrorDescription"])
        return reply["Value"]
    world.xapi.host_plugins[(world.xapi.host, "livesnap")] = serve


def test_catalog_move_refused_with_an_unfinished_operation_or_a_catalog_there(world):
    """A create killed mid-way leaves an unfinished operation: catalog_move is refused
    (LIVESNAP_INTERRUPTED), nothing moved; after recover it moves. A target that has a
    catalog of the VM already refuses it: the key and the holder's catalog are kept."""
    import subprocess
    import xmlrpc.client
    from conftest_paths import PLUGIN
    x = world.xapi
    vm = world.add_vm(ndisks=1)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    ref2, s2, state2 = _host2(world)
    _serve_livesnap(world, ref2, state2)
    uuid2 = x.record("host", ref2)["uuid"]
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {
        "vm_uuid": vm.uuid, "name": "s2"}), methodname="snapshot_create")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        env=world.env(LIVESNAP_FAULT="create:after:0"), timeout=300)
    assert p.returncode == -9, (p.returncode, p.stderr)
    key = x.record("VM", vm.ref)["other_config"][KEY]
    desc = world.fail("catalog_move", {"vm_uuid": vm.uuid, "host_uuid": uuid2},
                      "LIVESNAP_INTERRUPTED")
    assert "recover" in desc[1], desc
    assert _dbs(state2) == [] and x.record("VM", vm.ref)["other_config"][KEY] == key
    world.ok("recover", vm_uuid=vm.uuid)
    # host2 has a (stale) catalog of the VM: it refuses; nothing changes
    os.makedirs(state2, exist_ok=True)
    with open(os.path.join(state2, vm.uuid + ".db"), "wb") as f:
        f.write(b"")
    reply = world.run_plugin("catalog_move", {"vm_uuid": vm.uuid, "host_uuid": uuid2})
    assert reply["Status"] == "Failure", reply
    assert "already" in " ".join(reply["ErrorDescription"]), reply
    assert x.record("VM", vm.ref)["other_config"][KEY] == key
    assert _dbs(world.state_dir) == [vm.uuid + ".db"]
    os.unlink(os.path.join(state2, vm.uuid + ".db"))
    world.ok("catalog_move", vm_uuid=vm.uuid, host_uuid=uuid2)
    r = _run(world, "snapshot_list", {"vm_uuid": vm.uuid}, s2, state2)
    assert r["Status"] == "Success" and '"s2"' in r["Value"], r


def test_lvhd_after_a_new_master_the_catalog_is_handed_to_it(world, lvm_vg):
    """An LVHD VM's catalog on host1, the master; host2 becomes the master (xe
    pool-designate-new-master): host1 is refused naming host2 (only the master writes LVM;
    the catalog to be handed over), host2 refused naming host1 (the catalog's host); nothing
    changes. catalog_move hands it to host2, which then takes a snapshot."""
    x = world.xapi
    sr = world.add_lvm_sr(lvm_vg)
    vm = world.add_vm("lv", ndisks=1, sr=sr)
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    ref2, s2, state2 = _host2(world)
    _serve_livesnap(world, ref2, state2)
    uuid1, uuid2 = x.record("host", x.host)["uuid"], x.record("host", ref2)["uuid"]
    x.record("pool", x.pool)["master"] = ref2
    lvs = sorted(lvm_vg.loops())
    desc = world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s2"},
                      "LIVESNAP_WRONG_HOST")
    assert uuid2 in desc[1] and "pool master" in desc[1] and "catalog_move" in desc[1], desc
    reply = _run(world, "snapshot_create", {"vm_uuid": vm.uuid, "name": "s2"}, s2, state2)
    desc = reply["ErrorDescription"]
    assert desc[0] == "LIVESNAP_WRONG_HOST" and uuid1 in desc[1], desc
    assert sorted(lvm_vg.loops()) == lvs
    world.ok("catalog_move", vm_uuid=vm.uuid, host_uuid=uuid2)
    reply = _run(world, "snapshot_create", {"vm_uuid": vm.uuid, "name": "s2"}, s2, state2)
    assert reply["Status"] == "Success", (reply, world.last.stderr)
    assert len(lvm_vg.loops()) > len(lvs)
