"""The snapshot commands, in virsh's words."""
from livesnap.cli import output


def _engine(args):
    from livesnap.engine.engine import Engine
    platform = None
    if getattr(args, "domain_xml", None):
        from livesnap.platforms.xen_domain import XenXmlPlatform
        platform = XenXmlPlatform(args.domain_xml)
    return Engine(connect=args.connect, state_dir=args.state_dir, max_depth=args.max_depth,
                  platform=platform,
                  storage_dirs=args.storage_dir, quiesce=getattr(args, "quiesce", False),
                  quiesce_timeout=getattr(args, "quiesce_timeout", 10.0))


def create(args):
    r = _engine(args).create(args.domain, args.name, args.description or "", args.disk,
                             args.dry_run, skip_unsupported=args.skip_unsupported)
    output.emit(args, r, output.text_create)
    return 0


def delete(args):
    r = _engine(args).delete(args.domain, args.name, args.dry_run)
    output.emit(args, r, output.text_delete)
    return 0


def revert(args):
    r = _engine(args).revert(args.domain, args.name, args.keep_current, args.dry_run)
    output.emit(args, r, output.text_revert)
    return 0


def list_(args):
    r = _engine(args).snapshot_list(args.domain, include_hidden=args.all)
    output.emit(args, r, lambda res: output.text_list(res, tree=args.tree))
    return 0


def recover(args):
    r = _engine(args).recover(args.domain)
    output.emit(args, r, output.text_recover)
    return 0


def reclaim(args):
    r = _engine(args).reclaim(args.domain, args.dry_run)
    output.emit(args, r, lambda res: ["reclaimed: " + (", ".join(res["reclaimed"]) or "nothing")])
    return 0


def check(args):
    r = _engine(args).check(args.domain, repair=args.repair)
    output.emit(args, r, output.text_check)
    return 0 if r["ok"] else 1


DOMAIN_HELP = "domain name, UUID or id (a XAPI VM's name or uuid)"


def register(subparsers, common):
    p = subparsers.add_parser("snapshot-create", parents=[common],
                              help="take a snapshot of a domain's disks")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("name", help="snapshot name")
    p.add_argument("--description", help="free text kept with the snapshot")
    p.add_argument("--disk", action="append", metavar="TARGET",
                   help="only this disk (repeatable; default: every disk, and a domain "
                        "with disks livesnap cannot snapshot is refused)")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="leave out the disks livesnap cannot snapshot (raw, block, network, "
                        "read-only, shareable); the result lists them")
    p.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's file systems through the guest agent while the "
                        "snapshot is taken (running domain with an agent)")
    p.add_argument("--quiesce-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="thaw after this long whatever happens (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=create)

    p = subparsers.add_parser(
        "snapshot-delete", parents=[common],
        help="delete a snapshot: removed if it has no child, merged with its only child, "
             "or hidden (deleted logically) while it has several")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("name", help="snapshot name")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=delete)

    p = subparsers.add_parser("snapshot-revert", parents=[common],
                              help="make a snapshot the domain's current state (domain shut off)")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("name", help="snapshot name")
    p.add_argument("--keep-current", metavar="NEWNAME",
                   help="keep the state being left as snapshot NEWNAME (default: discard it)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=revert)

    p = subparsers.add_parser("snapshot-list", parents=[common], help="list a domain's snapshots")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("--tree", action="store_true", help="show the snapshots as a tree")
    p.add_argument("--all", action="store_true",
                   help="also show hidden (logically deleted) snapshots")
    p.set_defaults(func=list_)

    p = subparsers.add_parser("recover", parents=[common],
                              help="finish an interrupted operation on a domain")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.set_defaults(func=recover)

    p = subparsers.add_parser("reclaim", parents=[common],
                              help="reclaim hidden snapshots that are down to one child")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.set_defaults(func=reclaim)

    p = subparsers.add_parser("check", parents=[common],
                              help="compare the catalog with the images (exit 1 on a mismatch)")
    p.add_argument("domain", help=DOMAIN_HELP)
    p.add_argument("--repair", action="store_true",
                   help="first bring the catalog in step with libvirt's snapshot metadata "
                        "and the images (snapshots made or deleted with virsh), refusing "
                        "what they do not explain")
    p.set_defaults(func=check)
