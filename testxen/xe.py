"""What ``xe`` sends to xapi for the commands that remove a VM snapshot, call for call, as
xapi's CLI server makes them (xapi-project/xen-api, ocaml/xapi-cli-server/cli_operations.ml):

* ``xe snapshot-destroy`` (``snapshot_destroy``): ``VM.hard_shutdown`` unless Halted, then
  ``VM.destroy`` of the snapshot record; its VDIs stay.
* ``xe snapshot-uninstall`` (``snapshot_uninstall`` -> ``vm_uninstall_common [snap]``) and
  ``xe vm-uninstall`` (``vm_uninstall``: ``vm_uninstall_common (vms @ snapshots)``, the VM
  and every snapshot of it): first, for every VM, the VDIs to destroy are chosen (each VBD
  whose ``other_config`` has ``owner`` and whose VDI still exists; every error in that
  choice skips the VBD) and the suspend VDI; then for each VM in turn ``VM.hard_shutdown``
  unless Halted, ``VM.destroy``, ``VDI.destroy`` of each chosen VDI (an error stops the
  command), ``VDI.destroy`` of the suspend VDI (errors ignored). ``--force`` or the user's
  yes only decides whether the destroys run.

Each function takes a XenAPI session (``session.xenapi``) as xe's CLI server holds one.
"""
NULL_REF = "OpaqueRef:NULL"
OWNER = "owner"          # Constants.owner_key


def _failure():
    import XenAPI
    return XenAPI.Failure


def snapshot_destroy(session, snap):
    x = session.xenapi
    if x.VM.get_power_state(snap) != "Halted":
        x.VM.hard_shutdown(snap)
    x.VM.destroy(snap)


def _chosen(session, vm):
    """(vdis, suspend VDI or NULL_REF) of ``choose_objects_to_delete``."""
    x = session.xenapi
    vdis = []
    for vbd in x.VM.get_VBDs(vm):
        try:
            other_config = x.VBD.get_other_config(vbd)
            vdi = x.VBD.get_VDI(vbd)
            x.VDI.get_uuid(vdi)                    # "Double-check the VDI actually exists"
            if OWNER in other_config:
                vdis.append(vdi)
        except _failure():
            pass
    try:
        suspend = x.VM.get_suspend_VDI(vm)
        x.VDI.get_uuid(suspend)
    except _failure():
        suspend = NULL_REF
    return vdis, suspend


def uninstall(session, vms):
    """``vm_uninstall_common`` with ``--force``; returns [(vm, [VDIs destroyed])]."""
    x = session.xenapi
    plan = [(vm,) + _chosen(session, vm) for vm in vms]
    done = []
    for vm, vdis, suspend in plan:
        if x.VM.get_power_state(vm) != "Halted":
            x.VM.hard_shutdown(vm)
        x.VM.destroy(vm)
        for vdi in vdis:
            x.VDI.destroy(vdi)
        if suspend != NULL_REF:
            try:
                x.VDI.destroy(suspend)
            except _failure():
                pass
        done.append((vm, vdis))
    return done


def snapshot_uninstall(session, snap):
    return uninstall(session, [snap])


def vm_uninstall(session, vm):
    return uninstall(session, [vm] + session.xenapi.VM.get_snapshots(vm))
