"""The XAPI stand-in's VM snapshot calls (testxen/xapi.py mixes them in): ``VM.snapshot``,
``VBD.create``, ``VM.destroy``, with xapi's semantics as its source (xapi-project/xen-api,
ocaml/xapi) says; each method names the function it follows. Called with the stand-in's
lock held, arguments without the session."""
import datetime
import uuid

NULL_REF = "OpaqueRef:NULL"

# xapi_vbd.ml create: the VDI types a VBD may name
VBD_VDI_TYPES = ("system", "user", "ephemeral", "suspend", "crashdump", "metadata", "rrd",
                 "pvs_cache")


def _now():
    return datetime.datetime.utcnow().strftime("%Y%m%dT%H:%M:%SZ")


class VmCalls(object):
    """Mixed into ``testxen.xapi.Xapi`` (which provides ``objects``, ``_add``, ``_del``,
    ``_event``, ``_nargs`` and ``Failure``)."""

    VM_CALLS = {"VM.snapshot": "_vm_snapshot", "VBD.create": "_vbd_create",
                "VM.destroy": "_vm_destroy",
                "VM.add_to_blocked_operations": "_vm_block"}

    def _vm(self, ref):
        from testxen.xapi import Failure
        if ref not in self.objects["VM"]:
            raise Failure("HANDLE_INVALID", "VM", ref)
        return self.objects["VM"][ref]

    def _vm_snapshot(self, method, *args):
        """``VM.snapshot(vm, new_name, ignore_vdis)`` (xapi_vm_snapshot.ml ``snapshot`` ->
        xapi_vm_clone.ml ``clone Disk_op_snapshot``; ``ignore_vdis`` since xapi 21.4.0,
        defaulting to []): the VBDs whose VDI is in ``ignore_vdis`` are left out (the
        snapshot gets no VBD for them, as quicktest_vm_snapshot.ml checks); of the others an
        empty VBD stays empty, a CD keeps its VDI, a disk's VDI goes through ``VDI.snapshot``
        first (``safe_clone_disks``, before any record is made) -- which has no SM driver
        here and fails as a backend error, so nothing is created. The new VM
        (``copy_vm_record``): Halted, ``is_a_snapshot``, ``is_a_template``, ``snapshot_of``
        the VM, ``snapshot_time`` now, ``snapshot_info`` power state and crash-consistent,
        ``other_config`` the VM's, ``parent`` the VM's parent; then the VM's ``parent`` is the
        snapshot. Each copied VBD (``Xapi_vbd_helpers.copy``) keeps its fields; a disk's gets
        ``other_config`` ``owner`` (CA-58405). A snapshot or the control domain is refused as
        ``Xapi_vm_lifecycle`` refuses it (``check_snapshot``: VM_IS_SNAPSHOT)."""
        from testxen.xapi import Failure
        if len(args) not in (2, 3):
            raise Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 3, len(args))
        vm, new_name = args[0], args[1]
        ignore = list(args[2]) if len(args) == 3 else []
        rec = self._vm(vm)
        if rec.get("is_a_snapshot"):
            raise Failure("VM_IS_SNAPSHOT", vm, "snapshot")
        if rec.get("is_control_domain"):
            raise Failure("OPERATION_NOT_ALLOWED",
                          "This operation is not allowed on a control domain")
        copies = []
        for vbd in rec["VBDs"]:
            v = self.objects["VBD"][vbd]
            if v["VDI"] in ignore:
                continue
            if not v.get("empty") and v.get("type") != "CD":
                # Client.Async.VDI.snapshot: the SR's SM driver would snapshot the VDI
                self._vdi_snapshot("VDI.snapshot", v["VDI"], {})
            copies.append(v)
        fields = {k: (dict(val) if isinstance(val, dict) else val) for k, val in rec.items()
                  if k not in ("uuid", "VBDs", "snapshots", "children")}
        fields.update({
            "name_label": new_name, "power_state": "Halted", "is_a_snapshot": True,
            "is_a_template": True, "is_default_template": False, "snapshot_of": vm,
            "snapshot_time": _now(), "snapshots": [], "children": [], "VBDs": [],
            "snapshot_info": {"power-state-at-snapshot": rec.get("power_state", "Halted"),
                              "disk-snapshot-type": "crash_consistent"},
            "parent": rec.get("parent", NULL_REF), "resident_on": NULL_REF, "domid": "-1",
            "blocked_operations": {}, "current_operations": {}, "ha_always_run": False,
            "suspend_VDI": NULL_REF})
        snap = self._add("VM", fields)
        for v in copies:
            other_config = dict(v.get("other_config") or {})
            if v.get("type") == "Disk":
                other_config.setdefault("owner", "")
            self._new_vbd(snap, dict(v, other_config=other_config, currently_attached=False))
        rec.setdefault("snapshots", []).append(snap)
        parent = rec.get("parent", NULL_REF)       # children: the inverse of parent
        if parent in self.objects["VM"]:
            kids = self.objects["VM"][parent].setdefault("children", [])
            kids[:] = [k for k in kids if k != vm] + [snap]
        rec["parent"] = snap
        self.objects["VM"][snap]["children"] = [vm]
        self._event("VM", "mod", vm)
        return snap

    def _new_vbd(self, vm, fields):
        f = {k: fields.get(k) for k in ("VDI", "userdevice", "type", "mode", "device", "empty",
                                         "bootable", "unpluggable", "currently_attached",
                                         "qos_algorithm_type", "qos_algorithm_params")}
        f.update(VM=vm, other_config=dict(fields.get("other_config") or {}), uuid=str(
            uuid.uuid4()))
        ref = self._add("VBD", f)
        self.objects["VM"][vm]["VBDs"].append(ref)
        if f["VDI"] in self.objects["VDI"]:
            self.objects["VDI"][f["VDI"]]["VBDs"].append(ref)
        return ref

    def _vbd_create(self, method, *args):
        """``VBD.create(record)`` (xapi_vbd.ml ``create``; message_forwarding.ml: a DB
        call on the master, no check of the VM's kind, so a snapshot VM takes one): a
        non-empty VBD's VDI must be of a disk type (VDI_INCOMPATIBLE_TYPE), a CD read-only
        (VBD_CDS_MUST_BE_READONLY), only a CD empty (VBD_NOT_REMOVABLE_MEDIA), a read-write
        VBD not on a read-only VDI (VDI_READONLY); the ``userdevice`` a number (or
        ``autodetect``) no other VBD of the VM uses (INVALID_DEVICE, DEVICE_ALREADY_EXISTS).
        Unless the VM is suspended, ``device`` is "" and ``currently_attached`` false."""
        from testxen.xapi import Failure
        self._nargs(method, args, 1)
        r = args[0]
        for key in ("VM", "VDI", "userdevice", "bootable", "mode", "type", "empty",
                    "other_config", "qos_algorithm_type", "qos_algorithm_params"):
            if key not in r:
                raise Failure("FIELD_TYPE_ERROR", key)
        vm = self._vm(r["VM"])
        empty = bool(r["empty"])
        if not empty:
            vdi = self.objects["VDI"].get(r["VDI"])
            if vdi is None:
                raise Failure("HANDLE_INVALID", "VDI", r["VDI"])
            if vdi.get("type", "user") not in VBD_VDI_TYPES:
                raise Failure("VDI_INCOMPATIBLE_TYPE", r["VDI"], vdi.get("type"))
        if r["type"] == "CD" and r["mode"] != "RO":
            raise Failure("VBD_CDS_MUST_BE_READONLY")
        if r["type"] != "CD" and empty:
            raise Failure("VBD_NOT_REMOVABLE_MEDIA", "in constructor")
        if r["mode"] == "RW" and not empty and self.objects["VDI"][r["VDI"]].get("read_only"):
            raise Failure("VDI_READONLY", r["VDI"])
        userdevice = str(r["userdevice"])
        used = [self.objects["VBD"][b]["userdevice"] for b in vm["VBDs"]]
        if userdevice == "autodetect":
            userdevice = next(str(i) for i in range(256) if str(i) not in used)
        if not userdevice.isdigit():
            raise Failure("INVALID_DEVICE", userdevice)
        if userdevice in used:
            raise Failure("DEVICE_ALREADY_EXISTS", userdevice)
        suspended = vm.get("power_state") == "Suspended"
        return self._new_vbd(r["VM"], dict(
            r, userdevice=userdevice, unpluggable=r.get("unpluggable", True),
            device=r.get("device", "") if suspended else "",
            currently_attached=bool(r.get("currently_attached")) if suspended else False,
            VDI=NULL_REF if empty else r["VDI"]))

    def _vm_block(self, method, *args):
        """``VM.add_to_blocked_operations(vm, op, reason)`` (datamodel_vm.ml; xapi then refuses
        ``op`` with OPERATION_BLOCKED, Xapi_vm_lifecycle); a key present: MAP_DUPLICATE_KEY."""
        from testxen.xapi import Failure
        self._nargs(method, args, 3)
        blocked = self._vm(args[0]).setdefault("blocked_operations", {})
        if args[1] in blocked:
            raise Failure("MAP_DUPLICATE_KEY", "VM", "blocked_operations", args[0], args[1])
        blocked[args[1]] = args[2]
        self._event("VM", "mod", args[0])
        return ""

    def _vm_destroy(self, method, *args):
        """``VM.destroy(vm)`` (xapi_vm.ml ``destroy``, xapi_vm_helpers.ml ``destroy``): only
        a Halted or Suspended VM (Xapi_vm_lifecycle ``destroy``: VM_BAD_POWER_STATE), never
        a default template; the VM's children get its parent, its VBD records go, its VDIs
        stay (``xe snapshot-uninstall`` destroys those itself, ``xe snapshot-destroy``
        leaves them)."""
        from testxen.xapi import Failure
        self._nargs(method, args, 1)
        vm = args[0]
        rec = self._vm(vm)
        if rec.get("power_state") not in ("Halted", "Suspended"):
            raise Failure("VM_BAD_POWER_STATE", vm, "halted, suspended",
                          str(rec.get("power_state")).lower())
        if (rec.get("other_config") or {}).get("default_template") == "true":
            raise Failure("VM_CANNOT_DELETE_DEFAULT_TEMPLATE")
        parent = rec.get("parent", NULL_REF)
        for child in rec.get("children", []):
            if child in self.objects["VM"]:
                self.objects["VM"][child]["parent"] = parent
                if parent in self.objects["VM"]:
                    self.objects["VM"][parent].setdefault("children", []).append(child)
                self._event("VM", "mod", child)
        if parent in self.objects["VM"]:
            kids = self.objects["VM"][parent].setdefault("children", [])
            if vm in kids:
                kids.remove(vm)
        of = self.objects["VM"].get(rec.get("snapshot_of", NULL_REF))
        if of is not None and vm in of.get("snapshots", []):
            of["snapshots"].remove(vm)
        for vbd in list(rec["VBDs"]):
            vdi = self.objects["VDI"].get(self.objects["VBD"][vbd]["VDI"])
            if vdi is not None and vbd in vdi["VBDs"]:
                vdi["VBDs"].remove(vbd)
            self._del("VBD", vbd)
        self._del("VM", vm)
        return ""
