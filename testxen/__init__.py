"""Xen stand-ins for tests without Xen: a tapdisk daemon, tap-ctl, an ack-log verifier."""
