"""``livesnap install-plugin``: install (or remove) the XAPI host plugin
``/etc/xapi.d/plugins/livesnap`` (mode 0755, written atomically).

The installed file is ``xapi_plugin/livesnap`` with one value baked in: the directory this
livesnap package is imported from, so that the plugin finds the same livesnap when xapi runs it
(its shebang stays dom0's ``/usr/bin/python3``, the Python that has XenAPI).
"""
import os
import sys

from livesnap.cli import install_files, output
from livesnap.errors import Error

PLUGIN_NAME = "livesnap"
MARKER = "# livesnap-install: "
DEFAULT_PLUGINS_DIR = "/etc/xapi.d/plugins"


class PluginInstallError(Error):
    fields = ("path", "reason")
    msg = "cannot install the XAPI plugin at {self.path}: {self.reason}"


def package_dir():
    import livesnap
    return os.path.dirname(os.path.dirname(os.path.abspath(livesnap.__file__)))


def plugin_source_path():
    """``xapi_plugin/livesnap`` beside the package (source tree), inside it, or where
    setup.py's data_files put it (``<prefix>/share/livesnap/xapi_plugin/livesnap``)."""
    import livesnap
    here = os.path.dirname(os.path.abspath(livesnap.__file__))
    for p in (os.path.join(os.path.dirname(here), "xapi_plugin", PLUGIN_NAME),
              os.path.join(here, "xapi_plugin", PLUGIN_NAME),
              os.path.join(sys.prefix, "share", "livesnap", "xapi_plugin", PLUGIN_NAME)):
        if os.path.isfile(p):
            return p
    raise PluginInstallError("xapi_plugin/" + PLUGIN_NAME, "the plugin source is not beside "
                                                           "the livesnap package")


def render(source, livesnap_path):
    lines = source.splitlines(True)
    if not lines or not lines[0].startswith("#!"):
        raise PluginInstallError(PLUGIN_NAME, "the plugin source has no shebang line")
    for i, line in enumerate(lines):
        if MARKER in line and line.split(MARKER, 1)[1].strip() == "LIVESNAP_PATH":
            lines[i] = "LIVESNAP_PATH = %r  %sLIVESNAP_PATH\n" % (livesnap_path, MARKER)
            return "".join(lines)
    raise PluginInstallError(PLUGIN_NAME, "the plugin source has no LIVESNAP_PATH marker line")


def install(plugins_dir):
    src = plugin_source_path()
    with open(src) as f:
        text = render(f.read(), package_dir())
    target = os.path.join(plugins_dir, PLUGIN_NAME)
    try:
        install_files.install_executable(plugins_dir, PLUGIN_NAME, text)
    except OSError as e:
        raise PluginInstallError(target, e.strerror or str(e))
    return {"installed": target, "livesnap_path": package_dir(), "source": src}


def uninstall(plugins_dir):
    target = os.path.join(plugins_dir, PLUGIN_NAME)
    try:
        removed = install_files.remove(target)
    except OSError as e:
        raise PluginInstallError(target, e.strerror or str(e))
    return {"removed": target if removed else None, "path": target}


def _text(r):
    if "installed" in r:
        return ["installed %s (livesnap from %s); call it with: xe host-call-plugin "
                "host-uuid=<host> plugin=%s fn=snapshot_list args:vm_uuid=<vm>"
                % (r["installed"], r["livesnap_path"], PLUGIN_NAME)]
    if r["removed"]:
        return ["removed %s" % r["removed"]]
    return ["%s was not installed" % r["path"]]


def run(args):
    if args.uninstall:
        r = uninstall(args.plugins_dir)
    else:
        r = install(args.plugins_dir)
    output.emit(args, r, _text)
    return 0


def register(subparsers, common):
    p = subparsers.add_parser(
        "install-plugin", parents=[common],
        help="install the XAPI host plugin (xe host-call-plugin plugin=%s fn=snapshot_create "
             "...)" % PLUGIN_NAME)
    p.add_argument("--plugins-dir", default=DEFAULT_PLUGINS_DIR,
                   help="xapi's plugin directory (default: %(default)s)")
    p.add_argument("--uninstall", action="store_true", help="remove the plugin")
    p.set_defaults(func=run)
