"""A Xen VM as XAPI knows it: VM -> VBDs -> VDIs -> SR -> image path (XEN-NOTES.md §4.1-4.2).

The platform is handed a XenAPI session (``XenAPI.xapi_local()`` in the plugin, any
``XenAPI.Session`` elsewhere); this module never imports XenAPI. A disk's image path follows
from the SR type and ``VDI.location`` (the VDI uuid on file and LVHD SRs):

* file SRs (ext, nfs, smb, file): ``<sr_mount_base>/<sr uuid>/<location>.vhd`` (``.raw``);
* LVHD SRs (lvm, lvmoiscsi, lvmohba): ``/dev/VG_XenStorage-<sr uuid>/VHD-<location>``
  (``LV-`` for raw).

Whether the VM's disks are live is what tapdisk says (``tap-ctl list``), as for
``XenXmlDomain``; ``VM.power_state`` only names the state and catches a VM that XAPI calls
running while no tapdisk serves its disks. Templates, snapshots and the control domain are
refused. XenAPI failures become ``DomainNotFound`` (unknown uuid or name) or ``XapiError``.

Python 3.6, stdlib only: it runs inside the XAPI plugin in dom0.
"""
import contextlib
import logging
import os
import re

from livesnap.errors import DatapathError, DomainNotFound, Error, StorageBusy, UsageError
from livesnap.platforms import sm_gc, sm_lock, xapi_catalog, xapi_pool, xapi_records
from livesnap.platforms.domain_xml import Disk
from livesnap.platforms.xen_domain import XenDomainBase
from livesnap.tools import lvm

log = logging.getLogger(__name__)

NULL_REF = "OpaqueRef:NULL"
DEFAULT_SR_MOUNT_BASE = "/run/sr-mount"
FILE_SR_TYPES = ("ext", "nfs", "smb", "file")
LVHD_SR_TYPES = ("lvm", "lvmoiscsi", "lvmohba")
# \Z, not $: "$" also matches before a trailing newline
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}\Z")
# what a VDI location / SR uuid may be before it becomes part of a path
SAFE_COMPONENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
POWER_STATES = {"Running": "running", "Halted": "shut off", "Paused": "paused",
                "Suspended": "suspended"}


class XapiError(Error):
    """A XenAPI call failed (its ErrorDescription in ``details``)."""
    fields = ("call", "details")
    msg = "XenAPI call {self.call} failed: {self.details}"


def is_uuid(text):
    return isinstance(text, str) and bool(UUID_RE.match(text))


def _failure_details(e):
    """The ErrorDescription of a ``XenAPI.Failure`` (duck-typed), or None."""
    details = getattr(e, "details", None)
    return [str(d) for d in details] if isinstance(details, (list, tuple)) else None


def image_uuid(path):
    """The VDI uuid an image path names (``<sr>/<uuid>.vhd``, ``VG/VHD-<uuid>``), or None."""
    base = os.path.basename(path)
    for prefix, suffix in (("", ".vhd"), ("", ".raw"), ("VHD-", ""), ("LV-", "")):
        if base.startswith(prefix) and base.endswith(suffix):
            cand = base[len(prefix):len(base) - len(suffix)]
            if is_uuid(cand):
                return cand.lower()
    return None


def _log_exists(path):
    """A CBT log exists: a file, or an LV in LVM's metadata, active or not."""
    if os.path.exists(path):
        return True
    vg_lv = lvm.split_path(path)
    return vg_lv is not None and lvm.lv_exists(*vg_lv)


def xapi_time(iso):
    """XAPI's datetime form (``20261204T23:21:20Z``) of an ISO 8601 UTC time, or None."""
    m = re.match(r"(\d{4})-(\d{2})-(\d{2})T(\d{2}:\d{2}:\d{2})", iso or "")
    return "%s%s%sT%sZ" % m.groups() if m else None


def userdevice_target(userdevice):
    """``xvd`` + letter(s) of a VBD slot: 0 -> xvda, 25 -> xvdz, 26 -> xvdaa."""
    n = int(userdevice)
    letters = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "xvd" + letters


def connect_local(socket_path=None, user="root", password="", originator="livesnap"):
    """A XenAPI session to this host's xapi (``XenAPI.xapi_local()``, or the UNIX socket
    ``socket_path``), logged in as dom0's root (the local socket trusts it); for the
    commands that run outside xapi's plugin (``livesnap xapi-follow``)."""
    import XenAPI
    if socket_path:
        # XenAPI's UDS transport turns every "_" of the host part into "/"
        session = XenAPI.Session("http://%s/" % socket_path.replace("/", "_"),
                                 transport=XenAPI.UDSTransport())
    else:
        session = XenAPI.xapi_local()
    session.xenapi.login_with_password(user, password, "", originator)
    return session


class XapiPlatform(object):
    def __init__(self, session, sr_mount_base=DEFAULT_SR_MOUNT_BASE,
                 sm_lock_dir=sm_lock.BASE_DIR, sm_lock_timeout=60.0,
                 sm_ipc_dir=sm_gc.IPC_BASE_DIR):
        self.session = session
        self.sr_mount_base = sr_mount_base
        self.sm_lock_dir = sm_lock_dir
        self.sm_lock_timeout = sm_lock_timeout
        self.sm_ipc_dir = sm_ipc_dir

    def call(self, name, *args):
        """``session.xenapi.<name>(*args)``; a XenAPI failure becomes ``XapiError``."""
        fn = self.session.xenapi
        for part in name.split("."):
            fn = getattr(fn, part)
        log.debug("XenAPI %s%r", name, args)
        try:
            return fn(*args)
        except Exception as e:
            details = _failure_details(e)
            if details is None:
                raise XapiError(name, "%s: %s" % (e.__class__.__name__, e))
            raise XapiError(name, details)

    def exists(self, cls, uuid):
        """XAPI has a ``cls`` record (``VM``, ``VDI``...) with this uuid."""
        try:
            self.call("%s.get_by_uuid" % cls, uuid)
            return True
        except XapiError as e:
            if e.details and e.details[0] == "UUID_INVALID":
                return False
            raise

    def this_host(self):
        """This host's ref (``session.get_this_host``), or None when the session cannot say."""
        handle = getattr(self.session, "_session", None) or getattr(self.session, "handle", None)
        if handle is None:
            return None
        return self.call("session.get_this_host", handle)

    def lookup(self, ident):
        """The VM with this uuid, or with this name_label (which must be unique)."""
        if not isinstance(ident, str) or not ident or len(ident) > 255:
            raise UsageError(reason="invalid VM identifier %r" % (ident,))
        if is_uuid(ident):
            try:
                ref = self.call("VM.get_by_uuid", ident.lower())
            except XapiError as e:
                if e.details and e.details[0] in ("UUID_INVALID", "HANDLE_INVALID"):
                    raise DomainNotFound(ident)
                raise
        else:
            refs = self.call("VM.get_by_name_label", ident)
            if not refs:
                raise DomainNotFound(ident)
            if len(refs) > 1:
                raise UsageError(reason="%d VMs are named %r: name the VM by its uuid"
                                        % (len(refs), ident))
            ref = refs[0]
        return XapiDomain(self, ref, self.call("VM.get_record", ref))


class XapiDomain(XenDomainBase):
    """One VM; its disks are read once, when it is looked up (they do not move while
    livesnap works: tapdisk's rename convention keeps every VDI's path).

    New images get new VDI uuids as names (``image_names``: ``<uuid>.vhd`` on a file SR,
    ``VHD-<uuid>`` on LVHD), the names SM's scan knows, laid out as SM lays out its own
    snapshots (``layout``: every visible VDI a leaf, every interior image a hidden base copy;
    livesnap.model.planner); after each operation ``sync_metadata`` has XAPI rescan the SRs
    and makes each snapshot's VDI a XAPI snapshot of the VM's VDI."""
    image_names = "uuid"
    layout = "sm"

    def __init__(self, platform, ref, record):
        self.platform = platform
        self.ref = ref
        self.record = record
        self.uuid = record["uuid"]
        self.name = record.get("name_label") or self.uuid
        if record.get("is_control_domain"):
            raise UsageError(reason="%s (%s) is the control domain; livesnap snapshots guest "
                                    "VMs only" % (self.name, self.uuid))
        if record.get("is_a_snapshot"):
            raise UsageError(reason="%s (%s) is a XAPI snapshot, not a VM; livesnap works on "
                                    "the VM itself" % (self.name, self.uuid))
        if record.get("is_a_template"):
            raise UsageError(reason="%s (%s) is a template, not a VM" % (self.name, self.uuid))
        self._srs = {}                  # target -> SR uuid
        self._vdis = {}                 # target -> VDI ref
        self._vbds = {}                 # target -> the VM's VBD record
        self._sr_types = {}             # target -> SR type
        self._disks = self._read_disks()

    # -- disks -------------------------------------------------------------------------------

    def _read_disks(self):
        out = []
        seen = set()
        for vbd_ref in self.record.get("VBDs", []):
            vbd = self.platform.call("VBD.get_record", vbd_ref)
            if vbd.get("type") != "Disk" or vbd.get("VDI", NULL_REF) == NULL_REF \
                    or vbd.get("empty"):
                continue
            target = self._target(vbd)
            if target in seen:
                raise UsageError(reason="VM %s has two disks at %s" % (self.name, target))
            seen.add(target)
            vdi = self.platform.call("VDI.get_record", vbd["VDI"])
            sr = self.platform.call("SR.get_record", vdi["SR"])
            path, fmt, source_type = self._image(sr, vdi)
            self._srs[target] = sr.get("uuid")
            self._vdis[target] = vbd["VDI"]
            self._vbds[target] = vbd
            self._sr_types[target] = sr.get("type")
            out.append(Disk(target, path, fmt, "disk", source_type, vbd.get("mode") == "RO"))
        return out

    def _target(self, vbd):
        """The disk's name for livesnap: from the VBD slot (``userdevice``), which stays the
        same whether the VM runs or not, else the guest device name."""
        userdevice = vbd.get("userdevice", "")
        if userdevice.isdigit() and int(userdevice) < 256:
            return userdevice_target(userdevice)
        device = vbd.get("device", "")
        if device and SAFE_COMPONENT_RE.match(device):
            return device
        raise UsageError(reason="VBD %s of VM %s has no usable slot (userdevice %r, device %r)"
                                % (vbd.get("uuid"), self.name, userdevice, device))

    def _image(self, sr, vdi):
        """(path, fmt, source_type) of a VDI; path None where livesnap cannot work."""
        vdi_type = (vdi.get("sm_config") or {}).get("vdi_type", "vhd")
        fmt = "vhd" if vdi_type == "vhd" else vdi_type
        sr_type = sr.get("type")
        if sr_type not in FILE_SR_TYPES + LVHD_SR_TYPES:
            return None, fmt, "file"
        sr_uuid, location = sr.get("uuid", ""), vdi.get("location", "")
        for what, value in (("SR uuid", sr_uuid), ("VDI location", location)):
            if not SAFE_COMPONENT_RE.match(value) or ".." in value:
                raise UsageError(reason="VDI %s: %s %r cannot name a file"
                                        % (vdi.get("uuid"), what, value))
        if sr_type in FILE_SR_TYPES:
            ext = ".vhd" if fmt == "vhd" else ".raw"
            return os.path.join(self.platform.sr_mount_base, sr_uuid, location + ext), fmt, "file"
        prefix = "VHD-" if fmt == "vhd" else "LV-"
        return "/dev/VG_XenStorage-%s/%s%s" % (sr_uuid, prefix, location), fmt, "block"

    def disks(self, inactive=False):
        return list(self._disks)

    def sr_uuids(self):
        """The SRs holding the VM's snapshottable disks, sorted."""
        return sorted({self._srs[d.target] for d in self._disks if self.snapshottable(d)})

    @contextlib.contextmanager
    def chain_lock(self):
        """SM's SR lock of every SR of the VM's disks (in uuid order), held by the VHD
        datapaths around each change of a chain, so that SM's GC never sees one half done."""
        with contextlib.ExitStack() as stack:
            for sr_uuid in self.sr_uuids():
                stack.enter_context(sm_lock.sr_lock(sr_uuid, base_dir=self.platform.sm_lock_dir,
                                                    timeout=self.platform.sm_lock_timeout))
            yield

    def merge_guard(self):
        """SM's garbage collector held off the VM's SRs (SM's ``gc_active`` lock and abort
        flag, platforms/sm_gc.py) while livesnap merges there: a GC kicked meanwhile exits,
        one running is asked to stop first."""
        return sm_gc.held_off_all(self.sr_uuids(), lock_dir=self.platform.sm_lock_dir,
                                  ipc_dir=self.platform.sm_ipc_dir,
                                  timeout=self.platform.sm_lock_timeout)

    def gc_hold(self, hold):
        """SM's GC held off the VM's SRs (``hold``) or let go, in XAPI's database so that
        it outlives a crash until recover (platforms/sm_gc_hold.py)."""
        from livesnap.platforms import sm_gc_hold
        sm_gc_hold.change(self.platform, self.sr_uuids(), self.uuid, hold,
                          lock_dir=self.platform.sm_lock_dir,
                          timeout=self.platform.sm_lock_timeout)

    # -- SM's pause protocol -------------------------------------------------------------------

    # sm_config keys SM sets while it works on a VDI (blktap2.py, cleanup.py, storage
    # migration): livesnap leaves such a VDI alone
    SM_BUSY = (("paused", "SM has its tapdisk paused (an SM snapshot or the GC's leaf-coalesce "
                          "is running)"),
               ("relinking", "SM's garbage collector is relinking its chain"),
               ("mirror", "it is being mirrored to another SR (storage migration)"))

    def refuse_wrong_host(self, disks):
        """Before an operation changes anything: this host is the one to act (LVHD: the
        pool master; file SRs: the host holding the catalog; xapi_pool.refuse_wrong_host)."""
        xapi_pool.refuse_wrong_host(self, disks, self.catalog_held)

    catalog_held = True             # this host holds the VM's catalog (set by catalog_here)
    catalog_keyed = False           # XAPI already records it here (or cannot be told)

    def catalog_here(self, path, have):
        self.catalog_keyed = xapi_catalog.check_here(self, path, have)  # its host, in XAPI
        self.catalog_held = have

    def catalog_kept(self):
        if not self.catalog_keyed:
            xapi_catalog.record_here(self)

    def served_elsewhere(self):
        """The VM runs on another host (its pauses are ``pool_pause``'s)."""
        return xapi_pool.elsewhere(self) is not None

    def pool_pause(self):
        return xapi_pool.PoolPause(self)

    def _host_uuid(self, ref):
        try:
            return self.platform.call("host.get_uuid", ref)
        except XapiError:
            return ref

    def refuse_busy(self, disks, op=None):
        """Before an operation ``op`` changes anything: refuse a disk whose VDI SM is working
        on. (A revert of a disk with CBT on is done as XAPI's ``VM.revert`` leaves it: the
        datapath drops the old leaf's log as SM's ``VDI.delete`` does, ``sync_metadata``
        turns the VDI's ``cbt_enabled`` off: docs/xen.md "Changed-block tracking".)"""
        for target in sorted(disks):
            ref = self._vdis.get(target)
            if ref is None:
                continue
            rec = self.platform.call("VDI.get_record", ref)
            sm_config = rec.get("sm_config") or {}
            for key, why in self.SM_BUSY:
                if key in sm_config and not (key == "paused" and self.PAUSED_BY in sm_config):
                    raise StorageBusy(self.name, target, rec.get("uuid"), why)

    def cbt_log_path(self, path):
        """Where SM keeps the CBT log of the VDI whose image is ``path``: ``<uuid>.cbtlog``
        in ``sr.path`` (VDI._get_cbt_logpath): the SR's directory on a file SR, the VG's
        ``/dev/VG_XenStorage-<sr>`` on LVHD (an LV). None for a path that names no VDI."""
        u = image_uuid(path)
        if u is None or not (path.endswith(".vhd") or
                             os.path.basename(path).startswith("VHD-")):
            return None
        return os.path.join(os.path.dirname(path), u + ".cbtlog")

    # livesnap's mark beside SM's "paused": a "paused" left by a livesnap command killed
    # inside a pause is livesnap's own (recover takes it over); any other is SM's
    PAUSED_BY = "livesnap-paused"

    @contextlib.contextmanager
    def pause_guard(self, disks):
        """Around livesnap's pause of these disks' tapdisks, what SM's ``tap_pause`` does
        (blktap2.py, drivers/tapdisk-pause): the VDI's lock held and ``sm_config`` ``paused``
        set, so SM and xapi see the VDI paused and SM waits for it; both undone afterwards.
        A VDI that SM has marked paused meanwhile is refused (``StorageBusy``)."""
        with contextlib.ExitStack() as stack:
            for target in sorted(disks):
                ref = self._vdis.get(target)
                if ref is None:
                    continue
                vdi_uuid = self.platform.call("VDI.get_uuid", ref)
                stack.enter_context(sm_lock.vdi_lock(vdi_uuid,
                                                     base_dir=self.platform.sm_lock_dir,
                                                     timeout=self.platform.sm_lock_timeout))
                sm_config = self.platform.call("VDI.get_sm_config", ref)
                if "paused" in sm_config and self.PAUSED_BY not in sm_config:
                    raise StorageBusy(self.name, target, vdi_uuid, self.SM_BUSY[0][1])
                if self.PAUSED_BY not in sm_config:
                    self.platform.call("VDI.add_to_sm_config", ref, self.PAUSED_BY, "true")
                stack.callback(self._unmark_paused, ref)
                if "paused" not in sm_config:
                    self.platform.call("VDI.add_to_sm_config", ref, "paused", "true")
            yield

    def _unmark_paused(self, ref):
        for key in ("paused", self.PAUSED_BY):
            try:
                self.platform.call("VDI.remove_from_sm_config", ref, key)
            except XapiError as e:
                log.warning("sm_config %s of VDI %s not removed: %s", key, ref, e)

    # -- XAPI's records -----------------------------------------------------------------------

    def sync_metadata(self, tree):
        """Tell XAPI about the chains livesnap changed, outside every pause: ``SR.scan`` of
        the VM's SRs (SM makes VDI records for new images, sets ``sm_config.vhd-parent``,
        marks hidden ones unmanaged, forgets images that are gone). Then each snapshot's
        VDI is what ``VDI.snapshot`` makes: ``is_a_snapshot``, ``snapshot_of`` the VM's VDI
        of that disk, ``snapshot_time``, labelled ``livesnap <name>: <vm> <disk>`` with
        ``other_config.livesnap_snapshot`` = the snapshot's name; a hidden image livesnap
        keeps is labelled ``base copy``, as SM labels its own. Around them, the VM snapshot
        record of each snapshot (livesnap.platforms.xapi_records): those of snapshots gone
        destroyed before the scan, the others made or mended after the marks. Returns the
        records' changes, ``[[change, name]]``."""
        try:
            changes = xapi_records.drop_stale(self, tree)
        except Error as e:
            log.warning("stale VM snapshot records of %s not destroyed: %s", self.name, e)
            changes = []
        for sr_uuid in self.sr_uuids():
            self.platform.call("SR.scan", self.platform.call("SR.get_by_uuid", sr_uuid))
        for n in sorted(tree.nodes.values(), key=lambda n: n.id):
            vdi_uuid = image_uuid(n.path)
            if n.state not in ("snapshot", "hidden") or vdi_uuid is None:
                continue
            ref = self._vdi_ref(vdi_uuid, n.path)
            if ref is None:
                continue
            rec = self.platform.call("VDI.get_record", ref)
            if n.snapshot is None:
                label = "base copy"
            else:
                label = "livesnap %s: %s %s" % (n.snapshot, self.name, n.disk)
            if rec.get("name_label") != label:
                self.platform.call("VDI.set_name_label", ref, label)
            if (rec.get("other_config") or {}).get("livesnap_snapshot") != n.snapshot:
                self.platform.call("VDI.remove_from_other_config", ref, "livesnap_snapshot")
                if n.snapshot is not None:
                    self.platform.call("VDI.add_to_other_config", ref, "livesnap_snapshot",
                                       n.snapshot)
            of = self._vdis.get(n.disk)          # the disk's own VDI (its VBD's)
            if n.state == "snapshot" and n.snapshot in tree.snapshots and of is not None:
                self._mark_snapshot(ref, rec, of, tree.snapshots[n.snapshot].created)
            cbt = self.cbt_log_path(n.path)
            if cbt is not None and _log_exists(cbt) and not rec.get("cbt_enabled"):
                # SM's _snapshot: the snapshot VDI of a tracked disk is introduced with CBT on
                # (on a host SM's own scan sets it too: a refusal is not worth failing for)
                try:
                    self.platform.call("VDI.set_cbt_enabled", ref, True)
                except XapiError as e:
                    log.warning("cbt_enabled of VDI %s not set: %s", vdi_uuid, e)
        self._sync_leaf_cbt(tree)
        return changes + xapi_records.sync(self, tree, self._node_vdi)

    def _sync_leaf_cbt(self, tree):
        """A disk's VDI whose CBT log is gone (a revert dropped it, as SM's ``VDI.delete``
        of the old VDI does in XAPI's ``VM.revert``, whose new VDI SM's clone introduces
        without one) has CBT off in XAPI's record, as SM's ``VDI._db_update`` writes it
        (``set_cbt_enabled(self._get_blocktracking_status())``: the log's existence)."""
        for disk, nid in sorted(tree.active.items()):
            ref = self._vdis.get(disk)
            cbt = self.cbt_log_path(tree.nodes[nid].path)
            if ref is None or cbt is None or _log_exists(cbt):
                continue
            if self.platform.call("VDI.get_record", ref).get("cbt_enabled"):
                try:
                    self.platform.call("VDI.set_cbt_enabled", ref, False)
                except XapiError as e:
                    log.warning("cbt_enabled of VDI %s not cleared: %s", ref, e)

    def _node_vdi(self, node):
        """The VDI ref of a node's image, or None."""
        u = image_uuid(node.path)
        return None if u is None else self._vdi_ref(u, node.path)

    def snapshot_records(self):
        """{snapshot name: uuid of its VM snapshot record} (``snapshot_list``)."""
        return xapi_records.uuids(self)

    def record_problems(self, tree):
        """What XAPI's records say that the images do not (SM's metadata drifts: a
        ``vhd-parent`` naming a gone base copy, a wrong ``snapshot_of``), and what breaks SM's
        model: for each image of the tree, its VDI record exists, its ``sm_config``
        ``vhd-parent`` is the image's VHD parent, a hidden image's record is unmanaged, a
        snapshot's VDI is a snapshot of the disk's VDI; and in SM's layout no visible image
        has children. Open leaves are read only for their header (never rewritten by
        tapdisk)."""
        from livesnap import vhd
        problems = []
        by_uuid = {}
        for n in tree.nodes.values():
            u = image_uuid(n.path)
            if u is not None:
                by_uuid[u] = n
        leaves = {}
        for disk, nid in tree.active.items():
            leaves[disk] = image_uuid(tree.nodes[nid].path)
        for u, n in sorted(by_uuid.items()):
            try:
                ref = self.platform.call("VDI.get_by_uuid", u)
            except XapiError:
                problems.append("image %s has no VDI record in XAPI (an SR scan makes one)"
                                % n.path)
                continue
            rec = self.platform.call("VDI.get_record", ref)
            try:
                parent = vhd.parent_of(n.path)
            except vhd.VhdError:
                continue                                # image_problems names it
            want = image_uuid(parent) if parent else None
            have = (rec.get("sm_config") or {}).get("vhd-parent")
            if have != want:
                problems.append("VDI %s (%s): XAPI's sm_config vhd-parent is %s, its VHD "
                                "parent is %s" % (u, n.path, have or "none", want or "none"))
            if n.state == "hidden" and rec.get("managed", True):
                problems.append("VDI %s (%s) is a hidden image but XAPI lists it as a managed "
                                "VDI" % (u, n.path))
            if n.state == "snapshot" and self._vdis.get(n.disk):
                if not rec.get("is_a_snapshot") or \
                        rec.get("snapshot_of") != self._vdis[n.disk]:
                    problems.append("VDI %s (%s), snapshot %s of disk %s, is not recorded as "
                                    "a snapshot of the disk's VDI %s (is_a_snapshot %s)"
                                    % (u, n.path, n.snapshot, n.disk, leaves[n.disk],
                                       rec.get("is_a_snapshot")))
            if self.layout == "sm" and n.state in ("snapshot", "active") and \
                    tree.children(n.id):
                problems.append("image %s (%s) is visible and has children: SM's GC would "
                                "leaf-coalesce into it (a layout from before SM's; deleting "
                                "the snapshot merges it)" % (n.path, n.snapshot or n.disk))
        return problems + xapi_records.problems(self, tree, self._node_vdi)

    def record_notes(self, tree):
        """Snapshots whose VM snapshot record the user destroyed (check's notes)."""
        return xapi_records.notes(self, tree, self._node_vdi)

    def vdi_exists(self, vdi_uuid):
        """XAPI has a VDI record with this uuid (SM's ``vdi_delete`` forgets it)."""
        return self.platform.exists("VDI", vdi_uuid)

    def _vdi_ref(self, vdi_uuid, path):
        try:
            return self.platform.call("VDI.get_by_uuid", vdi_uuid)
        except XapiError:
            log.warning("XAPI has no VDI %s for %s after a scan", vdi_uuid, path)
            return None

    def _mark_snapshot(self, ref, rec, of, created):
        """The VDI a snapshot of VDI ``of``, as ``VDI.snapshot`` leaves it (the setters xapi
        gives SM for its records)."""
        if not rec.get("is_a_snapshot"):
            self.platform.call("VDI.set_is_a_snapshot", ref, True)
        if rec.get("snapshot_of") != of:
            self.platform.call("VDI.set_snapshot_of", ref, of)
        stamp = xapi_time(created)
        if stamp and rec.get("snapshot_time") != stamp:
            self.platform.call("VDI.set_snapshot_time", ref, stamp)

    # -- state -------------------------------------------------------------------------------

    def power_state(self):
        return self.platform.call("VM.get_power_state", self.ref)

    def is_running(self):
        """A tapdisk serves the VM's disks. XAPI saying Running/Paused while none does is an
        error: working on those images offline could lose the guest's writes. A VM running
        on another host runs as XAPI says (its tapdisks are there: xapi_pool)."""
        if self.tapdisks() or xapi_pool.elsewhere(self) is not None:
            return True
        state = self.power_state()
        if state in ("Running", "Paused") and any(self.snapshottable(d) for d in self._disks):
            raise DatapathError(reason="XAPI says VM %s is %s but no tapdisk serves its disks "
                                       "(%s); refusing to touch them"
                                % (self.name, state, ", ".join(
                                    d.path for d in self._disks if self.snapshottable(d))))
        return False

    def how_to_stop(self, state):
        """What to run before a revert, for the state XAPI reports."""
        if state == "suspended":
            return ("revert needs VM %s halted: it is suspended, and its saved memory expects "
                    "its disks as they are now; resume it and shut it down (xe vm-resume "
                    "uuid=%s; xe vm-shutdown uuid=%s), or drop the saved memory (xe "
                    "vm-shutdown force=true uuid=%s), then revert again"
                    % (self.name, self.uuid, self.uuid, self.uuid))
        return ("revert needs VM %s halted: xe vm-shutdown uuid=%s (or xe vm-shutdown "
                "force=true uuid=%s), then revert again" % (self.name, self.uuid, self.uuid))

    def state_name(self):
        state = self.power_state()
        return POWER_STATES.get(state, str(state).lower())
