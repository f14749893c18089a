"""The one module that talks to libvirt: connections and domains.

Every ``libvirt.libvirtError`` is translated here into livesnap's errors (``from e``), and a
no-op error handler keeps libvirt from printing to stderr.
"""
import logging

from livesnap.errors import DatapathError, DomainNotFound
from livesnap.platforms import domain_xml

log = logging.getLogger(__name__)

_handler_registered = False


def _libvirt():
    import libvirt  # imported only where libvirt is used
    global _handler_registered
    if not _handler_registered:
        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        _handler_registered = True
    return libvirt


def open_connection(uri=None):
    libvirt = _libvirt()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise DatapathError(reason="cannot connect to libvirt at %s: %s"
                            % (uri or "the default URI", e.get_error_message()))


class Domain(object):
    """A libvirt domain as livesnap sees it."""

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

    def set_disk_sources(self, sources):
        """Rewrite the persistent definition so the disks in ``sources`` ({target: (path, fmt)})
        use those images; one defineXML, so all disks change at once."""
        libvirt = _libvirt()
        root = domain_xml.set_disk_sources(domain_xml.parse(self.xml(inactive=True)), sources)
        try:
            self.conn.defineXML(domain_xml.to_string(root))
        except libvirt.libvirtError as e:
            raise DatapathError(reason="cannot redefine %s: %s" % (self.name,
                                                                   e.get_error_message()))
