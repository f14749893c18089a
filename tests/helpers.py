"""Shared test helpers: real libvirtd (qemu:///system), shut-off domains with qcow2 disks in
tmp_path, and a way to run the livesnap CLI and read its JSON."""
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import uuid

URI = "qemu:///system"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISK_MIB = 8


def domain_xml(name, disks, running_kernel=None):
    devs = "".join(
        "<disk type='file' device='disk'><driver name='qemu' type='%s'/>"
        "<source file='%s'/><target dev='%s' bus='virtio'/></disk>" % (fmt, path, target)
        for target, path, fmt in disks)
    return ("<domain type='qemu'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            "<devices>%s</devices></domain>" % (name, devs))


def qemu_img(*args):
    return subprocess.run(["qemu-img"] + [str(a) for a in args], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).stdout


def qemu_io_write(path, pattern, offset, length):
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %d %d" % (pattern, offset, length),
                    path], check=True, stdout=subprocess.DEVNULL)


def chain_digest(path):
    """SHA-256 of what the image reads through its whole backing chain."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True)
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


class Cli(object):
    """The livesnap program run as a separate process against one state directory (through
    the test session's livesnap service unless ``LIVESNAP_SERVICE=off``)."""

    state_dir = None

    def env(self):
        env = dict(os.environ)
        env["LIVESNAP_STATE_DIR"] = self.state_dir
        env["LIBVIRT_DEFAULT_URI"] = URI
        env.pop("LIVESNAP_FAULT", None)
        return env

    def cli(self, *args, env_extra=None, expect=0):
        env = self.env()
        env.update(env_extra or {})
        proc = subprocess.run([sys.executable, "-m", "livesnap"] + [str(a) for a in args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=ROOT)
        if expect is not None:
            assert proc.returncode == expect, (args, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args, **kw):
        """The command's JSON. Run in this process (the same ``main()``, the same exit-code
        and output contract) unless it must be a process of its own (fault injection)."""
        env_extra = kw.get("env_extra") or {}
        if "LIVESNAP_FAULT" in env_extra:
            proc = self.cli(*(args + ("--output", "json")), **kw)
        else:
            proc = self.inproc(*(args + ("--output", "json")), **kw)
        return json.loads(proc.stdout)

    def inproc(self, *args, env_extra=None, expect=0):
        """``livesnap`` run by calling its ``main()`` here: saves an interpreter start and the
        libvirt import per command in tests that run hundreds of them."""
        import contextlib
        import io
        from livesnap.cli import main as cli_main
        env = dict(self.env(), **(env_extra or {}))
        saved = dict(os.environ)
        out, err = io.StringIO(), io.StringIO()
        os.environ.clear()
        os.environ.update(env)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = cli_main.main([str(a) for a in args])
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 2
        finally:
            os.environ.clear()
            os.environ.update(saved)
        proc = subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())
        if expect is not None:
            assert rc == expect, (args, rc, proc.stdout, proc.stderr)
        return proc


class Dom(Cli):
    """A shut-off domain with qcow2 disks, and the livesnap CLI pointed at it."""

    def __init__(self, conn, tmp_path, ndisks=2, base=True):
        self.conn = conn
        self.dir = str(tmp_path / "images")
        os.makedirs(self.dir)
        self.state_dir = str(tmp_path / "state")
        self.name = "lst-" + uuid.uuid4().hex[:8]
        self.targets = ["vd" + chr(ord("a") + i) for i in range(ndisks)]
        disks = []
        for t in self.targets:
            path = os.path.join(self.dir, "%s.qcow2" % t)
            if base:
                b = os.path.join(self.dir, "%s-base.qcow2" % t)
                qemu_img("create", "-q", "-f", "qcow2", b, "%dM" % DISK_MIB)
                qemu_io_write(b, 0xB0 + len(disks), 0, 64 * 1024)
                qemu_img("create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", path)
            else:
                qemu_img("create", "-q", "-f", "qcow2", path, "%dM" % DISK_MIB)
            disks.append((t, path, "qcow2"))
        self.dom = conn.defineXML(domain_xml(self.name, disks))

    def sources(self):
        from lxml import etree
        root = etree.fromstring(self.dom.XMLDesc(0))
        return {d.find("target").get("dev"): d.find("source").get("file")
                for d in root.findall("./devices/disk")}

    def write(self, target, pattern, offset, length=64 * 1024):
        qemu_io_write(self.sources()[target], pattern, offset, length)

    def digests(self):
        return {t: chain_digest(p) for t, p in self.sources().items()}

    def files(self):
        return sorted(f for f in os.listdir(self.dir))

    def fingerprint(self):
        """Everything an operation could change: image files and their bytes, the domain's
        definition, the catalog's tree."""
        files = {}
        for f in self.files():
            with open(os.path.join(self.dir, f), "rb") as fh:
                files[f] = hashlib.sha256(fh.read()).hexdigest()
        catalog = {}
        if os.path.isdir(self.state_dir):
            for f in sorted(os.listdir(self.state_dir)):
                if f.endswith(".db"):
                    db = sqlite3.connect(os.path.join(self.state_dir, f))
                    # the rows (a new empty catalog holds none; meta only names the schema)
                    catalog[f] = [line for line in db.iterdump()
                                  if line.startswith("INSERT") and '"meta"' not in line]
                    catalog = {k: v for k, v in catalog.items() if v}
                    db.close()
        return {"files": files, "xml": self.dom.XMLDesc(2), "catalog": catalog}

    def destroy(self):
        try:
            if self.dom.isActive():
                self.dom.destroy()
            # with libvirt's snapshot and checkpoint metadata (a plain undefine refuses and
            # leaves the domain defined)
            import libvirt
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                                   | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        except Exception:
            pass


class LockHolder(object):
    """Another process holding a POSIX write lock (``lockf``) on ``path``, as SM holds its
    locks; ``release()`` lets go. A ``lockf`` lock conflicts only with other processes, so it
    is taken in a child."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, os, sys; "
             "fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); "
             "print('held', flush=True); sys.stdin.read()", path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)
        assert self.proc.stdout.readline().strip() == "held"

    def release(self):
        self.proc.stdin.close()
        self.proc.wait(10)

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)


def listdir_images(directory):
    """The names in ``directory`` but livesnap's trash (``.<name>.livesnap-free``: images
    merged away on a running domain, freed by a detached process after the command)."""
    from livesnap.datapaths.trash import SUFFIX
    return [n for n in os.listdir(directory) if not (n.startswith(".") and n.endswith(SUFFIX))]
