"""``livesnap``: parse, configure logging, run one command, map errors to exit codes."""
import argparse
import logging
import os
import sys
import threading

import livesnap
from livesnap import argv as order
from livesnap.errors import Error, Interrupted, UsageError

log = logging.getLogger("livesnap")

EPILOG = """examples:
  livesnap snapshot-create vm1 before-upgrade --description "kernel 6.1"
  livesnap snapshot-list vm1 --tree --all
  livesnap snapshot-delete vm1 before-upgrade --output json
  livesnap snapshot-revert vm1 before-upgrade --keep-current broken
  livesnap recover vm1
"""


def common_options():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--connect", metavar="URI",
                        help="libvirt URI (default: libvirt's default URI)")
    common.add_argument("--domain-xml", metavar="FILE",
                        help="a Xen domain described by this libvirt domain XML file (disks: "
                             "VHD files served by tapdisk) instead of a libvirt connection")
    common.add_argument("--output", choices=("text", "json"), default="text",
                        help="output format (default: %(default)s)")
    common.add_argument("--json", dest="output", action="store_const", const="json",
                        help="same as --output json")
    # no default from the environment here: the service builds this parser once for all
    # its callers; the command resolves it from its caller's (livesnap.statedir.resolve)
    common.add_argument("--state-dir", default=None,
                        help="catalog directory (default: $LIVESNAP_STATE_DIR or /var/lib/livesnap)")
    common.add_argument("--storage-dir", action="append", metavar="DIR",
                        help="refuse images outside these directories (repeatable)")
    common.add_argument("--max-depth", type=chain_depth, default=30,
                        help="longest backing chain allowed (default: %(default)s)")
    common.add_argument("-d", "--debug", action="store_true", help="log everything to stderr")
    common.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    return common


VHD_HELP = "VHD tool compatible with vhd-util"
SERVICE_HELP = ("run resident, serving livesnap commands without the interpreter's start-up "
                "per command (the livesnap program uses it when its socket exists)")

# the reader of the output went away (``livesnap ... | head``): the command ends quietly
# with the status of a program killed by SIGPIPE (128 + 13), as command-line tools do
EXIT_READER_GONE = 141


def chain_depth(text):
    """``--max-depth``: a whole number of at least 1 (a chain holds its base at least)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1, not %r" % text)
    return value


def _command(argv):
    """The sub-command named in ``argv`` (the first word that is not an option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv=None):
    """The whole parser; with ``argv`` naming another command than ``vhd``, the ``vhd``
    sub-commands are left out (a placeholder keeps ``vhd`` among the choices), so that
    the snapshot commands do not import the VHD engine."""
    parser = argparse.ArgumentParser(
        prog="livesnap", description="Online snapshots of VM disks, deleted child-aware.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="livesnap " + livesnap.__version__)
    from livesnap.cli import help_text
    sub = help_text.Commands(parser.add_subparsers(dest="command", metavar="COMMAND"))
    common = common_options()
    from livesnap.cli import install, install_plugin, install_service, snapshot
    snapshot.register(sub, common)
    install.register(sub, common)
    install_plugin.register(sub, common)
    # listed here; started by livesnap.launcher, with livesnap.service's own parser
    sub.add_parser("service", help=SERVICE_HELP, add_help=False)
    install_service.register(sub, common)
    from livesnap.cli import xapi_follow
    xapi_follow.register(sub, common)
    if argv is not None and _command(argv) not in (None, "vhd"):
        sub.add_parser("vhd", help=VHD_HELP)
    else:
        from livesnap.vhd import cli as vhd_cli
        vhd_cli.register(sub)
    return parser


class _PrintableFormatter(logging.Formatter):
    """A log line never carries a raw control character (a name from libvirt or an older
    catalog); a traceback under --debug keeps its lines."""

    def formatMessage(self, record):
        from livesnap.text import printable
        return printable(super(_PrintableFormatter, self).formatMessage(record))

    def formatException(self, exc_info):
        from livesnap.text import printable
        text = super(_PrintableFormatter, self).formatException(exc_info)
        return "\n".join(printable(line) for line in text.split("\n"))


def setup_logging(args):
    level = logging.WARNING
    if getattr(args, "debug", False):
        level = logging.DEBUG
    elif getattr(args, "quiet", False):
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    log.debug("livesnap %s argv=%s", livesnap.__version__, sys.argv)


def main(argv=None, parser=None):
    """Run one command; ``parser``: one ``build_parser()`` made before (the service's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if parser is None:              # the command table's own parser (not the service's):
        argv = order.reorder(argv)  # virsh's order too (the launcher reorders as well)
    parser = parser or build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:                        # --help | head
        return reader_gone()
    except SystemExit as e:                        # --help, --version, a usage error: done,
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)  # finish() flushes
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    setup_logging(args)
    try:
        return args.func(args)
    except BrokenPipeError:
        if not _stdout_broken():
            raise
        return reader_gone()
    except Error as e:
        if getattr(args, "debug", False):
            log.exception("command failed")
        from livesnap.text import printable
        sys.stderr.write("error: %s\n" % printable(e))     # one line, no raw controls
        if isinstance(e, Interrupted):
            return 128 + e.signo
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130


def _stdout_broken():
    """Whether standard output is a pipe or socket whose reader has gone."""
    import select
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def reader_gone():
    """The output's reader has gone: what is still buffered goes to /dev/null (no second
    BrokenPipeError at exit), and the command ends quietly with ``EXIT_READER_GONE``."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_READER_GONE


def finish(rc):
    """What a normal exit does before the process ends: threads that are not daemons are
    waited for, logging and the standard streams flushed. Returns the exit status."""
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        rc = rc or reader_gone()
    except ValueError:
        rc = rc or 1
    try:
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):
        pass
    return rc if isinstance(rc, int) else 1


def run():
    """The ``livesnap`` command run in this process: ``main()``, then exit without tearing
    the interpreter down (the libvirt connection, module objects): the work is done and
    written out, and a command's wall time should not grow by the interpreter's cleanup.
    (``livesnap.cli.client.run`` hands the command to the livesnap service first.)"""
    os._exit(finish(main()))


if __name__ == "__main__":
    run()
