/*
 * LD_PRELOAD shim for running the real tapdisk in a container (test bed only).
 *
 * tapdisk raises RLIMIT_MEMLOCK to unlimited and calls mlockall(); without
 * CAP_SYS_RESOURCE / CAP_IPC_LOCK both fail and tapdisk exits at once (tap-ctl then
 * reports "Connection reset by peer").  Locking memory only matters for a dom0 under
 * memory pressure, not for the IO path, so this shim makes exactly those two calls
 * succeed without doing anything and leaves every other call alone.
 */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/resource.h>
#include <dlfcn.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const struct rlimit *);

int setrlimit(__rlimit_resource_t resource, const struct rlimit *rlim)
{
	static setrlimit_fn real;

	if (resource == RLIMIT_MEMLOCK)
		return 0;
	if (!real)
		real = (setrlimit_fn)dlsym(RTLD_NEXT, "setrlimit");
	return real(resource, rlim);
}

int mlockall(int flags)
{
	(void)flags;
	return 0;
}
