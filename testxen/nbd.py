"""A minimal NBD client (fixed newstyle handshake, NBD_OPT_EXPORT_NAME; READ, WRITE, DISC):
what the test's guest and the chain reader use to do IO through the real tapdisk's NBD server
(``/run/blktap-control/nbd<pid>.<minor>``, blktap drivers/tapdisk-nbdserver.c). Test code
only; QEMU's NBD client speaks the same protocol (``qemu-io -f raw nbd+unix:///?socket=...``)."""
import socket
import struct

NBDMAGIC = 0x4e42444d41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME = 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2
REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")


class NbdError(OSError):
    pass


class Client(object):
    def __init__(self, sock_path, timeout=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(sock_path)
        self.handle = 0
        try:
            self._handshake()
        except Exception:
            self.sock.close()
            raise

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def _handshake(self):
        magic, opt, gflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise NbdError("not a newstyle NBD server (%#x %#x)" % (magic, opt))
        cflags = FLAG_FIXED_NEWSTYLE | (gflags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", cflags))
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, 0))
        self.size, self.flags = struct.unpack(">QH", self._recv(10))
        if not gflags & FLAG_NO_ZEROES:
            self._recv(124)

    def _request(self, cmd, offset, length, data=b""):
        self.handle += 1
        self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, cmd, self.handle, offset, length)
                          + data)
        magic, error, handle = REPLY.unpack(self._recv(REPLY.size))
        if magic != REPLY_MAGIC or handle != self.handle:
            raise NbdError("bad NBD reply (magic %#x handle %d)" % (magic, handle))
        if error:
            raise NbdError(error, "NBD request %d at %d+%d failed" % (cmd, offset, length))

    def read(self, offset, length):
        self._request(CMD_READ, offset, length)
        return self._recv(length)

    def write(self, offset, data):
        self._request(CMD_WRITE, offset, len(data), bytes(data))

    def close(self):
        try:
            self.sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
