"""``livesnap install-hooks``: install (or remove) the libvirt qemu hook.

The installed file is a self-contained copy of ``livesnap/hook.py`` (Python 3.6, stdlib
only) with the values libvirtd's minimal environment cannot give it baked in: the state
directory, this Python interpreter (shebang, and the one that runs ``livesnap reclaim``),
the directory livesnap is imported from, and the libvirt URI.
"""
import os
import sys

from livesnap import statedir
from livesnap.cli import install_files, output
from livesnap.errors import Error

HOOK_NAME = "livesnap"
MARKER = "# livesnap-install: "
DEFAULT_STATE_DIR = statedir.DEFAULT_STATE_DIR
DEFAULT_URI = "qemu:///system"


class InstallError(Error):
    fields = ("path", "reason")
    msg = "cannot install the hook at {self.path}: {self.reason}"


def hook_source():
    import livesnap.hook
    path = os.path.splitext(livesnap.hook.__file__)[0] + ".py"
    with open(path) as f:
        return f.read()


def render(source, values, python):
    """The hook's source with ``values`` baked into the marked lines and ``python`` in the
    shebang."""
    lines = source.splitlines(True)
    if not lines[0].startswith("#!"):
        raise InstallError("livesnap/hook.py", "it has no shebang line")
    lines[0] = "#!%s\n" % python
    baked = set()
    for i, line in enumerate(lines):
        if MARKER in line:
            name = line.split(MARKER, 1)[1].strip()
            if name in values:
                lines[i] = "%s = %r  %s%s\n" % (name, values[name], MARKER, name)
                baked.add(name)
    missing = set(values) - baked
    if missing:
        raise InstallError("livesnap/hook.py", "no marker line for %s" % ", ".join(sorted(missing)))
    return "".join(lines)


def _has_hooks(hooks_dir):
    """Whether libvirtd already runs qemu hooks (it looks for them only when it starts)."""
    main = os.path.join(hooks_dir, "qemu")
    if os.path.isfile(main) and os.access(main, os.X_OK):
        return True
    d = os.path.join(hooks_dir, "qemu.d")
    if not os.path.isdir(d):
        return False
    for entry in os.listdir(d):
        p = os.path.join(d, entry)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return True
    return False


def install(hooks_dir, state_dir, uri=None, python=None):
    python = python or sys.executable
    import livesnap
    values = {
        "STATE_DIR": os.path.abspath(state_dir),
        "PYTHON": python,
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(livesnap.__file__))),
        "URI": uri or DEFAULT_URI,
    }
    text = render(hook_source(), values, python)
    target_dir = os.path.join(hooks_dir, "qemu.d")
    target = os.path.join(target_dir, HOOK_NAME)
    restart = not _has_hooks(hooks_dir)
    try:
        install_files.install_executable(target_dir, HOOK_NAME, text)
    except OSError as e:
        raise InstallError(target, e.strerror or str(e))
    result = {"installed": target, "state_dir": values["STATE_DIR"], "python": python,
              "uri": values["URI"], "restart_libvirtd": restart}
    return result


def uninstall(hooks_dir):
    target = os.path.join(hooks_dir, "qemu.d", HOOK_NAME)
    try:
        removed = install_files.remove(target)
    except OSError as e:
        raise InstallError(target, e.strerror or str(e))
    return {"removed": target if removed else None, "path": target}


def _text(r):
    if "installed" in r:
        lines = ["installed %s (state dir %s, python %s, %s)"
                 % (r["installed"], r["state_dir"], r["python"], r["uri"])]
        if r["restart_libvirtd"]:
            lines.append("this is the first qemu hook: reload or restart libvirtd so that it "
                         "finds it (it looks for hooks when it starts and on SIGHUP: "
                         "'systemctl reload libvirtd' or 'kill -HUP $(pidof libvirtd)')")
        return lines
    if r["removed"]:
        return ["removed %s" % r["removed"]]
    return ["%s was not installed" % r["path"]]


def chosen_state_dir(args):
    """The state directory an installed file is given: --state-dir, $LIVESNAP_STATE_DIR,
    or the default."""
    return statedir.resolve(args.state_dir)


def run(args):
    if args.uninstall:
        r = uninstall(args.hooks_dir)
    else:
        r = install(args.hooks_dir, chosen_state_dir(args), args.connect)
    output.emit(args, r, _text)
    return 0


def register(subparsers, common):
    p = subparsers.add_parser(
        "install-hooks", parents=[common],
        help="install the libvirt qemu hook (refuses to start a domain with an interrupted "
             "operation, reclaims hidden snapshots after a domain stops)")
    p.add_argument("--hooks-dir", default="/etc/libvirt/hooks",
                   help="libvirt's hook directory; the hook goes to HOOKS_DIR/qemu.d/%s "
                        "(default: %%(default)s)" % HOOK_NAME)
    p.add_argument("--uninstall", action="store_true", help="remove the hook")
    p.set_defaults(func=run)
