"""XAPI stand-in: an XML-RPC server on a UNIX socket (like xapi's ``/var/lib/xcp/xapi``) that
serves, from an in-memory model the tests fill, the calls livesnap's plugin and platform make,
with XAPI's reply format: ``{'Status': 'Success', 'Value': v}`` or ``{'Status': 'Failure',
'ErrorDescription': [code, ...]}`` (XEN-NOTES.md §3, §4.1).

Served: ``session.login_with_password``, ``session.logout``, ``session.get_this_host``,
``host.get_all``, ``host.call_plugin``; ``VM|VBD|VDI|SR .get_record``, ``.get_by_uuid``,
``.get_all``, ``.get_all_records``, ``.get_<field>``; ``VM.get_by_name_label``; ``SR.scan``
(``scan``: records follow the VHD images, as SM's scan); ``VDI.set_name_label|name_description``,
``VDI.add_to_other_config``, ``VDI.remove_from_other_config``. Every call but
login needs a live session (``SESSION_INVALID`` otherwise). ``host.call_plugin`` runs a plugin
from ``plugins_dir`` the way xapi does (xapi_plugins.ml): the file named exactly ``plugin``,
one argv holding the XML-RPC methodCall, no shell; the reply read from its stdout; a non-zero
exit, a signal or unparsable stdout become ``XENAPI_PLUGIN_FAILURE``.

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

NULL_REF = "OpaqueRef:NULL"
CLASSES = ("VM", "VBD", "VDI", "SR", "host")


class Failure(Exception):
    def __init__(self, *description):
        Exception.__init__(self, list(description))
        self.description = [str(d) for d in description]


def _ref():
    return "OpaqueRef:%s" % uuid.uuid4()


class Xapi(object):
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
        self.lock = threading.Lock()
        self.server = None
        self.thread = None
        self.host = self._add("host", {"name_label": "host1", "hostname": "host1"})

    # -- the model -------------------------------------------------------------------------

    def _add(self, cls, fields):
        ref = _ref()
        rec = {"uuid": str(uuid.uuid4()), "other_config": {}}
        rec.update(fields)
        self.objects[cls][ref] = rec
        return ref

    def record(self, cls, ref):
        return self.objects[cls][ref]

    def add_sr(self, type="ext", **fields):
        f = {"name_label": "SR " + type, "type": type, "shared": False, "PBDs": [],
             "VDIs": [], "sm_config": {}, "content_type": "user"}
        f.update(fields)
        return self._add("SR", f)

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
            return self.host
        if method == "host.call_plugin":
            return self._call_plugin(session, *args)
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
            if op.startswith(prefix) and cls == "VDI":
                return self._setter(method, table, prefix, op[len(prefix):], args)
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

    SETTABLE = {"name_label", "name_description", "other_config"}

    def _setter(self, method, table, prefix, field, args):
        """``VDI.set_<field>``, ``.add_to_<map>``, ``.remove_from_<map>`` (XAPI: adding a
        key that exists fails with MAP_DUPLICATE_KEY; removing a missing key is fine)."""
        if field not in self.SETTABLE:
            raise Failure("MESSAGE_METHOD_UNKNOWN", method)
        self._nargs(method, args, {"set_": 2, "add_to_": 3, "remove_from_": 2}[prefix])
        if args[0] not in table:
            raise Failure("HANDLE_INVALID", "VDI", args[0])
        rec = table[args[0]]
        if prefix == "set_":
            rec[field] = args[1]
        elif prefix == "add_to_":
            if args[1] in rec[field]:
                raise Failure("MAP_DUPLICATE_KEY", "VDI", field, args[0], args[1])
            rec[field][args[1]] = args[2]
        else:
            rec[field].pop(args[1], None)
        return ""

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
        no VBD uses are forgotten."""
        from livesnap import vhd
        images = self.sr_images(sr)
        by_uuid = {rec["location"]: ref for ref, rec in self.objects["VDI"].items()
                   if rec["SR"] == sr}
        loops = {}
        if self.record("SR", sr)["type"] in ("lvm", "lvmoiscsi", "lvmohba"):
            from testxen import lvm as standin
            loops = standin.Vg(os.environ["TESTXEN_LVM_ROOT"]).loops()
        for u, path in images.items():
            # as vhd-util scan: footer and header, the end of data from the BAT unvalidated
            # (a running VDI's leaf changes under the reader while its tapdisk allocates)
            device = loops.get(os.path.basename(path), path)
            with vhd.open_header(device) as img:
                parent = img.parent_candidates()[0] if img.is_differencing else None
                facts = {"virtual_size": str(img.virtual_size),
                         "physical_utilisation": str(vhd.data_end_unchecked(device)),
                         "managed": not img.hidden}
            ref = by_uuid.get(u)
            if ref is None:
                ref = self.add_vdi(sr, img.virtual_size, uuid=u, location=u, name_label="")
            rec = self.record("VDI", ref)
            rec.update(facts)
            rec["sm_config"].pop("vhd-parent", None)
            if parent is not None:
                rec["sm_config"]["vhd-parent"] = os.path.basename(parent).replace(
                    "VHD-", "").replace(".vhd", "")
        for u, ref in by_uuid.items():
            rec = self.record("VDI", ref)
            if u not in images and not rec["VBDs"]:
                del self.objects["VDI"][ref]
                self.record("SR", sr)["VDIs"].remove(ref)

    @staticmethod
    def _nargs(method, args, n):
        if len(args) != n:
            raise Failure("MESSAGE_PARAMETER_COUNT_MISMATCH", method, n, len(args))

    def _call_plugin(self, session, host, plugin, fn, args):
        if host not in self.objects["host"]:
            raise Failure("HANDLE_INVALID", "host", host)
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
