"""``livesnap check``: the catalog against the images, the domain and libvirt's metadata."""
import os

from livesnap import formats
from livesnap.errors import BadImage, Error


def check(engine, s):
    """Compare the catalog of session ``s`` with the images on disk, the domain's disks and
    (libvirt) libvirt's snapshot metadata; a dict with the problems (empty when sound)."""
    problems = []
    op = s.catalog.unfinished()
    if op is not None:
        problems.append("operation #%d (%s) is unfinished: run 'livesnap recover %s'"
                        % (op.id, op.op, s.domain.name))
    tree = engine.load(s, validate=False)
    problems += tree.validate()
    sources = {d.target: d.path for d in s.domain.disks()}
    for disk, nid in sorted(tree.active.items()):
        if sources.get(disk) != tree.nodes[nid].path:
            problems.append("disk %s uses %s, catalog has %s"
                            % (disk, sources.get(disk), tree.nodes[nid].path))
    xen = s.domain.kind == "xen"
    opaque = set(tree.active.values()) if xen and s.domain.is_running() else set()
    for n in sorted(tree.nodes.values(), key=lambda n: n.path):
        if not os.path.exists(n.path):
            problems.append("image %s of node %s is missing" % (n.path, n.id))
            continue
        if n.id in opaque:          # open in a tapdisk: metadata stale until paused
            continue
        try:
            entry = formats.info(n.path, n.fmt)
        except BadImage as e:
            problems.append(str(e))
            continue
        want = tree.nodes[n.parent].path if n.parent else None
        if entry.backing != want:
            problems.append("image %s is backed by %s, catalog says %s"
                            % (n.path, entry.backing, want))
        if xen:
            from livesnap import vhd
            problems += ["%s: %s" % (n.path, p) for p in vhd.check(n.path)]
    if s.domain.kind == "libvirt":
        problems += _check_libvirt_metadata(s, tree)
    known = {n.path for n in tree.nodes.values()}
    for directory, prefix, suffix in sorted(_own_file_patterns(s.domain, tree)):
        for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            path = os.path.join(directory, entry)
            if entry.startswith(prefix) and entry.endswith(suffix) and path not in known:
                problems.append("image %s looks like livesnap's but the catalog does not "
                                "know it" % path)
    return {"domain": s.domain.name, "ok": not problems, "problems": problems,
            "reclaimable": [tree.nodes[n].snapshot for n in tree.reclaimable()]}


def _check_libvirt_metadata(session, tree):
    from livesnap.platforms import libvirt_snapshots
    try:
        theirs = {x.name: x.parent for x in libvirt_snapshots.list_snapshots(session.domain)}
    except Error as e:
        return [str(e)]
    ours = {x.name: tree.snapshot_parent(x.name) for x in tree.visible_snapshots()}
    if theirs != ours:
        return ["libvirt's snapshot metadata %s differs from livesnap's snapshots %s"
                % (sorted(theirs.items()), sorted(ours.items()))]
    return []


def _own_file_patterns(domain, tree):
    """(directory, prefix, suffix) of the file names livesnap gives new images."""
    out = set()
    for disk, nid in tree.active.items():
        leaf = tree.nodes[nid].path
        directory, base = os.path.split(leaf)
        if domain.kind == "xen":
            stem = base[:-4] if base.endswith(".vhd") else base
            out.add((directory, stem + ".", ".vhd"))
        else:
            out.add((directory, domain.name + "-", ".qcow2"))
    return out
