"""livesnap: online snapshots of VM disks and child-aware deletion (Xen/VHD and KVM/qcow2).

Python 3.6 compatible, stdlib only at import time: ``libvirt`` and ``lxml`` are imported
only by the modules that talk to libvirt.
"""
__version__ = "0.1.0"

# (The package itself imports nothing: the ``livesnap`` program's first modules,
# ``livesnap.launcher`` and ``livesnap.cli.client``, start before anything else. The library's loggers get their
# NullHandler in ``livesnap.errors``, which every module that logs imports.)
