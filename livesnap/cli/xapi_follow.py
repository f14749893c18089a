"""``livesnap xapi-follow``: follow XAPI's events on this host and merge at once what a
snapshot deleted with xe or XenCenter leaves (livesnap/platforms/xapi_follow.py). Runs in
the foreground (a systemd unit: ``livesnap install-xapi-follow``), one JSON line on stdout
per VM it acted on; ``--once`` compares the catalogs with XAPI once and exits."""
import os
import sys

from livesnap import statedir
from livesnap.platforms import sm_gc, sm_lock
from livesnap.platforms.xapi import DEFAULT_SR_MOUNT_BASE

UNIT_NAME = "livesnap-xapi-follow.service"
UNIT = """[Unit]
Description=livesnap: merge at once what a snapshot deleted with xe or XenCenter leaves
After=xapi.service
Wants=xapi.service

[Service]
Type=simple
Environment=PYTHONPATH={pythonpath}
# livesnap.cli.main, not the livesnap program: a long-running command is never handed
# to the livesnap service (livesnap.cli.client)
ExecStart={python} -m livesnap.cli.main xapi-follow --state-dir {state_dir}
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def register(subparsers, common):
    p = subparsers.add_parser(
        "xapi-follow", parents=[common],
        help="on a XAPI host: follow XAPI's events and merge at once what a snapshot deleted "
             "with xe or XenCenter leaves")
    p.add_argument("--once", action="store_true",
                   help="compare the catalogs with XAPI once, act, and exit")
    p.add_argument("--xapi-socket", metavar="PATH",
                   help="xapi's local socket (default: XenAPI's, /var/lib/xcp/xapi)")
    # defaults resolved when the command runs, from its caller's environment (the
    # livesnap service builds this parser once for all callers: livesnap/statedir.py)
    p.add_argument("--sr-mount-base", help="where file SRs are mounted (default: "
                   "$LIVESNAP_SR_MOUNT_BASE or %s)" % DEFAULT_SR_MOUNT_BASE)
    p.add_argument("--sm-lock-dir", help="SM's lock directory (default: $LIVESNAP_SM_LOCK_DIR "
                   "or %s)" % sm_lock.BASE_DIR)
    p.add_argument("--sm-ipc-dir", help="SM's IPC flag directory (default: "
                   "$LIVESNAP_SM_IPC_DIR or %s)" % sm_gc.IPC_BASE_DIR)
    p.add_argument("--install-unit", metavar="UNIT_DIR",
                   help="write the systemd unit %s into UNIT_DIR and exit" % UNIT_NAME)
    p.set_defaults(func=run)


def unit(state_dir, python=None):
    import livesnap
    return UNIT.format(python=python or sys.executable, state_dir=os.path.abspath(state_dir),
                       pythonpath=os.path.dirname(os.path.dirname(
                           os.path.abspath(livesnap.__file__))))


def run(args):
    from livesnap.platforms import xapi_follow
    state_dir = statedir.resolve(args.state_dir)
    if args.install_unit:
        from livesnap.cli import install_files
        path = install_files.install_executable(args.install_unit, UNIT_NAME, unit(state_dir),
                                                mode=0o644)
        sys.stdout.write("installed %s; start it with: systemctl enable --now %s\n"
                         % (path, UNIT_NAME))
        return 0
    env = os.environ
    sr_mount_base = args.sr_mount_base or env.get("LIVESNAP_SR_MOUNT_BASE") or \
        DEFAULT_SR_MOUNT_BASE
    sm_lock_dir = args.sm_lock_dir or env.get("LIVESNAP_SM_LOCK_DIR") or sm_lock.BASE_DIR
    # the LVHD datapath takes SM's per-object refcount locks there too (sm_refcount.lock_dir;
    # this is the command's own process: the service forks one per command)
    env["LIVESNAP_SM_LOCK_DIR"] = sm_lock_dir
    sm_ipc_dir = args.sm_ipc_dir or env.get("LIVESNAP_SM_IPC_DIR") or sm_gc.IPC_BASE_DIR
    from livesnap.engine.engine import Engine
    from livesnap.platforms.xapi import XapiPlatform, connect_local
    session = connect_local(args.xapi_socket, originator="livesnap-xapi-follow")
    try:
        platform = XapiPlatform(session, sr_mount_base=sr_mount_base, sm_lock_dir=sm_lock_dir,
                                sm_ipc_dir=sm_ipc_dir)
        engine = Engine(state_dir=state_dir, storage_dirs=[sr_mount_base, "/dev"],
                        platform=platform)
        f = xapi_follow.Follower(platform, engine, state_dir,
                                 report=xapi_follow.json_report(sys.stdout))
        if args.once:
            results = f.reconcile()
            return 1 if any("error" in r for r in results) else 0
        f.run()
        return 0
    finally:
        try:
            session.xenapi.session.logout()
        except Exception:
            pass
