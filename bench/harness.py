"""What the benchmarks (online.py, xen.py) share: the checkout on ``sys.path``, the error a
bench raises, running a command, the options every bench takes, SIGTERM unwinding like
Ctrl-C, ratios, and the JSON document printed (and written to ``--out``)."""
import json
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MiB = 1 << 20


class BenchError(RuntimeError):
    pass


def run(cmd, env=None, check=True):
    """Run ``cmd`` in the checkout, output captured; a failure is a BenchError (``check``)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=env, cwd=ROOT)
    if check and p.returncode != 0:
        raise BenchError("%s failed (%d): %s %s" % (" ".join(cmd), p.returncode,
                                                     p.stdout.strip(), p.stderr.strip()))
    return p


def ratio(a, b):
    """a / b rounded (None when either is unknown, or b is 0 and a is not)."""
    if a is None or b is None:
        return None
    if b == 0:
        return None if a else 1.0
    return round(a / float(b), 3)


def add_run_options(ap, per):
    """--sizes and --repeat (``per``: what one run is per size, e.g. "tool")."""
    ap.add_argument("--sizes", default="16,64,256", help="MiB to move, comma separated")
    ap.add_argument("--repeat", type=int, default=2, help="runs per size and %s" % per)


def add_output_options(ap):
    """--dir and --out."""
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")


def sizes_of(a):
    """The parsed --sizes: [MiB]."""
    return [int(s) for s in a.sizes.split(",") if s.strip()]


def unwind_on_sigterm():
    """SIGTERM unwinds like Ctrl-C (SystemExit), so a bench's finally blocks clean up."""
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(128 + signo))


def emit(doc, out=None):
    """Print the result document (and write it to ``out``); the exit status: 0 if verified."""
    text = json.dumps(doc, indent=2)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0 if doc["verified"] else 1
