"""``livesnap check``: the catalog against the images, the domain and libvirt's metadata."""
import os
import stat

from livesnap import formats
from livesnap.errors import BadImage, Error


def image_problems(domain, tree, opaque=()):
    """Every way the domain's disks and the images on disk disagree with the catalog, as
    ``BadImage`` errors (not raised): a disk using another image, an image missing or not
    opening, of another format or with another backing file. Nodes in ``opaque`` (leaves a
    tapdisk holds open: their metadata is stale until a pause) are not read. Refreshes each
    node's allocation size on the way (an opaque leaf's from its file size)."""
    sources = {d.target: d.path for d in domain.disks()}
    for disk, nid in sorted(tree.active.items()):
        path = tree.nodes[nid].path
        if sources.get(disk) != path:
            yield BadImage(sources.get(disk) or disk,
                           "disk %s of '%s' uses %s but livesnap's catalog has %s; it was "
                           "changed outside livesnap (see 'livesnap check %s')"
                           % (disk, domain.name, sources.get(disk), path, domain.name))
    nodes = sorted(tree.nodes.values(), key=lambda n: n.path)
    missing = {n.id for n in nodes if not os.path.exists(n.path)}
    for n in nodes:
        if n.id in missing:
            yield BadImage(n.path, "image of node %s (%s) is missing" % (n.id, n.state))
    # one qemu-img call per disk reads its whole live chain; other images one by one
    infos = {}
    for nid in tree.active.values():
        leaf = tree.nodes[nid]
        if leaf.fmt == "qcow2" and nid not in opaque and not missing:
            try:
                for e in formats.chain(leaf.path, leaf.fmt):
                    infos.setdefault(e.path, e)
            except BadImage:
                pass                    # each image below says what is wrong with it
    for n in nodes:
        if n.id in missing:
            continue
        if n.id in opaque:
            # its allocation estimated from the file: the planner weighs commit and pull
            n.alloc = _opaque_alloc(n.path)
            continue
        try:
            entry = infos.get(n.path) or formats.info(n.path, n.fmt)
        except BadImage as e:
            yield e
            continue
        if entry.fmt != n.fmt:
            yield BadImage(n.path, "format is %s, catalog says %s" % (entry.fmt, n.fmt))
        want = tree.nodes[n.parent].path if n.parent else None
        if entry.backing != want:
            yield BadImage(n.path, "backing file is %s, expected %s" % (entry.backing, want))
        n.alloc = entry.alloc


def _opaque_alloc(path):
    """What a leaf a tapdisk holds open has allocated, without trusting its footer: a file's
    size; on a block device (an LV, whose size says nothing) the end of data its BAT gives
    (tapdisk writes a BAT entry when it allocates a block), read without validating it: it
    may point past the footer on disk while tapdisk allocates."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    from livesnap import vhd
    try:
        return vhd.data_end_unchecked(path)
    except vhd.VhdError:
        return 0


def check(engine, s):
    """Compare the catalog of session ``s`` with the images on disk, the domain's disks and
    (libvirt) libvirt's snapshot metadata; a dict with the problems (empty when sound)."""
    problems = []
    op = s.catalog.unfinished()
    if op is not None:
        problems.append("operation #%d (%s) is unfinished: run 'livesnap recover %s'"
                        % (op.id, op.op, s.domain.name))
    tree = engine.load(s, validate=False, datapath=s.datapath)
    problems += tree.validate()
    xen = s.domain.kind == "xen"
    opaque = set(tree.active.values()) if xen and s.domain.is_running() else set()
    problems += [str(e) for e in image_problems(s.domain, tree, opaque)]
    if xen:
        from livesnap import vhd
        problems += ["%s: %s" % (n.path, p) for n in sorted(tree.nodes.values(),
                                                            key=lambda n: n.path)
                     if n.id not in opaque and os.path.exists(n.path) for p in vhd.check(n.path)]
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
