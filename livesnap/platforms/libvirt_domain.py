"""The one module that talks to libvirt: connections and domains.

Every ``libvirt.libvirtError`` is translated here into livesnap's errors (``from e``), and a
no-op error handler keeps libvirt from printing to stderr.
"""
import logging
import os
import threading
import time

from livesnap.errors import DatapathError, DomainNotFound, UsageError
from livesnap.jobtypes import JOB_TYPES
from livesnap.platforms import domain_xml

log = logging.getLogger(__name__)

_handler_registered = False
_event_loop = None
_event_loop_pid = None
# how often a block job's state is read when no events arrive (a forked process)
POLL_WITHOUT_EVENTS = 0.02


def _libvirt():
    import libvirt  # imported only where libvirt is used
    global _handler_registered
    if not _handler_registered:
        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        _handler_registered = True
    return libvirt


def _start_event_loop():
    """libvirt delivers domain events (block jobs) only to a registered event loop, which
    must exist before the connection is opened. (Not in a process forked from one that
    ran it: see ``events_delivered``.)"""
    global _event_loop, _event_loop_pid
    if _event_loop is not None:
        return
    _event_loop_pid = os.getpid()
    libvirt = _libvirt()
    libvirt.virEventRegisterDefaultImpl()

    def loop():
        while True:
            libvirt.virEventRunDefaultImpl()

    _event_loop = threading.Thread(target=loop, name="libvirt-events", daemon=True)
    _event_loop.start()


def events_delivered():
    """Whether this process gets libvirt's events. A process forked from one whose event
    loop ran does not: the loop's thread is not in it, and libvirt's loop (a GLib main
    context, held by that thread) cannot be run by another."""
    return _event_loop_pid is None or _event_loop_pid == os.getpid()


def open_connection(uri=None):
    libvirt = _libvirt()
    _start_event_loop()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise DatapathError(reason="cannot connect to libvirt at %s: %s"
                            % (uri or "the default URI", e.get_error_message()))


class LibvirtPlatform(object):
    """Domains of one libvirt connection (opened when first needed)."""

    def __init__(self, uri=None):
        self.uri = uri
        self._conn = None

    def connection(self):
        if self._conn is None:
            self._conn = open_connection(self.uri)
        return self._conn

    def lookup(self, ident):
        """A libvirt domain; one whose disks are VHD images (a Xen domain, e.g. from
        ``xen:///system``) is handed to the Xen datapaths."""
        dom = Domain.lookup(self.connection(), ident)
        from livesnap.platforms import xen_domain
        if xen_domain.is_xen_domain(dom.disks(inactive=True)):
            return xen_domain.XenLibvirtDomain(dom)
        return dom


class Domain(object):
    """A libvirt domain as livesnap sees it."""

    kind = "libvirt"

    def __init__(self, conn, dom):
        self.conn = conn
        self.dom = dom
        self.name = dom.name()
        self.uuid = dom.UUIDString()

    @classmethod
    def lookup(cls, conn, ident):
        """By name, UUID or numeric id, as virsh does."""
        libvirt = _libvirt()
        lookups = [conn.lookupByName, conn.lookupByUUIDString]
        if ident.isdigit():
            lookups.append(lambda i: conn.lookupByID(int(i)))
        for fn in lookups:
            try:
                return cls(conn, fn(ident))
            except libvirt.libvirtError:
                continue
        raise DomainNotFound(ident)

    def snapshottable(self, disk):
        return domain_xml.snapshottable(disk)

    def unsupported_disks(self):
        """[(target, reason)] of the disks livesnap cannot snapshot (domain_xml.unsupported)."""
        return domain_xml.unsupported(domain_xml.parse(self.xml()))

    def is_running(self):
        libvirt = _libvirt()
        try:
            return bool(self.dom.isActive())
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot read state of %s: %s"
                                % (self.name, e.get_error_message()))

    def state_name(self):
        return "running" if self.is_running() else "shut off"

    def xml(self, inactive=False):
        libvirt = _libvirt()
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        try:
            return self.dom.XMLDesc(flags)
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot read XML of %s: %s"
                                % (self.name, e.get_error_message()))

    def disks(self, inactive=False):
        return domain_xml.disks(domain_xml.parse(self.xml(inactive=inactive)))

    def other_domains_xml(self):
        """[(name, [xml, ...])] of every other domain on the connection, running or not,
        persistent or transient: a running persistent one's live and next-boot XML (their
        disks may differ). A domain gone meanwhile is left out."""
        libvirt = _libvirt()
        try:
            doms = self.conn.listAllDomains(0)
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot list the domains of the connection: %s"
                                % e.get_error_message())
        out = []
        for d in doms:
            try:
                if d.UUIDString() == self.uuid:
                    continue
                xmls = [d.XMLDesc(0)]
                if d.isActive() and d.isPersistent():
                    xmls.append(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                out.append((d.name(), xmls))
            except libvirt.libvirtError:
                continue
        return out

    def set_disk_sources(self, sources):
        """Rewrite the persistent definition so the disks in ``sources`` ({target: (path, fmt)})
        use those images; one defineXML, so all disks change at once."""
        libvirt = _libvirt()
        root = domain_xml.set_disk_sources(
            domain_xml.parse_for_edit(self.xml(inactive=True)), sources)
        try:
            self.conn.defineXML(domain_xml.to_string(root))
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot redefine %s: %s" % (self.name,
                                                                   e.get_error_message()))

    # -- running domains: disk-only snapshots and block jobs ----------------------------------

    def live_chain(self, target):
        """[path, ...] of a running disk's backing chain, active image first."""
        return [p for p, _ in domain_xml.backing_chain(domain_xml.parse(self.xml()), target)]

    def snapshot_disks(self, items, other_targets=()):
        """One atomic disk-only snapshot of the running domain onto pre-created overlays:
        ``items`` is [(target, overlay path, fmt)], every other disk is left out.
        Returns the time the call took, in ms (the guest's IO waits at most that long)."""
        libvirt = _libvirt()
        disks = "".join("<disk name='%s' snapshot='external' type='%s'><driver type='%s'/>"
                        "<source %s='%s'/></disk>"
                        % ((_x(t), domain_xml.source_kind(p)[0], _x(f))
                           + (domain_xml.source_kind(p)[1], _x(p))) for t, p, f in items)
        disks += "".join("<disk name='%s' snapshot='no'/>" % _x(t) for t in other_targets)
        xml = ("<domainsnapshot><name>livesnap-%d</name><disks>%s</disks></domainsnapshot>"
               % (int(time.time() * 1000), disks))
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT)
        t0 = time.monotonic()
        try:
            self.dom.snapshotCreateXML(xml, flags)
        except libvirt.libvirtError as e:
            raise DatapathError(reason="disk-only snapshot of %s failed: %s"
                                % (self.name, e.get_error_message()))
        return (time.monotonic() - t0) * 1000.0

    def has_guest_agent(self):
        """The domain has a QEMU guest agent channel (what fsFreeze talks to)."""
        root = domain_xml.parse(self.xml())
        for ch in root.findall("./devices/channel"):
            t = ch.find("target")
            if t is not None and t.get("name") == "org.qemu.guest_agent.0":
                return True
        return False

    def fs_freeze(self):
        libvirt = _libvirt()
        try:
            return self.dom.fsFreeze()
        except libvirt.libvirtError as e:
            raise UsageError(reason="cannot quiesce %s: %s" % (self.name, e.get_error_message()))

    def fs_thaw(self):
        libvirt = _libvirt()
        try:
            return self.dom.fsThaw()
        except libvirt.libvirtError as e:
            log.error("thawing %s failed: %s", self.name, e.get_error_message())
            raise DatapathError(reason="thawing %s failed: %s" % (self.name,
                                                                  e.get_error_message()))

    def job_info(self, target):
        libvirt = _libvirt()
        try:
            return self.dom.blockJobInfo(target, 0) or {}
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot read block job of %s/%s: %s"
                                % (self.name, target, e.get_error_message()))

    def mirror(self, target):
        """(job, destination) of the disk's <mirror> in the live XML (a copy's or an active
        commit's target image), or (None, None)."""
        root = domain_xml.parse(self.xml())
        for d in root.findall("./devices/disk"):
            t = d.find("target")
            if t is not None and t.get("dev") == target:
                m = d.find("mirror")
                if m is None:
                    return None, None
                source = m.find("source")
                dest = m.get("file") or (source is not None and (
                    source.get("file") or source.get("dev") or source.get("name"))) or None
                return m.get("job"), dest
        return None, None

    def block_jobs(self):
        """[(target, job type name, destination or None)] of every block job running on
        any disk of the domain (none when it is shut off)."""
        if not self.is_running():
            return []
        libvirt = _libvirt()
        out = []
        for d in domain_xml.disks(domain_xml.parse(self.xml())):
            try:
                info = self.dom.blockJobInfo(d.target, 0) or {}
            except libvirt.libvirtError:
                continue              # e.g. an empty CD-ROM drive: no job can run there
            if info:
                _, dest = self.mirror(d.target)
                out.append((d.target, JOB_TYPES.get(info.get("type"), "block"), dest))
        return out

    def backup_running(self):
        """Whether a backup job (virsh backup-begin) runs on the domain."""
        if not self.is_running():
            return False
        libvirt = _libvirt()
        try:
            self.dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return False              # VIR_ERR_NO_DOMAIN_BACKUP
        except AttributeError:
            return False              # libvirt before 6.0: no backups
        return True

    def versions(self):
        """(libvirt's version, the hypervisor's version), each as libvirt numbers them
        (major * 1000000 + minor * 1000 + release)."""
        libvirt = _libvirt()
        try:
            return self.conn.getLibVersion(), self.conn.getVersion()
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot read the versions of libvirt and QEMU: %s"
                                % e.get_error_message())

    def checkpoints(self):
        """Names of the domain's libvirt checkpoints (virsh checkpoint-create)."""
        libvirt = _libvirt()
        try:
            return sorted(c.getName() for c in self.dom.listAllCheckpoints(0))
        except AttributeError:
            return []                 # libvirt before 5.6: no checkpoints
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot list the checkpoints of %s: %s"
                                % (self.name, e.get_error_message()))

    def mirror_ready(self, target):
        """The domain XML shows the job's mirror ready (VDSM and Nova demand this as well as
        cur == end before a pivot: RH bugs 1376580, 1442266)."""
        root = domain_xml.parse(self.xml())
        for d in root.findall("./devices/disk"):
            t = d.find("target")
            if t is not None and t.get("dev") == target:
                m = d.find("mirror")
                return m is not None and m.get("ready") == "yes"
        return False

    def block_commit(self, target, top, base, active):
        libvirt = _libvirt()
        flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE if active else 0
        try:
            self.dom.blockCommit(target, base, top, 0, flags)
        except libvirt.libvirtError as e:
            raise DatapathError(reason="block commit of %s into %s (%s/%s) failed to start: %s"
                                % (top, base, self.name, target, e.get_error_message()))

    def block_pull(self, target, base):
        """Stream into the active image everything above ``base`` (None: the whole chain)."""
        libvirt = _libvirt()
        try:
            self.dom.blockRebase(target, base, 0, 0)
        except libvirt.libvirtError as e:
            raise DatapathError(reason="block pull into %s/%s failed to start: %s"
                                % (self.name, target, e.get_error_message()))

    def pivot(self, target):
        """Switch the disk to the commit's base; returns the call's time in ms, or None when
        libvirt says the mirror is not ready yet (VIR_ERR_BLOCK_COPY_ACTIVE)."""
        libvirt = _libvirt()
        t0 = time.monotonic()
        try:
            self.dom.blockJobAbort(target, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_BLOCK_COPY_ACTIVE:
                return None
            raise DatapathError(reason="pivot of %s/%s failed: %s"
                                % (self.name, target, e.get_error_message()))
        return (time.monotonic() - t0) * 1000.0

    def abort_job(self, target):
        libvirt = _libvirt()
        try:
            self.dom.blockJobAbort(target, 0)
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot abort block job of %s/%s: %s"
                                % (self.name, target, e.get_error_message()))

    def watch_jobs(self):
        return JobWatcher(self)


# virDomainBlockJobType


def _x(text):
    """Escape for an XML attribute."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


class JobWatcher(object):
    """Block-job events of one domain (BLOCK_JOB_2, by disk target), to wait on instead of
    sleeping. Used as a context manager around starting and finishing a job."""

    COMPLETED, FAILED, CANCELED, READY = 0, 1, 2, 3
    NAMES = {0: "completed", 1: "failed", 2: "canceled", 3: "ready"}

    def __init__(self, domain):
        self.domain = domain
        self.cond = threading.Condition()
        self.events = []
        self.cb_id = None

    def _cb(self, conn, dom, disk, job_type, status, opaque):
        with self.cond:
            self.events.append((disk, status, job_type))
            self.cond.notify_all()

    def __enter__(self):
        libvirt = _libvirt()
        self.cb_id = self.domain.conn.domainEventRegisterAny(
            self.domain.dom, libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2, self._cb, None)
        return self

    def __exit__(self, *exc):
        try:
            self.domain.conn.domainEventDeregisterAny(self.cb_id)
        except Exception:  # the connection may be gone on an error path
            pass
        return False

    def seen(self, target):
        with self.cond:
            return [s for d, s, _ in self.events if d == target]

    def clear(self, target):
        with self.cond:
            self.events = [e for e in self.events if e[0] != target]

    def wait(self, target, statuses, timeout, poll=1.0, job_types=None):
        """Wait until an event in ``statuses`` arrives for ``target``, or until ``poll()``
        of the job state says so (a safety net for events sent before we listened).
        With ``job_types``, events of jobs of other types (not the one livesnap started)
        are ignored, and a running job of another type means ours has ended.
        Returns the status seen, or None on timeout."""
        deadline = time.monotonic() + timeout
        if not events_delivered():
            poll = min(poll, POLL_WITHOUT_EVENTS)
        with self.cond:
            while True:
                for d, s, t in self.events:
                    if d == target and s in statuses and (not job_types or t in job_types):
                        return s
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, poll))
                if not any(e[0] == target and (not job_types or e[2] in job_types)
                           for e in self.events):
                    status = self._poll(target, job_types)
                    if status in statuses:
                        return status

    def _poll(self, target, job_types=None):
        info = self.domain.job_info(target)
        if not info or (job_types and info.get("type") not in job_types):
            return self.COMPLETED
        if info.get("end") and info.get("cur") == info.get("end") and \
                self.domain.mirror_ready(target):
            return self.READY
        return None
