"""``livesnap install-service``: systemd units that start the livesnap service on demand.

``livesnap.socket`` listens on the service's socket (0600, in a 0700 directory) and starts
``livesnap.service`` (``livesnap service``, handed the socket: socket activation) when the
first command connects. Then ``systemctl enable --now livesnap.socket``.
"""
import os
import sys

from livesnap.cli import install_files, output
from livesnap.cli.install import InstallError, chosen_state_dir
from livesnap.wire import DEFAULT_SOCKET

SOCKET_UNIT = """[Unit]
Description=livesnap service socket (online VM disk snapshots)

[Socket]
ListenStream={socket}
SocketMode=0600
DirectoryMode=0700

[Install]
WantedBy=sockets.target
"""

SERVICE_UNIT = """[Unit]
Description=livesnap service (runs livesnap commands without a start-up per command)
Requires=livesnap.socket
After=libvirtd.service

[Service]
Type=simple
Environment=PYTHONPATH={pythonpath}
Environment=LIVESNAP_STATE_DIR={state_dir}
ExecStart={python} -m livesnap service
Restart=on-failure
# stopping or restarting the service leaves running commands to finish
KillMode=process
"""

UNITS = ("livesnap.socket", "livesnap.service")


def units(socket_path, state_dir, python=None):
    import livesnap
    values = {"socket": socket_path, "state_dir": os.path.abspath(state_dir),
              "python": python or sys.executable,
              "pythonpath": os.path.dirname(os.path.dirname(os.path.abspath(livesnap.__file__)))}
    return {"livesnap.socket": SOCKET_UNIT.format(**values),
            "livesnap.service": SERVICE_UNIT.format(**values)}


def install(unit_dir, socket_path, state_dir, python=None):
    written = []
    for name, text in sorted(units(socket_path, state_dir, python).items()):
        try:
            written.append(install_files.install_executable(unit_dir, name, text, mode=0o644))
        except OSError as e:
            raise InstallError(os.path.join(unit_dir, name), e.strerror or str(e))
    return {"installed": written, "socket": socket_path,
            "next": "systemctl daemon-reload && systemctl enable --now livesnap.socket"}


def uninstall(unit_dir):
    removed = []
    for name in UNITS:
        path = os.path.join(unit_dir, name)
        try:
            if install_files.remove(path):
                removed.append(path)
        except OSError as e:
            raise InstallError(path, e.strerror or str(e))
    return {"removed": removed,
            "next": "systemctl disable --now livesnap.socket livesnap.service; "
                    "systemctl daemon-reload" if removed else None}


def _text(r):
    if "installed" in r:
        return ["installed %s" % p for p in r["installed"]] + [
            "the livesnap program uses the service at %s once it listens: %s"
            % (r["socket"], r["next"])]
    if r["removed"]:
        return ["removed %s" % p for p in r["removed"]] + [r["next"]]
    return ["no livesnap units were installed"]


def run(args):
    if args.uninstall:
        r = uninstall(args.unit_dir)
    else:
        r = install(args.unit_dir, args.socket, chosen_state_dir(args))
    output.emit(args, r, _text)
    return 0


def register(subparsers, common):
    p = subparsers.add_parser(
        "install-service", parents=[common],
        help="install systemd units that start the livesnap service on demand (socket "
             "activation)")
    p.add_argument("--unit-dir", default="/etc/systemd/system",
                   help="where the units go (default: %(default)s)")
    p.add_argument("--socket", default=DEFAULT_SOCKET,
                   help="the service's socket (default: %(default)s)")
    p.add_argument("--uninstall", action="store_true", help="remove the units")
    p.set_defaults(func=run)
