"""libvirt's block job types (``virDomainBlockJobType``), by number and by name: what a job
found on a disk is, for the live datapath that waits on its own jobs and for the preflight
that refuses other tools' jobs. Pure constants, no libvirt import (the numbers are libvirt's
stable API)."""

JOB_TYPES = {1: "pull", 2: "copy", 3: "commit", 4: "active commit", 5: "backup"}
JOB_PULL, JOB_COPY, JOB_COMMIT, JOB_ACTIVE_COMMIT = 1, 2, 3, 4
