"""A Xen domain described by a libvirt domain XML file whose disks are VHD files served by
blktap's tapdisk (``<driver name='tap'|'tap2' type='vhd'/>``). The domain runs when a tapdisk
serves its disks (``tap-ctl list``); its disk paths never change (tapdisk's rename convention),
so the file is only read."""
import os

from livesnap.errors import DomainNotFound, UsageError
from livesnap.platforms import domain_xml
from livesnap.tools import tap_ctl


class XenXmlPlatform(object):
    def __init__(self, xml_path):
        self.xml_path = xml_path

    def lookup(self, ident):
        dom = XenXmlDomain(self.xml_path)
        if ident not in (dom.name, dom.uuid):
            raise DomainNotFound(ident)
        return dom


class XenDomainBase(object):
    """What every Xen domain shares: VHD disks that tapdisk serves by path, paths that never
    change. Subclasses give ``name``, ``uuid`` and ``disks()``."""
    kind = "xen"

    def snapshottable(self, disk):
        return (disk.device == "disk" and disk.path is not None and not disk.readonly
                and disk.fmt == "vhd")

    def tapdisks(self):
        """{target: TapDisk} of the disks a tapdisk serves now."""
        serving = [td for td in tap_ctl.list_() if td.path and td.pid is not None]
        out = {}
        for d in self.disks():
            if self.snapshottable(d):
                for td in serving:
                    if tap_ctl.same_file(td.path, d.path):
                        out[d.target] = td
                        break
        return out

    def is_running(self):
        return bool(self.tapdisks())

    def state_name(self):
        return "running" if self.is_running() else "shut off"

    def set_disk_sources(self, sources):
        current = {d.target: d.path for d in self.disks()}
        changed = {t: v for t, v in sources.items() if current.get(t) != v[0]}
        if changed:
            raise UsageError(reason="the disks of Xen domain %s keep their paths; livesnap "
                                    "would have moved %s" % (self.name, sorted(changed)))


class XenXmlDomain(XenDomainBase):
    def __init__(self, xml_path):
        self.xml_path = xml_path
        try:
            with open(xml_path, "rb") as f:
                self.root = domain_xml.parse(f.read())
        except (IOError, OSError) as e:
            raise UsageError(reason="cannot read domain XML %s: %s" % (xml_path, e))
        except Exception as e:  # lxml's XMLSyntaxError
            raise UsageError(reason="domain XML %s is not valid XML: %s" % (xml_path, e))
        self.name, self.uuid = domain_xml.domain_identity(self.root)
        if not self.name or not self.uuid:
            raise UsageError(reason="domain XML %s needs <name> and <uuid>" % xml_path)

    def disks(self, inactive=False):
        out = []
        for d in domain_xml.disks(self.root):
            out.append(d._replace(path=os.path.abspath(d.path)) if d.path else d)
        return out


class XenLibvirtDomain(XenDomainBase):
    """A Xen domain that libvirt knows (``xen:///system``, libxl driver): its definition is
    read from libvirt, its disks are still served by tapdisk and keep their paths. libvirt's
    libxl driver has no snapshot API, so nothing is asked of libvirt but the XML."""

    def __init__(self, domain):
        self.libvirt_domain = domain
        self.name = domain.name
        self.uuid = domain.uuid

    def disks(self, inactive=False):
        out = []
        for d in domain_xml.disks(domain_xml.parse(self.libvirt_domain.xml(inactive=inactive))):
            out.append(d._replace(path=os.path.abspath(d.path)) if d.path else d)
        return out

    def other_domains_xml(self):
        return self.libvirt_domain.other_domains_xml()


def is_xen_domain(disks):
    """A domain whose disks are VHD images is served by tapdisk: a Xen domain."""
    return any(d.fmt == "vhd" and d.device == "disk" for d in disks)
