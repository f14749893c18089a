"""What each command's ``--help`` says beyond its options: a description (the one-line help
of the command list, and what to know before running it) and examples, as virsh's help
gives them. ``Commands(sub)`` puts them on the parsers the commands' ``register`` make."""
import argparse
import textwrap

# command -> (what to know, [example lines]); the description starts with the command's
# one-line help from the command list
TEXTS = {
    "snapshot-create": (
        "A running domain keeps running: its disk IO is paused, each disk's current image "
        "frozen and a new empty image put on top, then IO resumes; no data is copied. A "
        "domain with disks livesnap cannot snapshot is refused, naming them.",
        ['livesnap snapshot-create vm1 before-upgrade --description "kernel 6.1"',
         "livesnap snapshot-create vm1 nightly --disk vda --quiesce",
         "livesnap snapshot-create vm1 s1 --skip-unsupported --output json",
         "livesnap --domain-xml /etc/xen/vm1.xml snapshot-create vm1 s1"]),
    "snapshot-delete": (
        "A running domain's IO is paused for milliseconds at most, never for the whole "
        "copy. --dry-run prints the plan (what is removed, merged or hidden) and changes "
        "nothing.",
        ["livesnap snapshot-delete vm1 before-upgrade",
         "livesnap snapshot-delete vm1 before-upgrade --dry-run --output json"]),
    "snapshot-revert": (
        "The domain must be shut off. The state being left is discarded unless "
        "--keep-current names a snapshot to keep it as.",
        ["livesnap snapshot-revert vm1 before-upgrade",
         "livesnap snapshot-revert vm1 before-upgrade --keep-current broken"]),
    "snapshot-list": (
        "Hidden snapshots (deleted while they had several children) are shown with --all.",
        ["livesnap snapshot-list vm1", "livesnap snapshot-list vm1 --tree --all",
         "livesnap -c qemu:///system snapshot-list vm1 --output json"]),
    "recover": (
        "After a crash or a kill: continues or rolls back the operation left unfinished, so "
        "that every image is one the catalog knows and the domain can start.",
        ["livesnap recover vm1"]),
    "reclaim": (
        "Normally automatic (after each delete, and by the hook when a domain stops).",
        ["livesnap reclaim vm1", "livesnap reclaim vm1 --dry-run"]),
    "check": (
        "Read-only unless --repair is given; exit 1 when something does not match.",
        ["livesnap check vm1", "livesnap check vm1 --repair"]),
    "install-hooks": (
        "libvirtd finds a new hook when it starts or reloads (systemctl reload libvirtd).",
        ["livesnap install-hooks", "livesnap install-hooks --uninstall"]),
    "install-plugin": (
        "Then call it from a pool-admin session on the VM's host.",
        ["livesnap install-plugin",
         "xe host-call-plugin host-uuid=H plugin=livesnap fn=snapshot_create "
         "args:vm_uuid=V args:name=before-upgrade"]),
    "install-service": (
        "The livesnap program then hands its commands to the service when its socket "
        "exists.",
        ["livesnap install-service",
         "systemctl daemon-reload && systemctl enable --now livesnap.socket"]),
    "xapi-follow": (
        "Runs until stopped (or once with --once), as a systemd service on each XAPI host.",
        ["livesnap xapi-follow --once",
         "livesnap xapi-follow --install-unit /etc/systemd/system"]),
}


class Commands(object):
    """The sub-command list as each ``register`` sees it: ``add_parser`` is argparse's, and
    a command with texts here gets its description (its one-line help from the command
    list, then what to know) and its examples on the parser it makes."""

    def __init__(self, subparsers):
        self.subparsers = subparsers

    def add_parser(self, name, **kwargs):
        texts = TEXTS.get(name)
        if texts is not None:
            more, examples = texts
            first = kwargs.get("help") or ""
            paragraphs = ([first[:1].upper() + first[1:] + "."] if first else []) + [more]
            kwargs.setdefault("description",
                              "\n\n".join(textwrap.fill(t, 78) for t in paragraphs))
            kwargs.setdefault("epilog",
                              "examples:\n" + "\n".join("  " + e for e in examples))
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        return self.subparsers.add_parser(name, **kwargs)
