"""qcow2 images on logical volumes (KVM), as Proxmox VE 9 keeps snapshots as a volume chain
on LVM and oVirt keeps qcow2 on block storage.

A disk whose image is a qcow2 on an LV (``/dev/<vg>/<lv>``, a ``type='block'`` disk) gets
its new images in the same volume group:

* a new image (a snapshot's overlay, a revert's leaf) is a new LV beside the image below it,
  named as a file would be (``<domain>-<disk>.<snapshot>.qcow2``, characters LVM does not
  take in a name replaced with ``_``: ``lv_name``), tagged ``livesnap``, and thick: sized
  for the whole virtual size plus qcow2's metadata (``qemu-img measure --size``, fully
  allocated, rounded up to the extent), so QEMU never writes past its end. qemu-img then
  writes the overlay onto it (``qemu-img create -b <image below> -F qcow2``).
* the LV is made only after the journal names it (the plan's step holds its path): a
  command killed at any point leaves no LV the catalog does not account for -- recover
  finishes the step, or abandons it and removes the LV;
* an LV at a new image's name that livesnap did not make (no ``livesnap`` tag) is neither
  reused nor removed (``NotOurFile``);
* an image a merge writes into (commit into a snapshot's image, pull into its child) that
  may not hold what the merge adds is grown first (``grow_for``): to its full size;
  the space preflight counts that against the VG's free space (``growth``) and refuses a
  merge into an LV QEMU holds open that would need it (QEMU does not see a block device
  grow under it);
* an image merged away is removed with ``lvremove`` once no process has it open (QEMU lets
  go of an image when its block job ends): ``remove``;
* the LVs of a shut-off domain may be inactive: a command activates the chains it reads and
  puts activation back at its end (``activation``: ``vhd_storage.Activation``, which does
  the same for LVHD, walking qcow2 backing files instead of VHD parent locators).
"""
import logging
import os
import re
import time

from livesnap import faults
from livesnap.datapaths import holders
from livesnap.errors import DatapathError, NoSpace, NotOurFile
from livesnap.tools import lvm, qemu_img

log = logging.getLogger(__name__)

TAG = "livesnap"
RELEASE_TIMEOUT = 10.0            # how long QEMU may take to close an image merged away
# how long a brief opener of an LV no domain uses may hold it before lvremove: any LVM
# command on the host (lvs, lvcreate...) opens every block device it scans for PV labels,
# blkid and udev probe new devices; seen holding one at the wrong moment in a CI run
PROBE_GRACE = 2.0
MARGIN = 2 << 20

_BAD_CHARS = re.compile(r"[^A-Za-z0-9+_.-]")


class LvTooSmall(NoSpace):
    fields = ("path", "needed", "available")
    msg = ("{self.path} is an LV of {self.available} bytes, too small for what the merge may "
           "add (it needs {self.needed} bytes) while the running domain holds it open: shut "
           "the domain down (livesnap then grows it), or grow it with lvextend and restart the "
           "domain")


def split(path):
    """(vg, lv) of an LV path ``/dev/<vg>/<lv>``, or None."""
    return lvm.split_path(path)


def is_lv(path):
    return split(path) is not None


def lv_name(name):
    """``name`` as LVM takes it in an LV name: other characters become ``_``, and a leading
    ``-`` too."""
    name = _BAD_CHARS.sub("_", name)
    return "_" + name[1:] if name.startswith("-") else name


def virtual_size(path):
    return int(qemu_img.info(path, force_share=True)["virtual-size"])


def full_size(size, vg=None):
    """The LV size of a qcow2 image of virtual size ``size`` that may be written all over:
    ``qemu-img measure``'s fully-allocated size, rounded up to the extent of ``vg`` (as LVM
    rounds it; LVM's default extent, 4 MiB, when no VG is named). The extent is asked of
    LVM each time (one ``vgs``), not kept: the service lives longer than a VG may (one
    removed and made again under the same name, or ``vgchange -s``, has another extent),
    and a cache checked against the VG's uuid would cost the same ``vgs`` call."""
    extent = lvm.vg_extent_size(vg) if vg else lvm.EXTENT
    return lvm.round_extent(int(qemu_img.measure(size=size)["fully-allocated"]), extent)


def leaf_cost(below, beside=None):
    """Bytes of the VG a new image over ``below`` takes, made beside ``beside`` (an LV path:
    its VG's extent; default: ``below``'s)."""
    where = split(beside or below)
    return full_size(virtual_size(below), where[0] if where else None)


def _lv_size(path):
    vg, lv = split(path)
    return lvm.lv_size(vg, lv)


def growth(path, adds):
    """(bytes ``path``'s LV must grow by so that a merge adding ``adds`` bytes of data fits,
    its size now): 0 when it is at its full size or its free room past the image's end
    holds the data with a margin for qcow2's tables; else what takes it to its full size."""
    size = _lv_size(path)
    full = full_size(virtual_size(path), split(path)[0])
    if size >= full:
        return 0, size
    end = qemu_img.check(path, force_share=True).get("image-end-offset") or size
    if end + adds + adds // 32 + MARGIN <= size:
        return 0, size
    return full - size, size


def data_of(source):
    """Bytes a merge of ``source``'s own clusters may add to the image it goes into."""
    return sum(n for _, n in qemu_img.allocated(source, force_share=True))


def grow_for(path, source):
    """Grow ``path``'s LV (not open in any process) so that a merge of ``source``'s data into
    it fits."""
    more, size = growth(path, data_of(source))
    if more:
        vg, lv = split(path)
        log.info("growing %s from %d to %d bytes for the merge", path, size, size + more)
        lvm.lvresize(vg, lv, size + more)


def create(path, backing, backing_fmt):
    """A new qcow2 overlay over ``backing`` on a new LV at ``path`` (see the module's doc);
    an LV livesnap left there (a crashed attempt, not yet used) is reused."""
    vg, lv = split(path)
    size = leaf_cost(backing, path)
    if os.path.exists(path):
        if TAG not in lvm.lv_tags(vg, lv):
            raise NotOurFile(path, "an LV without livesnap's tag %r" % TAG)
        if lvm.lv_size(vg, lv) < size:
            lvm.lvresize(vg, lv, size)
    else:
        lvm.lvcreate(vg, lv, size, tag=TAG)
        log.info("created LV %s/%s (%d bytes)", vg, lv, size)
        faults.point("lvm", "created", 0)
    qemu_img.create(path, "qcow2", backing=backing, backing_fmt=backing_fmt)


def backing_of(path):
    """The backing image a qcow2's header names (absolute), or None: how the LVs of a chain
    are found before they are active (``vhd_storage.Activation``)."""
    from livesnap import qcow2
    h = qcow2.read_header(path)
    if h is not None:
        return qemu_img.resolve_backing(h.backing, path)
    try:
        return qemu_img.backing_path(qemu_img.info(path, force_share=True), path)
    except Exception as e:       # an image we cannot read names no parent we can see
        log.debug("%s not read: %s", path, e)
        return None


def activation(domain):
    """A ``vhd_storage.Activation`` of the domain's qcow2-on-LV disks, their chains made
    active (LVs of a stopped domain may be inactive: Proxmox VE deactivates those on shared
    LVM), or None when no disk is one."""
    leaves = [d.path for d in domain.disks(inactive=True)
              if domain.snapshottable(d) and is_lv(d.path)]
    if not leaves:
        return None
    from livesnap.datapaths.vhd_storage import Activation
    act = Activation(parent_of=backing_of)
    for leaf in leaves:
        act.begin(leaf)
    return act


def remove(path, wait=0.0, made_here=False):
    """``lvremove`` the LV at ``path`` once no process holds it open, waiting up to ``wait``
    seconds for that; DatapathError when one still does. False when it is gone.
    ``made_here``: the new image of a step taken back, which livesnap made: an LV without
    its tag at that name is not removed (NotOurFile)."""
    vg, lv = split(path)
    if not os.path.exists(path):
        return False
    if made_here and TAG not in lvm.lv_tags(vg, lv):
        raise NotOurFile(path, "an LV without livesnap's tag %r" % TAG)
    deadline = time.monotonic() + wait
    pids = holders.open_by(path)
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = holders.open_by(path)
    if pids:
        raise DatapathError(reason="%s is still open in process %s: LV not removed ('livesnap "
                                   "recover' removes it once it is closed)"
                            % (path, ",".join(str(p) for p in pids)))
    try:
        lvm.lvremove(vg, lv)
    except lvm.LvNotFound:
        return False
    log.info("removed LV %s/%s", vg, lv)
    return True
