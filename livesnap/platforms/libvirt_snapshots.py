"""libvirt's snapshot metadata: read it (to adopt snapshots made with virsh) and keep it in
step with livesnap's visible snapshots (REDEFINE / DELETE_METADATA_ONLY), so that
``virsh snapshot-list --tree`` shows exactly what ``livesnap snapshot-list`` shows.

libvirt's model of an external disk snapshot: ``<disks><disk><source>`` names the overlay
created at that moment, and the embedded ``<domain>`` names the images that were active
before it, which hold the snapshot's point-in-time data.
"""
import calendar
import collections
import datetime
import logging

from livesnap.text import xml_text
from livesnap.errors import DatapathError, UsageError
from livesnap.model.tree import HIDDEN
from livesnap.platforms import domain_xml

log = logging.getLogger(__name__)

LibvirtSnapshot = collections.namedtuple(
    "LibvirtSnapshot", "name description created parent state memory disks images")
# disks: {target: (snapshot kind, overlay path or None)}; images: {target: point-in-time path}


def _libvirt():
    from livesnap.platforms.libvirt_domain import _libvirt as get
    return get()


def parse(xml_text):
    root = domain_xml.parse(xml_text)
    memory = root.find("memory")
    disks = {}
    for d in root.findall("./disks/disk"):
        source = d.find("source")
        disks[d.get("name")] = (d.get("snapshot", "external"),
                                (source.get("file") or source.get("dev"))
                                if source is not None else None)
    images = {}
    dom = root.find("domain")
    if dom is not None:
        images = {d.target: d.path for d in domain_xml.disks(dom) if d.path}
    parent = root.find("parent/name")
    created = int(root.findtext("creationTime") or 0)
    return LibvirtSnapshot(root.findtext("name"), root.findtext("description") or "",
                           datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
                           .isoformat(), parent.text if parent is not None else None,
                           root.findtext("state"),
                           memory.get("snapshot") if memory is not None else "no", disks, images)


def list_snapshots(domain):
    libvirt = _libvirt()
    try:
        return [parse(s.getXMLDesc(0)) for s in domain.dom.listAllSnapshots(0)]
    except libvirt.libvirtError as e:
        raise DatapathError(reason="cannot list libvirt snapshots of %s: %s"
                            % (domain.name, e.get_error_message()))


def list_names(domain):
    """The names of libvirt's snapshots of ``domain`` (without reading their XML)."""
    libvirt = _libvirt()
    try:
        return [s.getName() for s in domain.dom.listAllSnapshots(0)]
    except libvirt.libvirtError as e:
        raise DatapathError(reason="cannot list libvirt snapshots of %s: %s"
                            % (domain.name, e.get_error_message()))


def check_adoptable(domain, snaps):
    """livesnap adopts external disk-only snapshots; anything else is refused up front."""
    for s in snaps:
        if s.memory not in (None, "no"):
            raise UsageError(reason="snapshot '%s' of '%s' has a memory state (%s); livesnap "
                                    "manages disk-only external snapshots"
                             % (s.name, domain.name, s.memory))
        internal = [t for t, (kind, _) in s.disks.items() if kind == "internal"]
        if internal or (not s.disks and s.state != "disk-snapshot"):
            raise UsageError(reason="snapshot '%s' of '%s' is internal (inside the qcow2 "
                                    "image); livesnap manages external snapshots only"
                             % (s.name, domain.name))


def _epoch(iso):
    try:
        dt = datetime.datetime.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return 0
    return calendar.timegm(dt.timetuple())


def _x(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace("'", "&apos;").replace('"', "&quot;"))


def snapshot_xml(domain, name, description, created, parent, images, state, overlays=None):
    """A disk-only snapshot definition naming ``images`` ({target: (path, fmt)}) as the
    snapshot's point-in-time images in the embedded <domain>, and ``overlays`` ({target:
    (path, fmt)}, the images made on top of them when it was taken) in <disks>, as libvirt
    records an external snapshot it takes itself: ``virsh snapshot-delete`` (libvirt >= 9.0)
    looks the overlay up in the disk's chain and commits it into the image below. A disk
    without an overlay (a leaf snapshot) names its own image in both.
    ``state``: the domain's state when taken, as libvirt records it ("disk-snapshot" for a
    running domain, "shutoff" for a stopped one)."""
    dom = domain_xml.parse_for_edit(domain.xml(inactive=True))
    domain_xml.set_disk_sources(dom, images)
    overlays = dict(images, **(overlays or {}))
    disks = "".join("<disk name='%s' snapshot='external' type='%s'><driver type='%s'/>"
                    "<source %s='%s'/></disk>" % ((_x(t), domain_xml.source_kind(p)[0], _x(f))
                                                  + (domain_xml.source_kind(p)[1], _x(p)))
                    for t, (p, f) in sorted(overlays.items()))
    return ("<domainsnapshot><name>%s</name><description>%s</description>"
            "<state>%s</state>%s<creationTime>%d</creationTime><memory snapshot='no'/>"
            "<disks>%s</disks>%s</domainsnapshot>"
            % (_x(name), _x(xml_text(description or "")), _x(state),
               "<parent><name>%s</name></parent>" % _x(parent) if parent else "",
               _epoch(created), disks, domain_xml.to_string(dom)))


def _current_name(domain):
    """The name of libvirt's current snapshot of ``domain``, or None."""
    if not domain.dom.hasCurrentSnapshot(0):
        return None
    return domain.dom.snapshotCurrent(0).getName()


def _same(theirs, description, parent, images, overlays):
    """libvirt's definition ``theirs`` (a ``LibvirtSnapshot``) already says what a redefine
    would: the parent, the description (as XML can hold it: an older catalog may have
    what it cannot), the point-in-time images ({target: path}) in the embedded domain and
    the overlays ({target: path}) in <disks>."""
    return (theirs.parent == parent and theirs.description == xml_text(description or "")
            and theirs.images == images
            and {t: p for t, (_, p) in theirs.disks.items()} == dict(images, **overlays))


def overlays(tree, name):
    """{disk: node id} of the images made on top of snapshot ``name``'s images when it was
    taken, as libvirt's model has them: a node's only child, when it is not hidden. Then
    what ``virsh snapshot-delete`` does (commit that child into the snapshot's image) is
    what livesnap would do. A node with several children (a branch after a revert), or
    whose child is a hidden image other images read, names no overlay: libvirt, not finding
    the snapshot's own image above its parent in the chain, refuses to delete it and
    changes nothing (livesnap deletes it, logically if need be)."""
    out = {}
    for disk, nid in tree.snapshot_nodes(name).items():
        children = tree.children(nid)
        if len(children) == 1 and tree.nodes[children[0]].state != HIDDEN:
            out[disk] = children[0]
    return out


def sync(domain, tree, ours=None):
    """Make libvirt's snapshot metadata show livesnap's visible snapshots, parents and
    current snapshot; nothing else (hidden snapshots are livesnap's business). Returns what
    it changed: ``[("deleted" | "defined", name)]``.

    ``ours``: the names livesnap has had for this domain, or a function that returns them
    (``Catalog.known_names``, called only when libvirt has a name the tree does not show);
    a libvirt snapshot with another name was not made by livesnap and is left alone (None:
    every name is livesnap's).

    Only what differs is written: a snapshot libvirt lacks, or whose parent, description
    or images changed (REDEFINE), the snapshot that becomes current, and the one that
    stops being current; the others are left as they are (each REDEFINE reads the domain
    XML and has libvirt rewrite the snapshot's file)."""
    libvirt = _libvirt()
    visible = tree.visible_snapshots()
    want = {s.name for s in visible}
    try:
        changed = []
        have = {s.getName(): s for s in domain.dom.listAllSnapshots(0)}
        extra = sorted(set(have) - want)
        if extra and callable(ours):
            ours = ours()
        for name in extra:
            if ours is not None and name not in ours:
                have.pop(name)
                continue                    # not livesnap's: left as it is
            have.pop(name).delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
            changed.append(("deleted", name))
        current = tree.current_snapshot()
        their_current = _current_name(domain) if have else None
        running = None
        done = set()
        pending = list(visible)
        while pending:                      # parents before children
            progressed = False
            for s in list(pending):
                parent = tree.snapshot_parent(s.name)
                if parent is not None and parent not in done:
                    continue
                done.add(s.name)
                pending.remove(s)
                progressed = True
                nodes = tree.snapshot_nodes(s.name)
                images = {t: (tree.nodes[n].path, tree.nodes[n].fmt) for t, n in nodes.items()}
                over = {t: (tree.nodes[n].path, tree.nodes[n].fmt)
                        for t, n in overlays(tree, s.name).items()}
                theirs = parse(have[s.name].getXMLDesc(0)) if s.name in have else None
                if (theirs is not None and (s.name == current) == (s.name == their_current)
                        and _same(theirs, s.description, parent,
                                  {t: p for t, (p, _) in images.items()},
                                  {t: p for t, (p, _) in over.items()})):
                    continue
                flags = libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
                if s.name == current:
                    flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
                if theirs is not None and theirs.state:
                    # libvirt refuses a redefinition that changes a snapshot between disk
                    # only ("disk-snapshot") and full system ("shutoff", ...): keep the
                    # state it was taken in, not the domain's state now
                    state = theirs.state
                else:
                    if running is None:
                        running = domain.is_running()
                    state = "disk-snapshot" if running else "shutoff"
                domain.dom.snapshotCreateXML(
                    snapshot_xml(domain, s.name, s.description, s.created, parent, images,
                                 state, over), flags)
                changed.append(("defined", s.name))
            if not progressed:
                raise DatapathError(reason="snapshot parents of %s form no tree" % domain.name)
        return changed
    except libvirt.libvirtError as e:
        raise DatapathError(reason="cannot update libvirt's snapshot metadata of %s: %s"
                            % (domain.name, e.get_error_message()))
