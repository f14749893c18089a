"""``check`` on a XAPI host compares XAPI's VDI records with the images (SM's metadata drifts:
a ``vhd-parent`` naming a gone base copy, a wrong ``snapshot_of``; XEN-NOTES.md 7b): after
livesnap's own operations it finds nothing; each kind of drift, made by hand in the XAPI
stand-in, is named."""
import os

import pytest

NULL_REF = "OpaqueRef:NULL"


def _refs(world, vm):
    """(leaf ref, face ref, base ref) of disk xvda after one snapshot."""
    x = world.xapi
    by_uuid = {rec["uuid"]: ref for ref, rec in x.objects["VDI"].items()}
    leaf_uuid = os.path.basename(vm.paths["xvda"])[:-len(".vhd")]
    leaf = by_uuid[leaf_uuid]
    base = by_uuid[x.record("VDI", leaf)["sm_config"]["vhd-parent"]]
    face, = [ref for ref, rec in x.objects["VDI"].items()
             if rec["is_a_snapshot"] and rec["snapshot_of"] == leaf]
    return leaf, face, base


def _drift_parent(x, leaf, face, base):
    x.record("VDI", leaf)["sm_config"]["vhd-parent"] = "00000000-dead-beef-0000-000000000000"
    return "vhd-parent is 00000000-dead-beef-0000-000000000000"


def _drift_not_a_snapshot(x, leaf, face, base):
    x.record("VDI", face)["is_a_snapshot"] = False
    return "is not recorded as a snapshot"


def _drift_snapshot_of(x, leaf, face, base):
    x.record("VDI", face)["snapshot_of"] = NULL_REF
    return "is not recorded as a snapshot"


def _drift_managed_base(x, leaf, face, base):
    x.record("VDI", base)["managed"] = True
    return "lists it as a managed VDI"


def _drift_forgotten(x, leaf, face, base):
    x._vdi_forget("VDI.forget", base)
    return "has no VDI record"


@pytest.mark.parametrize("drift", [_drift_parent, _drift_not_a_snapshot, _drift_snapshot_of,
                                   _drift_managed_base, _drift_forgotten],
                         ids=lambda f: f.__name__[len("_drift_"):])
def test_check_names_what_xapis_records_say_and_the_images_do_not(world, drift):
    vm = world.add_vm()
    vm.start()
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    r = world.ok("check", vm_uuid=vm.uuid)
    assert r["ok"] is True and r["problems"] == [], r
    want = drift(world.xapi, *_refs(world, vm))
    r = world.ok("check", vm_uuid=vm.uuid)
    assert r["ok"] is False and [p for p in r["problems"] if want in p], r
    vm.stop()


def test_check_is_clean_after_every_operation(world):
    """Running and halted, create, delete (fold and pull), revert: check finds nothing."""
    vm = world.add_vm()
    vm.start()
    for step in (("snapshot_create", {"name": "s1"}), ("snapshot_create", {"name": "s2"}),
                 ("snapshot_delete", {"name": "s1"}), ("snapshot_delete", {"name": "s2"}),
                 ("snapshot_create", {"name": "s3"})):
        world.ok(step[0], vm_uuid=vm.uuid, **step[1])
        r = world.ok("check", vm_uuid=vm.uuid)
        assert r["ok"] is True, (step, r)
    vm.stop()
    for step in (("snapshot_create", {"name": "s4"}),
                 ("snapshot_revert", {"name": "s3", "keep_current": "k1"}),
                 ("snapshot_delete", {"name": "s4"}), ("snapshot_delete", {"name": "k1"})):
        world.ok(step[0], vm_uuid=vm.uuid, **step[1])
        r = world.ok("check", vm_uuid=vm.uuid)
        assert r["ok"] is True, (step, r)
