"""``livesnap xapi-follow``: follow XAPI's events on this host and merge at once what a
snapshot deleted with xe or XenCenter leaves (livesnap/platforms/xapi_follow.py). Runs in
the foreground (a systemd unit: ``livesnap install-xapi-follow``), one JSON line on stdout
per VM it acted on; ``--once`` compares the catalogs with XAPI once and exits.

The follower survives xapi's restarts itself (it logs in again, platforms/xapi_link.py); the
unit restarts it too, without systemd's start limit (``StartLimitIntervalSec=0``; systemd
219 of XenServer/XCP-ng 8 reads ``StartLimitInterval=`` in [Service]), so that a follower
that keeps failing while xapi is away is never left dead for good."""
import os
import sys

from livesnap import statedir
from livesnap.platforms import sm_gc, sm_lock
from livesnap.platforms.xapi import DEFAULT_SR_MOUNT_BASE

UNIT_NAME = "livesnap-xapi-follow.service"
# the longest any XenAPI call of the follower may take (a xapi that hangs is a lost link):
# event.from waits at most 30 s, an SR.scan of a big SR some tens of seconds
CALL_TIMEOUT_S = 300.0
UNIT = """[Unit]
Description=livesnap: merge at once what a snapshot deleted with xe or XenCenter leaves
After=xapi.service
Wants=xapi.service
StartLimitIntervalSec=0

[Service]
Type=simple
Environment=PYTHONPATH={pythonpath}
# livesnap.cli.main, not the livesnap program: a long-running command is never handed
# to the livesnap service (livesnap.cli.client)
ExecStart={python} -m livesnap.cli.main xapi-follow --state-dir {state_dir}
Restart=always
RestartSec=5
StartLimitInterval=0

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
    p.add_argument("--reconcile-interval", metavar="SECONDS", type=float, default=60.0,
                   help="compare every catalog with XAPI at least this often, for what "
                        "events cannot say and what was refused (default: %(default)s)")
    p.add_argument("--call-timeout", metavar="SECONDS", type=float, default=CALL_TIMEOUT_S,
                   help="a XenAPI call unanswered this long lost xapi: log in again "
                        "(default: %(default)s)")
    p.add_argument("--install-unit", metavar="UNIT_DIR",
                   help="write the systemd unit %s into UNIT_DIR and exit" % UNIT_NAME)
    p.set_defaults(func=run)


def unit(state_dir, python=None):
    import livesnap
    return UNIT.format(python=python or sys.executable, state_dir=os.path.abspath(state_dir),
                       pythonpath=os.path.dirname(os.path.dirname(
                           os.path.abspath(livesnap.__file__))))


def run(args):
    import functools
    import socket
    from livesnap.platforms import xapi_follow, xapi_link
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
    from livesnap.engine import gone
    from livesnap.engine.engine import Engine
    from livesnap.platforms.xapi import XapiError, XapiPlatform, connect_local
    for opt, value in (("--reconcile-interval", args.reconcile_interval),
                       ("--call-timeout", args.call_timeout)):
        if not value > 0:
            from livesnap.errors import UsageError
            raise UsageError(reason="%s must be more than 0 s" % opt)
    socket.setdefaulttimeout(args.call_timeout)       # the XenAPI sockets: a hung xapi
    connect = functools.partial(connect_local, args.xapi_socket,
                                originator="livesnap-xapi-follow")
    # --once: xapi there now or an error; the service logs in (again) itself, with a backoff
    session = None
    if args.once:
        try:
            session = connect()
        except Exception as e:                  # XenAPI's failure, or no xapi at all
            raise XapiError("session.login_with_password",
                            getattr(e, "details", None) or "%s: %s" % (e.__class__.__name__, e))
    platform = XapiPlatform(session, sr_mount_base=sr_mount_base, sm_lock_dir=sm_lock_dir,
                            sm_ipc_dir=sm_ipc_dir)
    engine = Engine(state_dir=state_dir, storage_dirs=[sr_mount_base, "/dev"],
                    platform=platform)
    f = xapi_follow.Follower(platform, engine, state_dir,
                             report=xapi_follow.json_report(sys.stdout), connect=connect,
                             reconcile_interval=args.reconcile_interval,
                             forget_if_done=functools.partial(gone.forget_if_done, state_dir))
    if args.once:
        try:
            results = f.reconcile()
        finally:
            xapi_link.logout(platform.session)
        return 1 if any("error" in r for r in results) else 0
    f.run()
    return 0
