"""XAPI's VM snapshot record of each livesnap snapshot: what XenCenter's Snapshots tab and
``xe snapshot-list`` read (a VM with ``is_a_snapshot``, ``snapshot_of`` the VM, VBDs naming
the snapshot's VDIs).

In xapi ``VM.is_a_snapshot`` is read-only (datamodel_vm.ml, DynamicRO): only
``VM.snapshot``/``VM.checkpoint`` (xapi_vm_clone.ml ``copy_vm_record``) make such a VM, and
``VM.snapshot`` has SM snapshot every disk it does not ignore. livesnap keeps its own
one-instant pause of all disks: after the images are made, ``VM.snapshot`` with every disk
VDI of the VM in ``ignore_vdis`` (xapi >= 21.4.0) makes the record with no disk VBD
(xapi_vm_clone.ml ``clone`` filters those VBDs out; a CD keeps its VDI, as in xapi's own
snapshots); then ``VBD.create`` (xapi_vbd.ml ``create``: a DB call that does not ask what kind
of VM it is) gives it one VBD per snapshot disk, as ``Xapi_vbd_helpers.copy`` would have
(the VM's VBD's slot and flags, ``other_config`` ``owner`` so that ``xe snapshot-uninstall``
destroys the disks as it destroys xapi's own, CA-58405). The record carries
``other_config`` ``livesnap_snapshot`` = the snapshot's name; its ``revert`` is blocked
(xapi's revert would destroy the VM's own VDI under livesnap's catalog). ``VM.destroy`` of
the record drops its VBDs and keeps every VDI (xapi_vm_helpers.ml ``destroy``).

A crash between ``VM.snapshot`` and its marking leaves a record with the snapshot's name, no
disk VBD and no mark: the next sync adopts it instead of making a second one.

Once a record names all of a snapshot's VDIs, each of those VDIs carries its uuid
(``other_config`` ``livesnap_record``; set after the record, so a kill in between leaves a
record the next sync adopts and completes). A visible snapshot whose VDIs name a record
XAPI no longer has lost it to the user (``xe snapshot-destroy``, XenCenter's "delete
snapshot" keeping the disks: ``VM.destroy`` only): livesnap does not make it again, its
VDIs stay XAPI snapshots of the disk's VDI (as after xapi's own snapshot-destroy) and the
snapshot livesnap's, ``check`` gives it as a note. livesnap's own ``VM.destroy``
(``drop_stale``) is only of a snapshot the catalog no longer has as visible.
Python 3.6, stdlib only.
"""
import logging

from livesnap import faults
from livesnap.errors import Error

log = logging.getLogger(__name__)

KEY = "livesnap_snapshot"
RECORD_KEY = "livesnap_record"          # VDI other_config: the uuid of its snapshot's record
NULL_REF = "OpaqueRef:NULL"
REVERT_BLOCKED = ("livesnap snapshot: revert it with the livesnap plugin (fn=snapshot_revert "
                  "args:name=%s); xapi's revert would replace the VM's disk under livesnap")


def _disks(platform, vm_rec):
    """{userdevice: VDI ref} of a VM record's disk VBDs."""
    out = {}
    for vbd in vm_rec.get("VBDs", []):
        try:
            v = platform.call("VBD.get_record", vbd)
        except Error:
            continue                                        # gone meanwhile
        if v.get("type") == "Disk" and not v.get("empty") and v.get("VDI", NULL_REF) != NULL_REF:
            out[v.get("userdevice")] = v["VDI"]
    return out


def records(domain):
    """{name: [(ref, record, {userdevice: VDI ref})]} of the VM snapshot records of the VM
    that livesnap made (marked), and [(ref, record)] of unmarked ones with no disk VBD (a
    crash before the mark)."""
    platform = domain.platform
    marked, unmarked = {}, []
    for ref in platform.call("VM.get_snapshots", domain.ref):
        try:
            rec = platform.call("VM.get_record", ref)
        except Error:
            continue                                        # destroyed meanwhile
        if not rec.get("is_a_snapshot") or rec.get("snapshot_of") != domain.ref:
            continue
        name = (rec.get("other_config") or {}).get(KEY)
        disks = _disks(platform, rec)
        if name is not None:
            marked.setdefault(name, []).append((ref, rec, disks))
        elif not disks:
            unmarked.append((ref, rec))
    return marked, unmarked


def wanted(domain, tree, vdi_ref):
    """{snapshot name: {userdevice: VDI ref}} of the catalog's visible snapshots, each disk's
    VDI the one of its snapshot node (``vdi_ref(node)``; None when XAPI has none, e.g. before
    a scan: ``check`` names the missing VDI)."""
    out = {}
    for snap in tree.visible_snapshots():
        disks = {}
        for disk, nid in sorted(tree.snapshot_nodes(snap.name).items()):
            n = tree.nodes[nid]
            vbd = domain._vbds.get(disk)
            if n.state != "snapshot" or vbd is None:
                continue
            disks[vbd.get("userdevice")] = vdi_ref(n)
        if disks:
            out[snap.name] = disks
    return out


def drop_stale(domain, tree):
    """``VM.destroy`` of each livesnap record whose snapshot the catalog no longer has as a
    visible one (deleted, or hidden: kept only for its children); the VDIs stay, each goes
    with its own snapshot. Returns [["destroyed", name]]."""
    visible = {s.name for s in tree.visible_snapshots()}
    changes = []
    marked, _ = records(domain)
    for name, recs in sorted(marked.items()):
        if name in visible:
            continue
        for ref, rec, _disks in recs:
            domain.platform.call("VM.destroy", ref)
            log.info("VM snapshot record %s of %s (snapshot %s) destroyed", rec.get("uuid"),
                     domain.name, name)
        changes.append(["destroyed", name])
    return changes


def sync(domain, tree, vdi_ref):
    """One record per visible snapshot, naming exactly its VDIs: made, adopted, completed
    (a VBD missing) or remade (a VBD naming another VDI); a second record of one snapshot is
    destroyed. Returns [[change, name]]."""
    platform = domain.platform
    want = wanted(domain, tree, vdi_ref)
    marked, unmarked = records(domain)
    changes = []
    for name, disks in sorted(want.items()):
        if None in disks.values():
            log.warning("snapshot %s of %s: a VDI is missing in XAPI; no VM snapshot record "
                        "made", name, domain.name)
            continue
        recs = marked.get(name, [])
        if not recs and destroyed_by_user(domain, disks) is not None:
            continue
        keep = None
        for ref, rec, have in recs:
            if keep is None and set(have.items()) <= set(disks.items()):
                keep = (ref, have)
            else:
                platform.call("VM.destroy", ref)
                changes.append(["destroyed", name])
        if keep is None:
            orphan = [r for r, rec in unmarked if rec.get("name_label") == name]
            if orphan:
                ref = orphan[0]
                unmarked = [(r, rec) for r, rec in unmarked if r != ref]
                changes.append(["adopted", name])
            else:
                ref = _snapshot(domain, name)
                changes.append(["made", name])
            platform.call("VM.add_to_other_config", ref, KEY, name)
            keep = (ref, {})
        ref, have = keep
        blocked = platform.call("VM.get_blocked_operations", ref)
        if "revert" not in blocked:
            platform.call("VM.add_to_blocked_operations", ref, "revert", REVERT_BLOCKED % name)
        missing = sorted(u for u in disks if u not in have)
        for userdevice in missing:
            _vbd(domain, ref, userdevice, disks[userdevice])
        if missing and recs:
            changes.append(["completed", name])
        if missing:
            faults.point("xapi", "recorded", 0)
        _mark_vdis(domain, ref, disks)
    return changes


def _mark_vdis(domain, vm_ref, disks):
    """Each of the snapshot's VDIs names its record's uuid (``RECORD_KEY``)."""
    platform = domain.platform
    rec_uuid = platform.call("VM.get_uuid", vm_ref)
    for vdi in sorted(disks.values()):
        have = platform.call("VDI.get_other_config", vdi).get(RECORD_KEY)
        if have == rec_uuid:
            continue
        if have is not None:
            platform.call("VDI.remove_from_other_config", vdi, RECORD_KEY)
        platform.call("VDI.add_to_other_config", vdi, RECORD_KEY, rec_uuid)


def destroyed_by_user(domain, disks):
    """The uuid of the record a snapshot's VDIs (``{userdevice: VDI ref}``) name that XAPI no
    longer has (``VM.destroy`` not livesnap's: ``xe snapshot-destroy``), or None."""
    platform = domain.platform
    for vdi in sorted(v for v in disks.values() if v is not None):
        try:
            rec_uuid = platform.call("VDI.get_other_config", vdi).get(RECORD_KEY)
        except Error:
            continue                                        # gone meanwhile
        if not rec_uuid:
            continue
        try:
            platform.call("VM.get_by_uuid", rec_uuid)
        except Error as e:
            if getattr(e, "details", None) and e.details[0] == "UUID_INVALID":
                return rec_uuid
            raise
    return None


def _snapshot(domain, name):
    """``VM.snapshot`` with every disk VDI of the VM ignored: the record, no disk VBD."""
    platform = domain.platform
    ignore = sorted(_disks(platform, {"VBDs": platform.call("VM.get_VBDs", domain.ref)})
                    .values())
    ref = platform.call("VM.snapshot", domain.ref, name, ignore)
    faults.point("xapi", "snapshotted", 0)
    return ref


def _vbd(domain, vm_ref, userdevice, vdi):
    """The snapshot disk's VBD, as ``Xapi_vbd_helpers.copy`` makes it from the VM's VBD."""
    src = next(v for v in domain._vbds.values() if v.get("userdevice") == userdevice)
    read_only = domain.platform.call("VDI.get_read_only", vdi)
    domain.platform.call("VBD.create", {
        "VM": vm_ref, "VDI": vdi, "userdevice": userdevice, "device": "",
        "bootable": bool(src.get("bootable")),
        "mode": "RO" if read_only else src.get("mode", "RW"), "type": "Disk",
        "unpluggable": bool(src.get("unpluggable", True)), "empty": False,
        "other_config": {"owner": ""}, "currently_attached": False,
        "qos_algorithm_type": src.get("qos_algorithm_type", ""),
        "qos_algorithm_params": src.get("qos_algorithm_params") or {}})


def uuids(domain):
    """{snapshot name: uuid of its VM snapshot record}."""
    marked, _ = records(domain)
    return {name: recs[0][1].get("uuid") for name, recs in marked.items()}


def problems(domain, tree, vdi_ref):
    """What XenCenter and xe would show wrong: a visible snapshot with no record or several,
    a record naming other VDIs than the snapshot's, a record of a snapshot the catalog does
    not have as visible."""
    out = []
    want = wanted(domain, tree, vdi_ref)
    marked, _ = records(domain)
    for name, disks in sorted(want.items()):
        recs = marked.get(name, [])
        if not recs and destroyed_by_user(domain, disks) is not None:
            continue                                        # a note (``notes``)
        if not recs:
            out.append("snapshot %s has no VM snapshot record in XAPI (XenCenter's Snapshots "
                       "tab and xe snapshot-list do not show it; 'recover' makes it)" % name)
        elif len(recs) > 1:
            out.append("snapshot %s has %d VM snapshot records (%s)" % (
                name, len(recs), ", ".join(sorted(r[1].get("uuid") for r in recs))))
        for ref, rec, have in recs:
            if have != disks and None not in disks.values():
                out.append("VM snapshot record %s of snapshot %s names VDIs %s, the "
                           "snapshot's are %s" % (rec.get("uuid"), name, _show(domain, have),
                                                  _show(domain, disks)))
    visible = {s.name for s in tree.visible_snapshots()}
    for name, recs in sorted(marked.items()):
        if name not in visible:
            for ref, rec, have in recs:
                out.append("VM snapshot record %s names livesnap snapshot %s, which the "
                           "catalog has not as a visible snapshot" % (rec.get("uuid"), name))
    return out


def notes(domain, tree, vdi_ref):
    """The visible snapshots whose record the user destroyed (not problems)."""
    out = []
    marked, _ = records(domain)
    for name, disks in sorted(wanted(domain, tree, vdi_ref).items()):
        if marked.get(name):
            continue
        gone = destroyed_by_user(domain, disks)
        if gone is not None:
            out.append("snapshot %s: its VM snapshot record %s was destroyed in XAPI (xe "
                       "snapshot-destroy); livesnap keeps the snapshot and its VDIs and does "
                       "not make the record again" % (name, gone))
    return out


def _show(domain, disks):
    parts = []
    for userdevice, vdi in sorted(disks.items()):
        try:
            u = domain.platform.call("VDI.get_uuid", vdi)
        except Error:
            u = vdi
        parts.append("%s=%s" % (userdevice, u))
    return "{%s}" % ", ".join(parts) if parts else "none"
