"""The one command runner: argv in, stdout out, ``CommandFailed`` on a non-zero exit."""
import logging
import os
import subprocess

from livesnap.errors import CommandFailed, CommandNotFound

log = logging.getLogger(__name__)


def binary(env_name, default):
    """The binary for a tool, overridable by an environment variable (QEMU_IMG, VHD_UTIL, ...)."""
    return os.environ.get(env_name) or default


def run_rc(argv, input=None, env=None, timeout=None):
    """Run ``argv`` (no shell); return ``(rc, stdout, stderr)`` whatever the exit code.

    A binary that cannot be started raises ``CommandNotFound`` (it has no exit status); a
    timeout kills the command and gives rc -9.
    """
    argv = [str(a) for a in argv]
    log.debug("running %s", argv)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=env,
                                # file names are bytes: ones that do not decode survive as
                                # os.fsdecode would give them, not as a UnicodeDecodeError
                                errors="surrogateescape")
    except OSError as e:
        raise CommandNotFound(argv, e.strerror or str(e))
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return -9, out, "timed out after %ss. %s" % (timeout, err)
    return proc.returncode, out, err


def run(argv, input=None, ok_codes=(0,), env=None, timeout=None):
    """Run ``argv`` and return its stdout; an exit code outside ``ok_codes`` raises
    ``CommandFailed`` carrying the command, its exit code, stdout and stderr."""
    rc, out, err = run_rc(argv, input=input, env=env, timeout=timeout)
    if rc not in ok_codes:
        raise CommandFailed([str(a) for a in argv], rc, out, err)
    return out
