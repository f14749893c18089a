"""livesnap's own test guest: a tiny writer VM (Debian kernel + busybox initramfs) and host tools.

Not part of the livesnap package. Host side only (Python 3.11, libvirt-python, lxml).

    from testguest import WriterGuest, verify, chain_digest
"""

from .build import GuestImage, ensure_guest
from .images import create_qcow2
from .domain import Ack, GuestError, WriterGuest, domain_xml, virt_type
from .verify import VerifyError, VerifyResult, chain_digest, read_raw, read_records, verify

__all__ = ["Ack", "GuestError", "GuestImage", "VerifyError", "VerifyResult", "WriterGuest",
           "chain_digest", "create_qcow2", "domain_xml", "ensure_guest", "read_raw", "read_records", "verify",
           "virt_type"]
