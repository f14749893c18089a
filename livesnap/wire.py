"""The livesnap service's wire format: where its socket is, and a request as the
``livesnap`` program sends it and the service reads it back.

Imported by the program's first modules (``livesnap.launcher``, ``livesnap.cli.client``) in
every command, so it imports only built-in modules (``os``), like them; the service
imports it too, and nothing of the client.
"""
import os

DEFAULT_SOCKET = "/run/livesnap/livesnap.sock"
MAGIC = b"livesnap-2"


def code_dir():
    """The directory of the livesnap package this process runs (the caller's PYTHONPATH
    and working directory choose it): a service running another one's code steps aside."""
    return os.path.realpath(os.path.dirname(os.path.abspath(__file__)))


def socket_path(environ=None):
    """The service's socket, or None when the service is not to be used."""
    env = os.environ if environ is None else environ
    value = env.get("LIVESNAP_SERVICE", "")
    if value == "off":
        return None
    return value or DEFAULT_SOCKET


def current_umask():
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def encode_request(argv, cwd, environ, code=None, umask=None):
    """NUL-separated fields (none of them can hold a NUL): magic, the caller's livesnap
    (``code_dir()``), its umask (octal), cwd, argc, argv, env."""
    code = code_dir() if code is None else code
    umask = current_umask() if umask is None else umask
    fields = [MAGIC, os.fsencode(code), b"%o" % umask, os.fsencode(cwd),
              str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    return framed(b"\0".join(fields))


def framed(body):
    """A request body as it travels on a socket: its length, a newline, the body (what
    ``livesnap.service`` reads back)."""
    return str(len(body)).encode() + b"\n" + body


def decode_request(data):
    """(argv, cwd, environ, code, umask) from ``encode_request``'s body; ValueError when
    malformed."""
    fields = data.split(b"\0")
    if fields[0] != MAGIC or len(fields) < 5:
        raise ValueError("not a livesnap request")
    code = os.fsdecode(fields[1])
    umask = int(fields[2], 8)
    if not 0 <= umask <= 0o777:
        raise ValueError("not a umask")
    cwd = os.fsdecode(fields[3])
    argc = int(fields[4])
    argv = [os.fsdecode(a) for a in fields[5:5 + argc]]
    if len(argv) != argc:
        raise ValueError("truncated request")
    environ = {}
    for kv in fields[5 + argc:]:
        k, sep, v = kv.partition(b"=")
        if sep:
            environ[os.fsdecode(k)] = os.fsdecode(v)
    return argv, cwd, environ, code, umask
