"""The state directory: each domain's catalog (``<uuid>.db``) and lock (``<uuid>.lock``).

Its default is resolved when a command runs, from the environment of the process running
it (``$LIVESNAP_STATE_DIR``), never earlier: the livesnap service builds the parser once and
runs each command in a process of its own with its caller's environment, so a default read
when the parser was built would be the service's, not the caller's (two catalogs and two
locks for one domain)."""
import os

from livesnap.errors import StateDirUnusable

DEFAULT_STATE_DIR = "/var/lib/livesnap"


def resolve(state_dir=None):
    """``--state-dir`` if given, else ``$LIVESNAP_STATE_DIR``, else /var/lib/livesnap."""
    return state_dir or os.environ.get("LIVESNAP_STATE_DIR") or DEFAULT_STATE_DIR


def ready(path):
    """``path``, made (0700) when missing; ``StateDirUnusable`` when it is not a directory
    or cannot be made."""
    try:
        os.makedirs(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StateDirUnusable(path, e.strerror or str(e))
    if not os.path.isdir(path):
        raise StateDirUnusable(path, "not a directory")
    return path


def domain_files(state_dir, uuid):
    """Every file the state directory may hold for one domain, its lock last: the catalog
    (``<uuid>.db``, with SQLite's ``-wal`` and ``-shm`` beside it while it is open), the log
    of a reclaim the libvirt hook started (``<uuid>.reclaim.log``, livesnap/hook.py) and the
    lock (``<uuid>.lock``)."""
    return [os.path.join(state_dir, uuid + suffix)
            for suffix in (".db", ".db-wal", ".db-shm", ".reclaim.log", ".lock")]
