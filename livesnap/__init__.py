"""livesnap: online snapshots of VM disks and child-aware deletion (Xen/VHD and KVM/qcow2).

Python 3.6 compatible, stdlib only at import time: ``libvirt`` and ``lxml`` are imported
only by the modules that talk to libvirt.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
