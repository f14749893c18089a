"""The errors livesnap raises.

Every error carries its facts as attributes; ``msg`` is a template rendered from them.
Library code raises; only the CLI chooses how a message is shown and which exit code it gets.

Tree::

    Error
     +-- CommandFailed            an external command exited non-zero
     +-- CommandNotFound          an external command could not be started
     +-- InvalidOutput            an external command printed something we cannot use
     +-- UsageError               arguments that cannot name anything (bad name, bad UUID)
     +-- NotFound
     |    +-- DomainNotFound
     |    +-- SnapshotNotFound
     +-- Conflict
     |    +-- DuplicateName
     |    +-- Busy                another livesnap command holds the domain
     |    |    +-- SmRefcountBusy  SM holds its lock of an LV's refcount
     |    +-- ServiceSocket       the service's socket is taken or cannot be made
     |    +-- WrongState          domain running/stopped where the datapath needs the other
     |    +-- InterruptedOperation  an unfinished operation needs ``livesnap recover``
     |    +-- ImageInUse          an image livesnap would change has another user
     |    +-- ImageShared         one image twice in one domain's chains
     |    +-- ForeignJob          a block or backup job livesnap did not start
     |    +-- BitmapsPresent      dirty bitmaps a merge cannot keep right
     |    +-- UnsupportedDisks    disks a snapshot would silently leave out
     +-- Interrupted              SIGINT/SIGTERM stopped an operation between two steps
     +-- BadImage                 corrupt header, missing backing file, cycle, wrong parent
     |    +-- ChainTooDeep
     |    +-- PathOutsideStorage
     |    +-- DataFileImage       a qcow2 image with an external data file
     +-- NoSpace
     +-- UnusablePath             a new image's path the file system or LVM cannot hold
     +-- DatapathError            pausing, block jobs, retargeting
     |    +-- NotOurFile          a name livesnap would delete or truncate is not its file
     +-- CatalogError             the SQLite catalog is unusable or from a newer livesnap
     +-- StateDirUnusable         the state directory is not a directory, or not writable
"""
import logging

# a library logs nothing unless its user configures logging
logging.getLogger("livesnap").addHandler(logging.NullHandler())


class Error(Exception):
    msg = "{self.reason}"
    reason = "livesnap error"

    def __init__(self, *args, **kwargs):
        # Subclasses name their facts as keyword arguments; positional arguments fill
        # ``fields`` in order.
        for name, value in zip(getattr(self, "fields", ()), args):
            setattr(self, name, value)
        for name, value in kwargs.items():
            setattr(self, name, value)
        super(Error, self).__init__(*args)

    def __str__(self):
        return self.msg.format(self=self)


class CommandFailed(Error):
    fields = ("cmd", "rc", "out", "err")
    msg = "Command {self.cmd_str} failed with rc={self.rc}: {self.err_line}"

    @property
    def cmd_str(self):
        return " ".join(str(a) for a in self.cmd)

    @property
    def err_line(self):
        text = (self.err or self.out or "").strip()
        return " ".join(text.splitlines()[-3:]) if text else "(no output)"


class CommandNotFound(Error):
    """An external command that could not be started (not installed, not executable): no
    exit status to report."""
    fields = ("cmd", "reason")

    @property
    def msg(self):
        if self.reason == "No such file or directory":
            return "command not found: {self.cmd[0]}"
        return "cannot run {self.cmd[0]}: {self.reason}"


class InvalidOutput(Error):
    fields = ("cmd", "out", "reason")
    msg = "Command {self.cmd} printed unusable output: {self.reason}"


class UsageError(Error):
    fields = ("reason",)


class NotFound(Error):
    pass


class DomainNotFound(NotFound):
    fields = ("domain",)
    msg = "domain '{self.domain}' not found"


class SnapshotNotFound(NotFound):
    fields = ("domain", "snapshot")
    msg = "domain '{self.domain}' has no snapshot named '{self.snapshot}'"


class Conflict(Error):
    pass


class DuplicateName(Conflict):
    fields = ("domain", "snapshot")
    msg = "domain '{self.domain}' already has a snapshot named '{self.snapshot}'"


class ServiceSocket(Conflict):
    fields = ("socket", "reason")
    msg = "cannot serve on {self.socket}: {self.reason}"


class Busy(Conflict):
    fields = ("domain", "lock_path")
    msg = "another livesnap command is working on domain '{self.domain}' (lock {self.lock_path})"


class SmGcBusy(Busy):
    """XAPI: SM's garbage collector of an SR kept its ``gc_active`` lock after it was asked
    to stop (SM's abort flag)."""
    fields = ("sr", "lock_path", "timeout")
    msg = ("SM's garbage collector of SR {self.sr} did not stop within {self.timeout:.0f} s "
           "of being asked (it holds {self.lock_path}); livesnap changed nothing, try again")


class SmRefcountBusy(Busy):
    """XAPI, LVHD: SM kept its lock of an LV's refcount (``Lock(<vdi uuid>, "lvm-<sr>")``)
    past livesnap's wait; the LV and its counts were not touched."""
    fields = ("vdi", "lock_path", "timeout")
    msg = ("SM held its lock of the LV refcount of VDI {self.vdi} ({self.lock_path}) for more "
           "than {self.timeout:.0f} s; livesnap left that LV and its counts as they were "
           "(livesnap recover finishes the command)")


class WrongState(Conflict):
    fields = ("domain", "state", "reason")
    msg = "domain '{self.domain}' is {self.state}: {self.reason}"


class InterruptedOperation(Conflict):
    fields = ("domain", "op_id", "op")
    msg = ("domain '{self.domain}' has an interrupted operation #{self.op_id} ({self.op}); "
           "run 'livesnap recover {self.domain}' first")


class ImageInUse(Conflict):
    fields = ("path", "users", "reason")
    msg = "image {self.path} is also used by {self.users_text}: {self.reason}"

    @property
    def users_text(self):
        return ", ".join(self.users)


class ImageShared(Conflict):
    fields = ("domain", "path", "disks")
    msg = ("domain '{self.domain}' uses the image {self.path} in more than one disk's chain "
           "({self.disks_text}); livesnap refuses to work on it: a merge or delete for one disk "
           "would change or remove what the other reads")

    @property
    def disks_text(self):
        return ", ".join(self.disks)


class ForeignJob(Conflict):
    """A job on the domain that livesnap did not start (a user's blockcopy, blockcommit,
    blockpull, a backup): livesnap neither waits on it nor pivots or aborts it."""
    fields = ("domain", "disk", "job", "destination")
    msg = ("domain '{self.domain}' has a {self.job} job{self.where} that livesnap did not "
           "start; livesnap changes nothing while another tool's job runs: let it finish or "
           "end it ({self.how}), then run the command again")

    @property
    def where(self):
        text = " on disk %s" % self.disk if self.disk else ""
        if self.destination:
            text += " (destination %s)" % self.destination
        return text

    @property
    def how(self):
        if self.job == "backup":
            return "virsh domjobabort %s" % self.domain
        return "virsh blockjob %s %s --abort, or --pivot for a copy that should become the " \
               "disk" % (self.domain, self.disk)


class BitmapsPresent(Conflict):
    """Persistent dirty bitmaps that a merge cannot keep right."""
    fields = ("domain", "found")
    msg = ("domain '{self.domain}': {self.found_text}; incremental backups rely on these "
           "bitmaps and this merge cannot keep them right: refused (delete the checkpoint "
           "with 'virsh checkpoint-delete', or the bitmap with 'qemu-img bitmap --remove', "
           "and take a full backup afterwards)")

    @property
    def found_text(self):
        return "; ".join(self.found)


class StorageBusy(Conflict):
    """A disk's storage is in a state another tool made, which livesnap would break (XAPI: a
    VDI SM has paused, relinks, mirrors, or tracks changed blocks of)."""
    fields = ("domain", "disk", "vdi", "reason")
    msg = ("disk {self.disk} of VM '{self.domain}' (VDI {self.vdi}): {self.reason}; livesnap "
           "changes nothing")


class WrongHost(Conflict):
    """The command runs on a host that must not do it (XAPI: the VM runs elsewhere, or the
    LVM metadata of a shared SR is written only on the pool master)."""
    fields = ("domain", "host", "reason")
    msg = "VM '{self.domain}': {self.reason}; livesnap changes nothing (run it on host {self.host})"


class UnsupportedDisks(Conflict):
    """Disks of the domain livesnap cannot snapshot, which a create would leave out."""
    fields = ("domain", "disks")
    msg = ("domain '{self.domain}' has disks livesnap cannot snapshot: {self.disks_text}; a "
           "snapshot would not hold them: name the disks to snapshot with --disk, or say "
           "--skip-unsupported to leave these out")

    @property
    def disks_text(self):
        return ", ".join("%s (%s)" % (t, why) for t, why in self.disks)


class Interrupted(Error):
    fields = ("signo", "domain")
    msg = ("interrupted by signal {self.signo}; the operation on '{self.domain}' stopped between "
           "two steps: run 'livesnap recover {self.domain}' to finish it")


class BadImage(Error):
    fields = ("path", "reason")
    msg = "bad image {self.path}: {self.reason}"


class ChainTooDeep(BadImage):
    fields = ("path", "depth", "limit")
    msg = "backing chain of {self.path} would be {self.depth} deep (limit {self.limit})"


class PathOutsideStorage(BadImage):
    fields = ("path", "storage")
    msg = "{self.path} is outside the storage directory {self.storage}"


class DataFileImage(BadImage):
    fields = ("path", "data_file")
    msg = ("bad image {self.path}: it keeps its data in an external data file "
           "({self.data_file}); livesnap does not manage qcow2 images with a data_file (the "
           "data file would be left behind when the image is merged away): refused before "
           "any change")


class NoSpace(Error):
    fields = ("path", "needed", "available")
    msg = ("not enough space for {self.path}: {self.needed} bytes needed, "
           "{self.available} available")


class UnusablePath(Error):
    fields = ("path", "reason")
    msg = "cannot create an image at {self.path}: {self.reason}"


class DatapathError(Error):
    fields = ("reason",)


class NotOurFile(DatapathError):
    fields = ("path", "reason")
    msg = "{self.path} is not a file livesnap made ({self.reason}): left alone"


class CatalogError(Error):
    fields = ("path", "reason")
    msg = "catalog {self.path}: {self.reason}"


class StateDirUnusable(Error):
    fields = ("path", "reason")
    msg = "state directory {self.path} is unusable: {self.reason}"
