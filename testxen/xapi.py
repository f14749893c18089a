"""XAPI stand-in: an XML-RPC server on a UNIX socket (like xapi's ``/var/lib/xcp/xapi``) that
serves, from an in-memory model the tests fill, the calls livesnap's plugin and platform make,
with XAPI's reply format: ``{'Status': 'Success', 'Value': v}`` or ``{'Status': 'Failure',
'ErrorDescription': [code, ...]}`` (XEN-NOTES.md §3, §4.1).

Served: ``session.login_with_password``, ``session.logout``, ``session.get_this_host``,
``host.get_all``, ``host.call_plugin``; for ``VM|VBD|VDI|SR|host|PBD|pool|host_metrics|task|
message``: ``.get_record``, ``.get_by_uuid``, ``.get_all``, ``.get_all_records``,
``.get_all_records_where`` (the ``field "NAME" = "VALUE"`` form SM uses), ``.get_<field>``;
``VM.get_by_name_label``; ``SR.scan`` (``scan``: records follow the VHD images, as SM's scan);
``VDI.destroy`` (xapi's checks, then the SR's SM driver: ``vdi_destroyer``);
``set_<field>``/``add_to_<map>``/``remove_from_<map>`` for the fields in ``SETTABLE``
(VDI ``sm_config``, ``other_config``, ``managed``, ``read_only``, ``is_a_snapshot``,
``snapshot_of``...; SR ``sm_config``/``other_config``...); ``VDI.forget``/``db_forget``;
``SR.update``; ``VDI.db_introduce`` (SM's snapshot introducing its VDIs); ``VM.snapshot``,
``VBD.create``, ``VM.destroy`` (testxen/xapi_vms.py);
``task.create|cancel|destroy``; ``message.create|destroy``; ``Async.<call>``
(a finished task); ``event.from``. What SM's GC (cleanup.py) calls is served with xapi's
semantics (datamodel: a record's relations kept both ways, map keys unique, forget keeps
the storage); ``VDI.snapshot`` would need an SM driver behind it and fails as a backend
error. Records are created as xapi creates them for a plugged local SR (one attached PBD
on this host, the host enabled and live, a pool whose master is this host). Every call but
login needs a live session (``SESSION_INVALID`` otherwise). ``host.call_plugin`` runs a plugin
from ``plugins_dir`` the way xapi does (xapi_plugins.ml): the file named exactly ``plugin``,
one argv holding the XML-RPC methodCall, no shell; the reply read from its stdout; a non-zero
exit, a signal or unparsable stdout become ``XENAPI_PLUGIN_FAILURE``; SM's plugins of a pool
host (this one or another) are served by ``host_plugins`` (testxen/sm_hosts.py).

Use::

    x = Xapi(sr_mount_base=tmp)            # the model
    sr = x.add_sr("ext")
    vm = x.add_vm("vm1", power_state="Running")
    vdi = x.add_vdi(sr)                    # x.vdi_path(vdi) is where its VHD belongs
    x.add_vbd(vm, vdi, userdevice="0")
    x.serve("/tmp/xs-1234/xapi")           # a thread; x.stop() ends it
"""
import os
import signal
import socketserver
import subprocess
import threading
import uuid
import xmlrpc.client
from xmlrpc.server import SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from testxen.xapi_vms import VmCalls

NULL_REF = "OpaqueRef:NULL"
CLASSES = ("VM", "VBD", "VDI", "SR", "host", "PBD", "pool", "host_metrics", "task", "message")



def _vdi_of(parent):
    """The VDI uuid a parent locator names: ``<uuid>.vhd`` on a file SR; on LVHD the LV
    ``VHD-<uuid>``, named by its ``/dev/mapper`` name as libvhd resolves it
    (``VG_XenStorage--<sr>-VHD--<uuid>``, see livesnap/vhd/paths.py)."""
    if parent is None:
        return None
    from livesnap.vhd import paths
    lv = paths.lv_path(parent) if parent.startswith("/dev/mapper/") else None
    name = os.path.basename(lv or parent)
    return name.replace("VHD-", "", 1) if name.startswith("VHD-") else name.replace(".vhd", "")

class Failure(Exception):
    def __init__(self, *description):
        Exception.__init__(self, list(description))
        self.description = [str(d) for d in description]


def _ref():
    return "OpaqueRef:%s" % uuid.uuid4()


class Xapi(VmCalls):
    """The model: ``objects[cls][ref] = record`` (XAPI field names)."""

    def __init__(self, sr_mount_base="/run/sr-mount", plugins_dir=None, plugin_env=None,
                 password=None):
        self.sr_mount_base = sr_mount_base
        self.plugins_dir = plugins_dir
        self.plugin_env = plugin_env
        self.password = password
        self.objects = {c: {} for c in CLASSES}
        self.sessions = set()
        self.calls = []                    # (method, args without the session)
        # plugins of one host: {(host ref, name): f(session, fn, args) -> str} (a pool host,
        # this one or another, serving SM's own plugins: testxen/sm_hosts.py)
        self.host_plugins = {}
        # the host a session is on ({session ref: host ref}; any other: this one): a plugin
        # run with such a session runs "on" that host (session.get_this_host)
        self.session_hosts = {}
        self.scanner = None                # SR.scan's source of truth, see scan()
        self.vdi_destroyer = None          # VDI.destroy's SM driver, see _vdi_destroy()
        self.lock = threading.Lock()
        self.server = None
        self.thread = None
        self.events = []                   # (id, class, operation, ref) for event.from
        self.metrics = self._add("host_metrics", {"live": True})
        self.host = self._add("host", {"name_label": "host1", "hostname": "host1",
                                       "enabled": True, "metrics": self.metrics,
                                       "PBDs": []})
        self.pool = self._add("pool", {"name_label": "", "master": self.host})

    # -- the model -------------------------------------------------------------------------

    def _add(self, cls, fields):
        ref = _ref()
        rec = {"uuid": str(uuid.uuid4()), "other_config": {}}
        rec.update(fields)
        self.objects[cls][ref] = rec
        self._event(cls, "add", ref)
        return ref

    def _event(self, cls, operation, ref):
        """Record a change for ``event.from`` (xapi: one event per object changed, with a
        token that orders them)."""
        self.events.append((len(self.events) + 1, cls, operation, ref))

    def _del(self, cls, ref):
        del self.objects[cls][ref]
        self._event(cls, "del", ref)

    def record(self, cls, ref):
        return self.objects[cls][ref]

    def add_sr(self, type="ext", **fields):
        f = {"name_label": "SR " + type, "name_description": "", "type": type,
             "shared": False, "PBDs": [],
             "VDIs": [], "sm_config": {}, "content_type": "user",
             "physical_size": "0", "physical_utilisation": "0", "virtual_allocation": "0"}
        f.update(fields)
        sr = self._add("SR", f)
        # plugged on this host, as an SR SM works on is (cleanup.py checks the PBD)
        pbd = self._add("PBD", {"SR": sr, "host": self.host, "currently_attached": True,
                                "device_config": {}})
        self.record("SR", sr)["PBDs"].append(pbd)
        self.record("host", self.host)["PBDs"].append(pbd)
        return sr

    def sr_dir(self, sr):
        return os.path.join(self.sr_mount_base, self.record("SR", sr)["uuid"])

    def add_vm(self, name_label, power_state="Halted", **fields):
        f = {"name_label": name_label, "name_description": "", "power_state": power_state,
             "VBDs": [], "is_a_template": False, "is_a_snapshot": False, "snapshot_of": NULL_REF,
             "snapshots": [], "is_control_domain": False, "resident_on": NULL_REF,
             "domid": "-1"}
        f.update(fields)
        return self._add("VM", f)

    def add_vdi(self, sr, virtual_size=8 << 20, vdi_type="vhd", **fields):
        u = str(uuid.uuid4())
        f = {"uuid": u, "name_label": "disk", "SR": sr, "location": u, "VBDs": [],
             "virtual_size": str(virtual_size), "physical_utilisation": "0", "type": "user",
             "read_only": False, "sharable": False, "managed": True, "missing": False,
             "is_a_snapshot": False, "snapshot_of": NULL_REF, "snapshots": [],
             "snapshot_time": "19700101T00:00:00Z", "on_boot": "persist",
             "allow_caching": False, "storage_lock": False, "xenstore_data": {},
             "cbt_enabled": False,
             "name_description": "", "metadata_of_pool": NULL_REF,
             "sm_config": {"vdi_type": vdi_type} if vdi_type else {}}
        f.update(fields)
        ref = self._add("VDI", f)
        self.record("SR", sr)["VDIs"].append(ref)
        return ref

    def vdi_path(self, vdi):
        rec = self.record("VDI", vdi)
        sr = self.record("SR", rec["SR"])
        if sr["type"] in ("lvm", "lvmoiscsi", "lvmohba"):
            return "/dev/VG_XenStorage-%s/VHD-%s" % (sr["uuid"], rec["location"])
        return os.path.join(self.sr_dir(rec["SR"]), rec["location"] + ".vhd")

    def add_vbd(self, vm, vdi=NULL_REF, userdevice="0", type="Disk", mode="RW", device="",
                **fields):
        f = {"VM": vm, "VDI": vdi, "userdevice": userdevice, "type": type, "mode": mode,
             "device": device, "empty": vdi == NULL_REF, "bootable": userdevice == "0",
             "currently_attached": False}
        f.update(fields)
        ref = self._add("VBD", f)
        self.record("VM", vm)["VBDs"].append(ref)
        if vdi != NULL_REF:
            self.record("VDI", vdi)["VBDs"].append(ref)
        return ref

    def login(self):
        ref = _ref()
        self.sessions.add(ref)
        return ref

    # -- the API ---------------------------------------------------------------------------

    def call(self, method, params):
        with self.lock:
            self.calls.append((method, list(params[1:])))
        try:
            return {"Status": "Success", "Value": self._call(method, list(params))}
        except Failure as e:
            return {"Status": "Failure", "ErrorDescription": e.description}

    def _call(self, method, params):
        if method in ("session.login_with_password", "session.slave_local_login_with_password"):
            if len(params) < 2:
                raise Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, 2, len(params))
            if self.password is not None and params[1] != self.password:
                raise Failure("SESSION_AUTHENTICATION_FAILED", params[0],
                              "Authentication failure")
            return self.login()
        if not params or params[0] not in self.sessions:
            raise Failure("SESSION_INVALID", params[0] if params else "")
        session, args = params[0], params[1:]
        if method in ("session.logout", "session.local_logout"):
            self.sessions.discard(session)
            return ""
        if method == "session.get_this_host":
            return self.session_hosts.get(session, self.host)
        if method == "host.call_plugin":
            return self._call_plugin(session, *args)
        if method.startswith("Async."):
            return self._async(method[len("Async."):], session, args)
        if method == "event.from":
            return self._event_from(*args)
        if method == "VDI.destroy":
            return self._vdi_destroy(method, *args)
        special = self.SPECIAL.get(method) or self.VM_CALLS.get(method)
        if special is not None:
            with self.lock:
                return getattr(self, special)(method, *args)
        if method == "SR.scan":
            self._nargs(method, args, 1)
            if args[0] not in self.objects["SR"]:
                raise Failure("HANDLE_INVALID", "SR", args[0])
            with self.lock:
                self.scan(args[0])
            return ""
        cls, _, op = method.partition(".")
        if cls not in self.objects or not op:
            raise Failure("MESSAGE_METHOD_UNKNOWN", method)
        table = self.objects[cls]
        for prefix in ("set_", "add_to_", "remove_from_"):
            if op.startswith(prefix) and cls in self.SETTABLE:
                with self.lock:
                    return self._setter(method, cls, prefix, op[len(prefix):], args)
        if op == "get_all_records_where":
            self._nargs(method, args, 1)
            return {r: dict(rec) for r, rec in table.items() if _where(args[0], rec)}
        if op == "get_all":
            return list(table)
        if op == "get_all_records":
            return {r: dict(rec) for r, rec in table.items()}
        if op == "get_by_uuid":
            self._nargs(method, args, 1)
            for r, rec in table.items():
                if rec["uuid"] == args[0]:
                    return r
            raise Failure("UUID_INVALID", cls, args[0])
        if op == "get_by_name_label":
            self._nargs(method, args, 1)
            return [r for r, rec in table.items() if rec.get("name_label") == args[0]]
        if op == "get_record" or op.startswith("get_"):
            self._nargs(method, args, 1)
            if args[0] not in table:
                raise Failure("HANDLE_INVALID", cls, args[0])
            rec = table[args[0]]
            if op == "get_record":
                return dict(rec)
            field = op[len("get_"):]
            if field not in rec:
                raise Failure("MESSAGE_METHOD_UNKNOWN", method)
            return rec[field]
        raise Failure("MESSAGE_METHOD_UNKNOWN", method)

    # Fields a client may change, per class. VDI: the public setters plus the ones xapi
    # exposes to SM for its records (VDI.set_managed, set_read_only, set_is_a_snapshot,
    # set_snapshot_of, set_snapshot_time, set_virtual_size, set_physical_utilisation,
    # set_cbt_enabled: datamodel_vdi.ml, "internal" calls SM's VDI._db_update and LVHDSR make).
    SETTABLE = {
        "VDI": {"name_label", "name_description", "other_config", "sm_config", "managed",
                "read_only", "is_a_snapshot", "snapshot_of", "snapshot_time", "virtual_size",
                "physical_utilisation", "on_boot", "allow_caching", "missing", "cbt_enabled"},
        "SR": {"name_label", "name_description", "other_config", "sm_config",
               "physical_size", "physical_utilisation", "virtual_allocation"},
        "VM": {"name_label", "name_description", "other_config"},
        "task": {"other_config", "progress", "status"},
    }

    def _setter(self, method, cls, prefix, field, args):
        """``<cls>.set_<field>``, ``.add_to_<map>``, ``.remove_from_<map>`` (XAPI: adding a
        key that exists fails with MAP_DUPLICATE_KEY; removing a missing key is fine)."""
        table = self.objects[cls]
        if field not in self.SETTABLE[cls]:
            raise Failure("MESSAGE_METHOD_UNKNOWN", method)
        self._nargs(method, args, {"set_": 2, "add_to_": 3, "remove_from_": 2}[prefix])
        if args[0] not in table:
            raise Failure("HANDLE_INVALID", cls, args[0])
        rec = table[args[0]]
        if prefix == "set_":
            if field == "snapshot_of" and cls == "VDI":
                self._link_snapshot(args[0], rec.get("snapshot_of", NULL_REF), args[1])
            rec[field] = args[1]
        elif prefix == "add_to_":
            if args[1] in rec[field]:
                raise Failure("MAP_DUPLICATE_KEY", cls, field, args[0], args[1])
            rec[field][args[1]] = args[2]
        else:
            rec[field].pop(args[1], None)
        self._event(cls, "mod", args[0])
        return ""

    def _link_snapshot(self, ref, old, new):
        """``snapshot_of`` and the original's ``snapshots`` are one relation (xapi keeps the
        set side from the ref side)."""
        vdis = self.objects["VDI"]
        if old in vdis and ref in vdis[old]["snapshots"]:
            vdis[old]["snapshots"].remove(ref)
        if new in vdis and ref not in vdis[new]["snapshots"]:
            vdis[new]["snapshots"].append(ref)

    # -- calls with their own semantics ------------------------------------------------------

    SPECIAL = {
        "VDI.forget": "_vdi_forget", "VDI.db_forget": "_vdi_forget",
        "VDI.snapshot": "_vdi_snapshot", "VDI.clone": "_vdi_snapshot",
        "VDI.db_introduce": "_vdi_db_introduce",
        "SR.update": "_sr_update",
        "task.create": "_task_create", "task.cancel": "_task_cancel",
        "task.destroy": "_task_destroy",
        "message.create": "_message_create", "message.destroy": "_message_destroy",
    }

    def _vdi_db_introduce(self, method, *args):
        """``VDI.db_introduce`` (what SM's ``VDI._db_introduce`` calls for the VDIs its
        snapshot makes): a record with these fields, in xapi's argument order."""
        self._nargs(method, args, 19)
        names = ("uuid", "name_label", "name_description", "SR", "type", "sharable",
                 "read_only", "other_config", "location", "xenstore_data", "sm_config",
                 "managed", "virtual_size", "physical_utilisation", "metadata_of_pool",
                 "is_a_snapshot", "snapshot_time", "snapshot_of", "cbt_enabled")
        f = dict(zip(names, args))
        f["snapshot_time"] = str(f["snapshot_time"])
        f.update({"VBDs": [], "snapshots": [], "missing": False, "on_boot": "persist",
                  "allow_caching": False, "storage_lock": False})
        if f["SR"] not in self.objects["SR"]:
            raise Failure("HANDLE_INVALID", "SR", f["SR"])
        ref = self._add("VDI", f)
        self.record("SR", f["SR"])["VDIs"].append(ref)
        if f["snapshot_of"] in self.objects["VDI"]:
            self.record("VDI", f["snapshot_of"])["snapshots"].append(ref)
        return ref

    def _vdi_forget(self, method, *args):
        """``VDI.forget`` / ``VDI.db_forget``: the record goes, the storage stays (xapi:
        "Removes a VDI record from the database"); its VBDs go with it, and it leaves its
        original's ``snapshots``."""
        self._nargs(method, args, 1)
        ref = args[0]
        if ref not in self.objects["VDI"]:
            raise Failure("HANDLE_INVALID", "VDI", ref)
        rec = self.objects["VDI"][ref]
        self._link_snapshot(ref, rec.get("snapshot_of", NULL_REF), NULL_REF)
        for other in self.objects["VDI"].values():
            if ref in other.get("snapshots", ()):
                other["snapshots"].remove(ref)
        sr = self.objects["SR"].get(rec["SR"])
        if sr is not None and ref in sr["VDIs"]:
            sr["VDIs"].remove(ref)
        for vbd in list(rec["VBDs"]):
            vm = self.objects["VM"].get(self.objects["VBD"][vbd]["VM"])
            if vm is not None and vbd in vm["VBDs"]:
                vm["VBDs"].remove(vbd)
            self._del("VBD", vbd)
        self._del("VDI", ref)
        return ""

    def _vdi_destroy(self, method, *args):
        """``VDI.destroy`` (``xe vdi-destroy``, and per disk ``xe snapshot-uninstall`` /
        ``vm-uninstall``): xapi refuses a VDI a running VM has attached (``VDI_IN_USE``)
        and one SM does not manage (a base copy: ``VDI_NOT_MANAGED``), then has the SR's
        SM driver run ``vdi_delete`` (``vdi_destroyer(ref)``, e.g. SM's real driver,
        testxen/sm.py ``Sm.destroyer``; it forgets the record itself through
        ``VDI.db_forget``); a record SM left is then removed, with its VBDs. Runs outside
        the model's lock: SM calls back into this server."""
        self._nargs(method, args, 1)
        ref = args[0]
        with self.lock:
            rec = self.objects["VDI"].get(ref)
            if rec is None:
                raise Failure("HANDLE_INVALID", "VDI", ref)
            if any(self.objects["VBD"][v].get("currently_attached") for v in rec["VBDs"]):
                raise Failure("VDI_IN_USE", ref, "destroy")
            if not rec.get("managed", True):
                raise Failure("VDI_NOT_MANAGED", ref)
        if self.vdi_destroyer is None:
            raise Failure("SR_BACKEND_FAILURE_1200", "", "VDI.destroy has no SM driver in "
                          "the XAPI stand-in (vdi_destroyer unset)", "")
        self.vdi_destroyer(ref)
        with self.lock:
            if ref in self.objects["VDI"]:
                self._vdi_forget("VDI.db_forget", ref)
        return ""

    def _vdi_snapshot(self, method, *args):
        """On a host xapi hands ``VDI.snapshot``/``clone`` to the SR's SM driver
        (``vdi_snapshot``: pause, new VHDs, unpause). No SM driver runs behind this stand-in,
        so the call fails as xapi fails a backend error; SM's GC calls it only for a leaf
        too big to leaf-coalesce live (> 20 MiB allocated), which the tests avoid."""
        raise Failure("SR_BACKEND_FAILURE_82", "", "VDI.snapshot has no SM driver in the "
                      "XAPI stand-in (testxen/xapi.py)", "")

    def _sr_update(self, method, *args):
        """``SR.update``: xapi asks SM (``sr_update``) for the SR's sizes; here they are
        read from the SR's directory (file SR) as FileSR does (statvfs, du)."""
        self._nargs(method, args, 1)
        sr = args[0]
        if sr not in self.objects["SR"]:
            raise Failure("HANDLE_INVALID", "SR", sr)
        rec = self.objects["SR"][sr]
        d = self.sr_dir(sr)
        if rec["type"] not in ("lvm", "lvmoiscsi", "lvmohba") and os.path.isdir(d):
            st = os.statvfs(d)
            rec["physical_size"] = str(st.f_blocks * st.f_frsize)
            rec["physical_utilisation"] = str(sum(
                os.stat(os.path.join(d, n)).st_blocks * 512 for n in os.listdir(d)
                if os.path.isfile(os.path.join(d, n))))
        self._event("SR", "mod", sr)
        return ""

    def _task_create(self, method, *args):
        self._nargs(method, args, 2)
        return self._add("task", {"name_label": args[0], "name_description": args[1],
                                  "status": "pending", "progress": 0.0, "result": "",
                                  "error_info": [], "created": "", "finished": ""})

    def _task_cancel(self, method, *args):
        self._nargs(method, args, 1)
        t = self.objects["task"].get(args[0])
        if t is None:
            raise Failure("HANDLE_INVALID", "task", args[0])
        if t["status"] == "pending":
            t["status"] = "cancelled"
        return ""

    def _task_destroy(self, method, *args):
        self._nargs(method, args, 1)
        if args[0] not in self.objects["task"]:
            raise Failure("HANDLE_INVALID", "task", args[0])
        self._del("task", args[0])
        return ""

    def _message_create(self, method, *args):
        """``message.create(name, priority, class, obj_uuid, body)``: a message ref."""
        self._nargs(method, args, 5)
        return self._add("message", {"name": args[0], "priority": str(args[1]),
                                     "cls": args[2], "obj_uuid": args[3], "body": args[4]})

    def _message_destroy(self, method, *args):
        self._nargs(method, args, 1)
        if args[0] not in self.objects["message"]:
            raise Failure("HANDLE_INVALID", "message", args[0])
        self._del("message", args[0])
        return ""

    def _async(self, method, session, args):
        """``Async.<call>``: a task ref at once (xapi runs the call in the background); here
        the call has run when the task is returned, its outcome in the task's status,
        ``result`` and ``error_info``."""
        task = self._task_create("task.create", "Async." + method, "")
        try:
            value = self._call(method, [session] + list(args))
            result = xmlrpc.client.dumps((value,), allow_none=True) if value != "" else ""
            self.objects["task"][task].update(status="success", progress=1.0, result=result)
        except Failure as e:
            self.objects["task"][task].update(status="failure", progress=1.0,
                                              error_info=e.description)
        return task

    def _event_from(self, classes, token, timeout):
        """``event.from(classes, token, timeout)``: the changes after ``token`` to objects of
        ``classes`` (``*`` for all), each with its current snapshot, and the token to pass
        next; waits up to ``timeout`` seconds for one (xapi's semantics; no
        ``valid_ref_counts``)."""
        import time
        start = int(token) if token else 0
        deadline = time.monotonic() + float(timeout)
        wanted = {c.lower() for c in classes}
        while True:
            with self.lock:
                out = []
                for eid, cls, op, ref in self.events[start:]:
                    if "*" in wanted or cls.lower() in wanted:
                        ev = {"id": str(eid), "class": cls.lower(), "operation": op,
                              "ref": ref}
                        rec = self.objects[cls].get(ref)
                        if rec is not None:
                            ev["snapshot"] = dict(rec)
                        out.append(ev)
                new_token = str(len(self.events))
            if out or time.monotonic() >= deadline:
                return {"events": out, "valid_ref_counts": {}, "token": new_token}
            time.sleep(0.05)

    # -- SR.scan, as SM's FileSR / LVHDSR scan does it for VHD images ------------------------

    def sr_images(self, sr):
        """{vdi uuid: path} of the VHD images an SR holds, named as SM names them."""
        rec = self.record("SR", sr)
        if rec["type"] in ("lvm", "lvmoiscsi", "lvmohba"):
            # SM reads LVM's metadata, not /dev: inactive LVs count (read here through the
            # LVM stand-in's loop devices)
            from testxen import lvm as standin
            d, prefix, suffix = "/dev/VG_XenStorage-%s" % rec["uuid"], "VHD-", ""
            names = sorted(standin.Vg(os.environ["TESTXEN_LVM_ROOT"]).loops())
        else:
            d, prefix, suffix = self.sr_dir(sr), "", ".vhd"
            names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        out = {}
        for name in names:
            if name.startswith(prefix) and name.endswith(suffix):
                u = name[len(prefix):len(name) - len(suffix)]
                try:
                    if str(uuid.UUID(u)) == u:
                        out[u] = os.path.join(d, name)
                except ValueError:
                    pass                       # not a VDI's name: SM's scan skips it
        return out

    def scan(self, sr):
        """New images become VDI records (hidden ones unmanaged), every record's
        ``sm_config.vhd-parent`` and sizes follow its image, records of vanished images that
        no VBD uses are forgotten. With ``scanner`` set (``f(sr) -> {uuid: {parent, hidden,
        read_only, size, utilisation}}``, e.g. SM's own driver scan, testxen/sm.py) the
        images and what they say are SM's; else they are read here with livesnap's VHD
        engine."""
        found = self.scanner(sr) if self.scanner is not None else self._scan_images(sr)
        by_uuid = {rec["location"]: ref for ref, rec in self.objects["VDI"].items()
                   if rec["SR"] == sr}
        for u, info in found.items():
            facts = {"virtual_size": str(info["size"]),
                     "physical_utilisation": str(info["utilisation"]),
                     "managed": not info["hidden"]}
            if "read_only" in info:
                facts["read_only"] = info["read_only"]
            ref = by_uuid.get(u)
            if ref is None:
                ref = self.add_vdi(sr, info["size"], uuid=u, location=u, name_label="")
            rec = self.record("VDI", ref)
            rec.update(facts)
            rec["sm_config"].pop("vhd-parent", None)
            if info["parent"]:
                rec["sm_config"]["vhd-parent"] = info["parent"]
            self._event("VDI", "mod", ref)
        for u, ref in by_uuid.items():
            rec = self.record("VDI", ref)
            if u not in found and not rec["VBDs"]:
                self._del("VDI", ref)
                self.record("SR", sr)["VDIs"].remove(ref)

    def _scan_images(self, sr):
        """{uuid: facts} of the SR's images as vhd-util scan reads them."""
        from livesnap import vhd
        loops = {}
        if self.record("SR", sr)["type"] in ("lvm", "lvmoiscsi", "lvmohba"):
            from testxen import lvm as standin
            loops = standin.Vg(os.environ["TESTXEN_LVM_ROOT"]).loops()
        out = {}
        for u, path in self.sr_images(sr).items():
            # as vhd-util scan: footer and header, the end of data from the BAT unvalidated
            # (a running VDI's leaf changes under the reader while its tapdisk allocates)
            device = loops.get(os.path.basename(path), path)
            with vhd.open_header(device) as img:
                parent = img.parent_candidates()[0] if img.is_differencing else None
                out[u] = {"size": img.virtual_size,
                          "utilisation": vhd.data_end_unchecked(device),
                          "hidden": img.hidden, "parent": _vdi_of(parent)}
        return out

    @staticmethod
    def _nargs(method, args, n):
        if len(args) != n:
            raise Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, n, len(args))

    def _call_plugin(self, session, host, plugin, fn, args):
        if host not in self.objects["host"]:
            raise Failure("HANDLE_INVALID", "host", host)
        if (host, plugin) in self.host_plugins:
            try:
                return self.host_plugins[(host, plugin)](session, fn, args)
            except Failure:
                raise
            except Exception as e:
                raise Failure("XENAPI_PLUGIN_FAILURE", "non-zero exit", "", str(e)[-4000:])
        if not self.plugins_dir or plugin not in os.listdir(self.plugins_dir):
            raise Failure("XENAPI_MISSING_PLUGIN", plugin)
        argv = [os.path.join(self.plugins_dir, plugin),
                xmlrpc.client.dumps((session, args), methodname=fn)]
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           env=self.plugin_env, timeout=300)
        if p.returncode < 0:
            raise Failure("XENAPI_PLUGIN_FAILURE",
                          "signal: %s" % signal.Signals(-p.returncode).name, p.stdout, p.stderr)
        if p.returncode != 0:
            raise Failure("XENAPI_PLUGIN_FAILURE", "non-zero exit", p.stdout, p.stderr)
        try:
            (reply,), _ = xmlrpc.client.loads(p.stdout)
        except xmlrpc.client.Fault as e:
            raise Failure("XENAPI_PLUGIN_FAILURE", "fault", e.faultCode, e.faultString)
        except Exception:
            raise Failure("XENAPI_PLUGIN_FAILURE", "failed to parse plugin output", p.stdout,
                          p.stderr)
        if reply.get("Status") == "Success" and isinstance(reply.get("Value"), str):
            return reply["Value"]
        if reply.get("Status") == "Failure" and reply.get("ErrorDescription"):
            raise Failure(*reply["ErrorDescription"])
        raise Failure("XENAPI_PLUGIN_FAILURE", "failed to parse plugin output", p.stdout,
                      p.stderr)

    # -- the server ------------------------------------------------------------------------

    def serve(self, socket_path):
        """Listen on ``socket_path`` in a daemon thread."""
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self.server = _UnixXMLRPCServer(socket_path, self)
        self.thread = threading.Thread(target=self.server.serve_forever, name="xapi",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            try:
                os.unlink(self.server.server_address)
            except OSError:
                pass
            self.server = None


def _where(expr, rec):
    """xapi's ``get_all_records_where`` for the one form SM uses:
    ``field "NAME" = "VALUE"`` (values compared as xapi prints them)."""
    import re
    m = re.match(r'\s*field\s+"([^"]+)"\s*=\s*"([^"]*)"\s*$', expr)
    if not m:
        raise Failure("INVALID_VALUE", "expr", expr)
    v = rec.get(m.group(1))
    if isinstance(v, bool):
        v = "true" if v else "false"
    return v is not None and str(v) == m.group(2)


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/", "/RPC2")
    disable_nagle_algorithm = False        # a UNIX socket has no TCP_NODELAY

    def address_string(self):
        return "unix"

    def log_message(self, format, *args):
        pass


class _UnixXMLRPCServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer,
                        SimpleXMLRPCDispatcher):
    daemon_threads = True

    def __init__(self, path, model):
        self.logRequests = False
        self.model = model
        SimpleXMLRPCDispatcher.__init__(self, allow_none=True, encoding=None)
        socketserver.UnixStreamServer.__init__(self, path, _Handler)

    def _dispatch(self, method, params):
        return self.model.call(method, params)
