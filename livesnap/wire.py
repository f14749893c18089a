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


def encode_request(argv, cwd, environ, code=None):
    """NUL-separated fields (none of them can hold a NUL): magic, the caller's livesnap
    (``code_dir()``), cwd, argc, argv, env."""
    code = code_dir() if code is None else code
    fields = [MAGIC, os.fsencode(code), os.fsencode(cwd), str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    return framed(b"\0".join(fields))


def framed(body):
    """A request body as it travels on a socket: its length, a newline, the body (what
    ``livesnap.service`` reads back)."""
    return str(len(body)).encode() + b"\n" + body


def decode_request(data):
    """(argv, cwd, environ, code) from ``encode_request``'s body; ValueError when
    malformed."""
    fields = data.split(b"\0")
    if fields[0] != MAGIC or len(fields) < 4:
        raise ValueError("not a livesnap request")
    code = os.fsdecode(fields[1])
    cwd = os.fsdecode(fields[2])
    argc = int(fields[3])
    argv = [os.fsdecode(a) for a in fields[4:4 + argc]]
    if len(argv) != argc:
        raise ValueError("truncated request")
    environ = {}
    for kv in fields[4 + argc:]:
        k, sep, v = kv.partition(b"=")
        if sep:
            environ[os.fsdecode(k)] = os.fsdecode(v)
    return argv, cwd, environ, code
