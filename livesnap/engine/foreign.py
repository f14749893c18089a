"""Work of other tools on a domain, which livesnap must not act on or break.

Before a changing command, livesnap refuses a domain on which a job runs that it did not
start: a block job on any disk (a user's ``virsh blockcopy``, ``blockcommit``,
``blockpull``) or a backup job (``virsh backup-begin``). An interrupted livesnap operation
is continued by ``livesnap recover`` alone, which does not come through here: every job
a changing command finds is someone else's.

Before a merge, it makes sure the merge keeps the persistent dirty bitmaps of its images
right (what libvirt checkpoints and incremental backups rely on: oVirt, virtnbdbackup;
``datapaths.bitmaps``), and refuses, naming the bitmap and the images, a merge that cannot:
a bitmap of the lower image missing from the upper one in a live merge (its record has a
gap the merge would hide), a bitmap left inconsistent in an image merged offline, or a live
merge under a libvirt or QEMU too old to merge bitmaps at the end of a block job.
"""
import logging

from livesnap.errors import BadImage, BitmapsPresent, ForeignJob

log = logging.getLogger(__name__)

MERGES = ("commit", "pull")


def refuse_jobs(domain):
    """Raise ``ForeignJob`` for the first job running on ``domain`` (a libvirt domain)."""
    if domain.kind != "libvirt":
        return
    for disk, job, dest in domain.block_jobs():
        raise ForeignJob(domain.name, disk, job, dest)
    if domain.backup_running():
        raise ForeignJob(domain.name, None, "backup", None)


# libvirt merges the bitmaps of the images a block job merges (commit, active commit, pull;
# checked with libvirt 9.0 and QEMU 7.2, tests/online/test_bitmaps_live.py); a commit of an
# intermediate image needs QEMU's blockdev-reopen for it (stable in QEMU 6.1). The libvirt
# bound is a conservative one, not checked release by release: older ones are refused
LIBVIRT_KEEPS_BITMAPS = 7000000
QEMU_REOPEN = 6001000


def refuse_bitmaps(domain, plan):
    """Raise ``BitmapsPresent`` when a merge of the plan cannot keep the persistent dirty
    bitmaps of its images right (``datapaths.bitmaps.problems``)."""
    steps = [s for s in plan.steps if s["op"] in MERGES]
    if not steps or domain.kind != "libvirt":
        return
    from livesnap.datapaths import bitmaps as B
    running = domain.is_running()
    chains, found, live_maps = {}, [], []
    for step in steps:
        lower, upper = step["path"], step["child_path"]
        live = active = False
        if running:
            if step["disk"] not in chains:
                chains[step["disk"]] = domain.live_chain(step["disk"])
            live = upper in chains[step["disk"]]
            active = upper == chains[step["disk"]][0]
        # the files of a running chain's images below the active one hold their bitmaps
        # as QEMU does (it writes them when it opens an image read-only); the active
        # image's file does not
        lower_maps, upper_maps = bitmaps_of(lower), bitmaps_of(upper)
        if live and (lower_maps or upper_maps):
            live_maps.append(lower if lower_maps else upper)
        for text in B.problems(step["op"], lower, upper, lower_maps,
                               None if active else upper_maps, live):
            if text not in found:
                found.append(text)
    if live_maps or (running and chains and domain.checkpoints()):
        live_maps = live_maps or ["the images of its checkpoints"]
        lib, qemu = domain.versions()
        if lib < LIBVIRT_KEEPS_BITMAPS or qemu < QEMU_REOPEN:
            found.append("dirty bitmaps in %s, which libvirt %s with QEMU %s does not keep "
                         "in a live merge (libvirt 7.0 and QEMU 6.1 do)"
                         % (", ".join(live_maps), _version(lib), _version(qemu)))
    if found:
        raise BitmapsPresent(domain.name, found)


def _version(n):
    return "%d.%d.%d" % (n // 1000000, n // 1000 % 1000, n % 1000)


def bitmaps_of(path):
    """The persistent dirty bitmaps of an image ([] for other formats, or one gone)."""
    from livesnap.datapaths import bitmaps as B
    try:
        return B.of(path)
    except BadImage:
        return []             # the images were validated: one gone meanwhile has no bitmaps

