"""Platforms: where a domain's configuration lives (libvirt domain XML, XAPI)."""
