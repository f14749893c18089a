"""The livesnap service's wire format: where its socket is, and a request as the
``livesnap`` program sends it and the service reads it back.

Imported by the program's first modules (``livesnap.launcher``, ``livesnap.cli.client``) in
every command, so it imports only built-in modules (``os``), like them; the service
imports it too, and nothing of the client.
"""
import os

DEFAULT_SOCKET = "/run/livesnap/livesnap.sock"
MAGIC = b"livesnap-1"


def socket_path(environ=None):
    """The service's socket, or None when the service is not to be used."""
    env = os.environ if environ is None else environ
    value = env.get("LIVESNAP_SERVICE", "")
    if value == "off":
        return None
    return value or DEFAULT_SOCKET


def encode_request(argv, cwd, environ):
    """NUL-separated fields (none of them can hold a NUL): magic, cwd, argc, argv, env."""
    fields = [MAGIC, os.fsencode(cwd), str(len(argv)).encode()]
    fields += [os.fsencode(a) for a in argv]
    fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in environ.items()]
    return framed(b"\0".join(fields))


def framed(body):
    """A request body as it travels on a socket: its length, a newline, the body (what
    ``livesnap.service`` reads back)."""
    return str(len(body)).encode() + b"\n" + body


def decode_request(data):
    """(argv, cwd, environ) from ``encode_request``'s body; ValueError when malformed."""
    fields = data.split(b"\0")
    if fields[0] != MAGIC or len(fields) < 3:
        raise ValueError("not a livesnap request")
    cwd = os.fsdecode(fields[1])
    argc = int(fields[2])
    argv = [os.fsdecode(a) for a in fields[3:3 + argc]]
    if len(argv) != argc:
        raise ValueError("truncated request")
    environ = {}
    for kv in fields[3 + argc:]:
        k, sep, v = kv.partition(b"=")
        if sep:
            environ[os.fsdecode(k)] = os.fsdecode(v)
    return argv, cwd, environ
