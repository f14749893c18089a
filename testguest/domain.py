"""The writer guest as a libvirt domain, and a host thread that reads its serial console.

Clocks: every ACK carries the guest's CLOCK_MONOTONIC (ns, from /proc/timer_list, taken right
after dd returned) and the host's time.monotonic() at the moment the console bytes arrived on
the host's unix socket. Gaps are computed on the guest clock by default (what the guest saw,
unaffected by host thread scheduling); windows (since/until) are host time.monotonic() values,
so a benchmark can bracket an operation with time.monotonic() on the host.
"""

import collections
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from xml.sax.saxutils import escape, quoteattr

from . import records
from .build import ensure_guest

DEFAULT_URI = "qemu:///system"
RUN_DIR = "/run/livesnap-testguest"

Ack = collections.namedtuple("Ack", "seq guest_ts host_ts")

_ACK_RE = re.compile(r"ACK (\S+) (\d+) (\d+)\s*$")
_STOPPED_RE = re.compile(r"STOPPED((?: \S+=-?\d+)*)\s*$")


class GuestError(RuntimeError):
    """The guest did not do what was asked (timeout, died, reported ERR); carries the console."""


def virt_type():
    """'qemu' (TCG) unless LIVESNAP_GUEST_VIRT_TYPE says otherwise (e.g. 'kvm' on real hosts)."""
    return os.environ.get("LIVESNAP_GUEST_VIRT_TYPE", "qemu")


def host_tsc_khz():
    """The host TSC frequency in kHz, or None when it cannot be found reliably.

    Under TCG the guest's rdtsc reads the host TSC, but the guest's PIT calibration of it fails
    now and then on a loaded host ("Marking TSC unstable due to could not calculate TSC khz"),
    leaving the guest on refined-jiffies (4 ms clock). Passing tsc_early_khz avoids that.
    """
    try:
        out = subprocess.run(["dmesg"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for pat in (r"tsc: Refined TSC clocksource calibration: ([0-9.]+) MHz",
                r"tsc: Detected ([0-9.]+) MHz processor"):
        m = re.findall(pat, out)
        if m:
            return int(round(float(m[-1]) * 1000))
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", info, re.M)
    if flags and mhz and {"constant_tsc", "tsc_known_freq"} <= set(flags.group(1).split()):
        return int(round(float(mhz.group(1)) * 1000))
    return None


def timer_cmdline(virt):
    """Kernel options giving the guest a fine clock: under TCG trust the (host) TSC."""
    if virt != "qemu":
        return ""
    khz = host_tsc_khz()
    return "tsc=reliable" + (" tsc_early_khz=%d" % khz if khz else "")


def domain_xml(name, disks, kernel=None, initrd=None, ring_mib=4, interval_ms=20, run_id="run0",
               serial_socket=None, console_log=None, memory_mib=128, virt=None, cache="none",
               extra_cmdline="", uuid=None, agent=False):
    """Domain XML for the writer guest (``agent``: a QEMU guest agent channel, which the
    guest's minimal agent answers).

    disks: list of (target, path, format), e.g. [("vda", "/x/a.qcow2", "qcow2")]; each disk
    must be at least ring_mib MiB. The chain behind a qcow2 is found by libvirt from the image
    headers. cache='none' (O_DIRECT on the host; the guest's fsync becomes a QEMU flush, which
    writes qcow2 metadata and fdatasyncs), so an ACKed write is in the image file.
    The serial console is a unix socket that QEMU listens on (serial_socket), mirrored to
    console_log by virtlogd when given.
    """
    if not records.RUN_ID_RE.match(run_id):
        raise ValueError("run_id must match %s: %r" % (records.RUN_ID_RE.pattern, run_id))
    if kernel is None or initrd is None:
        img = ensure_guest()
        kernel, initrd = kernel or img.kernel, initrd or img.initrd
    targets = [d[0] for d in disks]
    virt = virt or virt_type()
    cmdline = ("console=ttyS0 quiet loglevel=1 panic=-1 %s livesnap.disks=%s livesnap.ring_mib=%d "
               "livesnap.interval_ms=%d livesnap.run=%s %s"
               % (timer_cmdline(virt), ",".join(targets), ring_mib, interval_ms, run_id,
                  extra_cmdline)).strip()
    disk_xml = "".join(
        "    <disk type='file' device='disk'>\n"
        "      <driver name='qemu' type=%s cache=%s/>\n"
        "      <source file=%s/>\n"
        "      <target dev=%s bus='virtio'/>\n"
        "    </disk>\n" % (quoteattr(fmt), quoteattr(cache), quoteattr(path), quoteattr(target))
        for target, path, fmt in disks)
    if serial_socket:
        log = ("      <log file=%s append='off'/>\n" % quoteattr(console_log)) if console_log else ""
        serial = ("    <serial type='unix'>\n"
                  "      <source mode='bind' path=%s/>\n%s"
                  "      <target port='0'/>\n"
                  "    </serial>\n" % (quoteattr(serial_socket), log))
    else:
        serial = "    <serial type='pty'><target port='0'/></serial>\n"
    return ("<domain type=%s>\n"
            "  <name>%s</name>\n%s"
            "  <memory unit='MiB'>%d</memory>\n"
            "  <vcpu>1</vcpu>\n"
            "  <os>\n"
            "    <type arch='x86_64'>hvm</type>\n"
            "    <kernel>%s</kernel>\n"
            "    <initrd>%s</initrd>\n"
            "    <cmdline>%s</cmdline>\n"
            "  </os>\n"
            "  <on_poweroff>destroy</on_poweroff>\n"
            "  <on_reboot>destroy</on_reboot>\n"
            "  <on_crash>destroy</on_crash>\n"
            "  <devices>\n%s%s"
            "%s"
            "    <controller type='usb' model='none'/>\n"
            "    <memballoon model='none'/>\n"
            "  </devices>\n"
            "</domain>\n"
            % (quoteattr(virt), escape(name),
               "  <uuid>%s</uuid>\n" % escape(uuid) if uuid else "", memory_mib, escape(kernel),
               escape(initrd), escape(cmdline), disk_xml, serial,
               "    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
               "</channel>\n" if agent else ""))


class WriterGuest(object):
    """A running writer guest: define (persistent) + start via libvirt, follow its ACKs.

    with WriterGuest("lsg-test-x", [("vda", path, "qcow2")]) as g:
        g.wait_acks(50, timeout=60)
        ... snapshot / merge under it ...
        last = g.stop()            # {"vda": last acked seq}; clean: no write in flight
    verify(leaf_path, "vda", last["vda"], g.ring_mib, g.run_id)

    The guest's disks are named by target (vda, ...); the image paths may change under it
    (snapshots): disk_sources() reads the live definition.
    """

    def __init__(self, name, disks, run_id=None, ring_mib=4, interval_ms=20, uri=DEFAULT_URI,
                 virt=None, cache="none", memory_mib=128, conn=None, extra_cmdline="",
                 agent=False):
        self.name = name
        self.disks = [tuple(d) for d in disks]
        self.targets = [d[0] for d in self.disks]
        self.run_id = run_id or "r" + secrets.token_hex(4)
        self.ring_mib = ring_mib
        self.interval_ms = interval_ms
        self.uri = uri
        self.virt = virt
        self.cache = cache
        self.memory_mib = memory_mib
        self.extra_cmdline = extra_cmdline
        self.agent = agent
        self._conn = conn
        self.dom = None
        self.socket_path = os.path.join(RUN_DIR, name + ".sock")
        self.console_log = os.path.join(RUN_DIR, name + ".console.log")
        self._cv = threading.Condition()
        self._acks = {t: [] for t in self.targets}
        self._lines = []            # (host_ts, line)
        self._errors = []
        self._ready = None
        self._stopped = None        # dict from the latest STOPPED line
        self._resumed = 0
        self._writes_paused = False     # stopped by pause_writes, not resumed since
        self._eof = False
        self._sock = None
        self._thread = None
        self.clean_stop = None
        self.stop_error = None
        self.started_at = None
        self.uuid = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def conn(self):
        if self._conn is None:
            import libvirt
            self._conn = libvirt.open(self.uri)
        return self._conn

    def xml(self):
        return domain_xml(self.name, self.disks, ring_mib=self.ring_mib,
                          interval_ms=self.interval_ms, run_id=self.run_id,
                          serial_socket=self.socket_path, console_log=self.console_log,
                          memory_mib=self.memory_mib, virt=self.virt, cache=self.cache,
                          extra_cmdline=self.extra_cmdline, uuid=self.uuid, agent=self.agent)

    def start(self, wait_ready=True, timeout=60):
        """Define the persistent domain, start it, attach the console reader."""
        os.makedirs(RUN_DIR, exist_ok=True)
        for p in (self.socket_path,):
            if os.path.exists(p):
                os.unlink(p)
        self.dom = self.conn.defineXML(self.xml())
        self.dom.create()
        self.started_at = time.monotonic()
        self._sock = self._connect(timeout=10)
        self._thread = threading.Thread(target=self._reader, name="console-" + self.name,
                                        daemon=True)
        self._thread.start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def restart(self, run_id=None, wait_ready=True, timeout=60):
        """Start the stopped domain again as a new run, on the images its persistent
        definition names now (snapshots and reverts change them), keeping its UUID."""
        import xml.etree.ElementTree as ET
        root = ET.fromstring(self.dom.XMLDesc(2))       # VIR_DOMAIN_XML_INACTIVE
        current = {d.find("target").get("dev"): d.find("source").get("file")
                   for d in root.findall("./devices/disk")}
        self.uuid = self.dom.UUIDString()
        self.disks = [(t, current[t], fmt) for t, _, fmt in self.disks]
        self.run_id = run_id or "r" + secrets.token_hex(4)
        with self._cv:
            self._acks = {t: [] for t in self.targets}
            self._lines, self._errors = [], []
            self._ready = self._stopped = None
            self._resumed, self._eof = 0, False
            self._writes_paused = False
        self.clean_stop = self.stop_error = None
        return self.start(wait_ready=wait_ready, timeout=timeout)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc):
        self.cleanup()
        return False

    def _connect(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.socket_path)
                return s
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError("cannot connect to console socket %s" % self.socket_path)
                time.sleep(0.02)

    def is_active(self):
        try:
            return bool(self.dom and self.dom.isActive())
        except Exception:
            return False

    def destroy(self):
        """Hard stop (ACKed writes were flushed, so nothing acknowledged is lost)."""
        if self.dom is not None and self.is_active():
            try:
                self.dom.destroy()
            except Exception:
                if self.is_active():
                    raise
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stop(self, timeout=30):
        """Stop writing cleanly, then destroy the domain. Returns {disk: last acked seq}.

        Sets clean_stop: True when the guest confirmed (STOPPED) that no write was in flight;
        False when it had to be destroyed without that (verify then needs inflight=1).
        """
        last = None
        if self.is_active():
            try:
                last = self.pause_writes(timeout)
            except GuestError as e:
                self.stop_error = e
        self.destroy()
        self.clean_stop = last is not None
        return {t: self.last_acked(t) for t in self.targets}

    def undefine(self):
        """Remove the definition (with its snapshot/checkpoint metadata); destroys first."""
        if self.dom is None:
            return
        import libvirt
        self.destroy()
        flags = 0
        for f in ("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
                  "VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA"):
            flags |= getattr(libvirt, f, 0)
        try:
            self.dom.undefineFlags(flags)
        except libvirt.libvirtError:
            try:
                self.dom.undefine()
            except libvirt.libvirtError:
                pass
        self.dom = None
        for p in (self.socket_path, self.console_log):
            if os.path.exists(p) and not os.environ.get("LSG_KEEP_CONSOLE"):
                os.unlink(p)

    def cleanup(self):
        try:
            self.destroy()
        finally:
            self.undefine()

    # -- console -----------------------------------------------------------------------------
    def _reader(self):
        buf = b""
        sock = self._sock
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            now = time.monotonic()
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._cv:
                for raw in lines:
                    self._line(raw.decode("ascii", "replace").strip("\r\x00"), now)
                self._cv.notify_all()
        with self._cv:
            if buf:
                self._line(buf.decode("ascii", "replace").strip("\r\x00"), now)
            self._eof = True
            self._cv.notify_all()

    def _line(self, line, host_ts):
        self._lines.append((host_ts, line))
        m = _ACK_RE.search(line)
        if m:
            disk, seq, ns = m.group(1), int(m.group(2)), int(m.group(3))
            self._acks.setdefault(disk, []).append(Ack(seq, ns / 1e9, host_ts))
            return
        if line.startswith("READY"):
            self._ready = (host_ts, line)
        elif line.startswith("STOPPED"):
            m = _STOPPED_RE.search(line)
            pairs = m.group(1).split() if m else []
            self._stopped = {k: int(v) for k, v in (p.split("=") for p in pairs)}
        elif line.startswith("RESUMED"):
            self._resumed += 1
        elif line.startswith("ERR") or "Kernel panic" in line:
            self._errors.append(line)

    def send(self, line):
        if self._sock is None:
            raise GuestError("console not connected")
        self._sock.sendall(line.encode("ascii") + b"\n")

    def console_text(self):
        with self._cv:
            return "\n".join(l for _, l in self._lines)

    def _fail(self, what):
        tail = "\n".join(l for _, l in self._lines[-30:])
        return GuestError("%s: %s (guest %s, active=%s)\n--- console tail ---\n%s"
                          % (self.name, what, self.run_id, self.is_active(), tail))

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                if pred():
                    return
                if self._errors:
                    raise self._fail("guest reported %s" % self._errors[0])
                if self._eof:
                    raise self._fail("console closed (domain gone?) while waiting for " + what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._fail("timeout after %.1fs waiting for %s" % (timeout, what))
                self._cv.wait(min(left, 0.5))

    def wait_ready(self, timeout=60):
        """Wait for the READY line (modules loaded, disks found); returns boot seconds."""
        self._wait(lambda: self._ready is not None, timeout, "READY")
        return self._ready[0] - self.started_at

    def wait_acks(self, n, timeout=60, disk=None):
        """Wait until n more writes are ACKed on every disk (or on `disk`) than at the call."""
        targets = [disk] if disk else self.targets
        with self._cv:
            base = {t: len(self._acks.get(t, ())) for t in targets}
        self._wait(lambda: all(len(self._acks.get(t, ())) >= base[t] + n for t in targets),
                   timeout, "%d more ACKs on %s" % (n, ",".join(targets)))
        return {t: self.last_acked(t) for t in targets}

    def pause_writes(self, timeout=30):
        """Ask the guest to stop writing; returns {disk: last acked seq} once none is in flight."""
        with self._cv:
            self._stopped = None
        self.send("STOP")
        self._wait(lambda: self._stopped is not None, timeout, "STOPPED")
        with self._cv:
            stopped = dict(self._stopped)
        for t, seq in stopped.items():
            if seq != self.last_acked(t):
                raise self._fail("guest says last %s seq is %d, host saw ACK %d"
                                 % (t, seq, self.last_acked(t)))
        self._writes_paused = True
        return stopped

    def resume_writes(self, timeout=30):
        with self._cv:
            n = self._resumed
        self.send("GO")
        self._wait(lambda: self._resumed > n, timeout, "RESUMED")
        self._writes_paused = False

    def sync_acks(self, timeout=30):
        """{disk: last acked seq}, counting every ACK the guest printed before this call.

        The host reads the console behind the guest: an ACK line waits in the guest's tty
        buffer (4 KiB, a hundred lines), in QEMU and in this reader before ``last_acked``
        counts it, while the guest writes on. So ``last_acked`` right after an operation is
        not a bound on what the guest wrote before it (a snapshot's frozen image can hold
        writes whose ACKs the host has not read yet). A STOP/GO round trip is the barrier:
        the guest prints STOPPED after every ACK line it printed before it read STOP. The
        guest stops writing for the round trip; one stopped by ``pause_writes`` stays
        stopped (its STOPPED line was the barrier)."""
        if self._writes_paused:
            return {t: self.last_acked(t) for t in self.targets}
        stopped = self.pause_writes(timeout)
        self.resume_writes(timeout)
        return stopped

    # -- facts -------------------------------------------------------------------------------
    def acks(self, disk=None):
        """{disk: [Ack(seq, guest_ts, host_ts), ...]} (or the list for one disk); copies."""
        with self._cv:
            if disk is not None:
                return list(self._acks.get(disk, ()))
            return {t: list(v) for t, v in self._acks.items()}

    def last_acked(self, disk):
        """Highest ACKed seq on disk, -1 when none."""
        with self._cv:
            a = self._acks.get(disk)
            return a[-1].seq if a else -1

    @property
    def clocksource(self):
        """The guest's clocksource at READY (tsc, kvm-clock, ...; refined-jiffies = 4 ms)."""
        if not self._ready:
            return None
        m = re.search(r"clocksource=(\S+)", self._ready[1])
        return m.group(1) if m else None

    def guest_clock_fine(self):
        cs = self.clocksource
        return bool(cs) and "jiffies" not in cs

    def gaps(self, disk=None, since=None, until=None, clock="auto"):
        """Gaps between consecutive ACKs (of one disk, or of all disks merged in order) that
        overlap the host-time window [since, until] (time.monotonic() values; None = open).
        Returns a list of (seconds, Ack before, Ack after).
        clock: 'guest' (guest CLOCK_MONOTONIC taken right after dd returned), 'host' (arrival
        of the ACK line on the host socket), 'auto' = guest unless the guest fell back to a
        jiffies clocksource (4 ms steps), then host."""
        with self._cv:
            if disk is not None:
                seq = list(self._acks.get(disk, ()))
            else:
                seq = sorted((a for v in self._acks.values() for a in v),
                             key=lambda a: a.guest_ts)
        if clock == "auto":
            clock = "guest" if self.guest_clock_fine() else "host"
        if clock not in ("guest", "host"):
            raise ValueError("clock must be 'guest', 'host' or 'auto': %r" % clock)
        key = (lambda a: a.guest_ts) if clock == "guest" else (lambda a: a.host_ts)
        out = []
        for a, b in zip(seq, seq[1:]):
            if since is not None and b.host_ts < since:
                continue
            if until is not None and a.host_ts > until:
                continue
            out.append((key(b) - key(a), a, b))
        return out

    def max_gap(self, disk=None, since=None, until=None, clock="auto"):
        """Largest gap (s) between consecutive acknowledged writes overlapping the window:
        the guest-visible IO stall. 0.0 when fewer than two ACKs fall in it."""
        g = self.gaps(disk, since, until, clock)
        return max(x[0] for x in g) if g else 0.0

    def gap_stats(self, disk=None, since=None, until=None, clock="auto"):
        """{'n', 'max', 'median', 'mean'} of the gaps in the window (seconds)."""
        g = sorted(x[0] for x in self.gaps(disk, since, until, clock))
        if not g:
            return {"n": 0, "max": 0.0, "median": 0.0, "mean": 0.0}
        return {"n": len(g), "max": g[-1], "median": g[len(g) // 2], "mean": sum(g) / len(g)}

    def disk_sources(self):
        """{target: current top image path} from the live (or persistent) definition."""
        return {t: chain[0] for t, chain in self.disk_chains().items()}

    def disk_chains(self):
        """{target: [top, backing, ...]} paths as libvirt records them."""
        from lxml import etree
        root = etree.fromstring(self.dom.XMLDesc(0).encode())
        out = {}
        for disk in root.findall("./devices/disk"):
            target = disk.find("target").get("dev")
            chain = []
            node = disk
            while node is not None:
                src = node.find("source")
                if src is None or src.get("file") is None:
                    break
                chain.append(src.get("file"))
                node = node.find("backingStore")
            out[target] = chain
        return out


def copy_console_log(guest, dest_dir):
    """Copy the virtlogd console log next to test artefacts (for debugging)."""
    if os.path.exists(guest.console_log):
        shutil.copy(guest.console_log, dest_dir)
