"""The XAPI stand-in (testxen/xapi.py) over XML-RPC, through the XenAPI client SM and the
plugin use: the calls SM makes, with xapi's semantics (datamodel: VDI.forget keeps the
storage and drops VBDs; map keys are unique; Async calls return tasks; event.from returns
what changed after a token; snapshot_of and snapshots are one relation)."""
import threading
import time

import pytest
import XenAPI


@pytest.fixture
def api(world):
    s = world.xenapi_session("test")
    try:
        yield s.xenapi
    finally:
        s.xenapi.session.logout()


def test_vdi_sm_config_and_forget(world, api):
    x = world.xapi
    vm = x.add_vm("vm1")
    vdi = x.add_vdi(world.sr)
    snap = x.add_vdi(world.sr, is_a_snapshot=True)
    x.add_vbd(vm, vdi)
    uuid = x.record("VDI", vdi)["uuid"]
    assert api.VDI.get_by_uuid(uuid) == vdi
    api.VDI.add_to_sm_config(vdi, "paused", "true")
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.add_to_sm_config(vdi, "paused", "true")
    assert e.value.details[0] == "MAP_DUPLICATE_KEY"
    api.VDI.remove_from_sm_config(vdi, "paused")
    api.VDI.remove_from_sm_config(vdi, "paused")           # a missing key: fine
    assert "paused" not in api.VDI.get_sm_config(vdi)
    api.VDI.set_snapshot_of(snap, vdi)
    assert api.VDI.get_snapshots(vdi) == [snap]
    assert api.VDI.get_is_a_snapshot(snap) is True
    api.VDI.forget(vdi)
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.get_by_uuid(uuid)
    assert e.value.details[0] == "UUID_INVALID"
    assert x.record("VM", vm)["VBDs"] == [] and x.objects["VBD"] == {}
    assert vdi not in x.record("SR", world.sr)["VDIs"]
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.forget(vdi)
    assert e.value.details[0] == "HANDLE_INVALID"
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.set_uuid(snap, "x")                           # not a settable field
    assert e.value.details[0] == "MESSAGE_METHOD_UNKNOWN"


def test_sr_pbd_pool_host_as_sm_reads_them(world, api):
    sr = world.sr
    pbds = api.PBD.get_all_records()
    assert [p["SR"] for p in pbds.values()] == [sr]
    assert list(pbds.values())[0]["currently_attached"] is True
    host = world.xapi.host
    assert api.host.get_record(host)["enabled"] is True
    assert api.host_metrics.get_live(api.host.get_metrics(host)) is True
    assert list(api.pool.get_all_records().values())[0]["master"] == host
    api.SR.add_to_sm_config(sr, "gc_no_space", "m")
    assert api.SR.get_sm_config(sr) == {"gc_no_space": "m"}
    assert api.SR.get_all_records_where('field "local_cache_enabled" = "true"') == {}
    assert list(api.SR.get_all_records_where('field "type" = "ext"')) == [sr]


def test_async_task_and_messages(world, api):
    task = api.Async.SR.update(world.sr)
    assert api.task.get_status(task) == "success"
    api.task.destroy(task)
    task = api.Async.VDI.forget("OpaqueRef:nope")
    assert api.task.get_status(task) == "failure"
    assert api.task.get_error_info(task)[0] == "HANDLE_INVALID"
    t = api.task.create("Garbage Collection", "d")
    api.task.set_other_config(t, {"applies_to": world.sr})
    api.task.set_progress(t, 0.5)
    assert api.task.get_status(t) == "pending" and api.task.get_progress(t) == 0.5
    m = api.message.create("SM_GC_NO_SPACE", 3, "SR", "u", "body")
    assert api.message.get_record(m)["name"] == "SM_GC_NO_SPACE"
    api.message.destroy(m)
    with pytest.raises(XenAPI.Failure):
        api.message.get_record(m)


def test_vdi_snapshot_fails_as_a_backend_error(world, api):
    vdi = world.xapi.add_vdi(world.sr)
    with pytest.raises(XenAPI.Failure) as e:
        api.VDI.snapshot(vdi, {"type": "internal"})
    assert e.value.details[0].startswith("SR_BACKEND_FAILURE")


def test_event_from(world, api):
    first = getattr(api.event, "from")(["vdi"], "", 0.0)
    token = first["token"]
    assert getattr(api.event, "from")(["vdi"], token, 0.0)["events"] == []
    vdi = world.xapi.add_vdi(world.sr)
    api.VDI.add_to_other_config(vdi, "k", "v")
    api.SR.add_to_other_config(world.sr, "k", "v")          # another class: not returned
    r = getattr(api.event, "from")(["vdi"], token, 0.0)
    assert [(e["operation"], e["ref"]) for e in r["events"]] == [("add", vdi), ("mod", vdi)]
    assert r["events"][1]["snapshot"]["other_config"] == {"k": "v"}
    api.VDI.forget(vdi)
    r2 = getattr(api.event, "from")(["vdi"], r["token"], 0.0)
    assert [(e["operation"], e["ref"]) for e in r2["events"]] == [("del", vdi)]
    # a waiting call returns when something changes
    later = []

    def change():
        time.sleep(0.3)
        later.append(world.xapi.add_vdi(world.sr))
    threading.Thread(target=change).start()
    r3 = getattr(api.event, "from")(["vdi"], r2["token"], 10.0)
    assert [e["ref"] for e in r3["events"]] == later
