/*
 * LD_PRELOAD shim for running the real tapdisk in a container (test bed only).
 *
 * tapdisk raises RLIMIT_MEMLOCK to unlimited and calls mlockall(); without
 * CAP_SYS_RESOURCE / CAP_IPC_LOCK both fail and tapdisk exits at once (tap-ctl then
 * reports "Connection reset by peer").  Locking memory only matters for a dom0 under
 * memory pressure, not for the IO path, so this shim makes exactly those two calls
 * succeed without doing anything.
 *
 * It also scales sleep(): tapdisk's only sleep() is the pause between its 10 attempts to
 * reopen a chain at resume (drivers/tapdisk-vbd.c, TD_VBD_EIO_SLEEP = 1 s). With
 * TESTXEN_TAPDISK_RETRY_MS=N set, each second of it lasts N ms instead, so that a test whose
 * unpause is expected to fail does not wait 10 s per attempt; the number of attempts and
 * everything else stay as upstream. Unset, sleep() is the real one.
 */
#define _GNU_SOURCE
#include <sys/mman.h>
#include <sys/resource.h>
#include <syslog.h>
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

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

typedef unsigned int (*sleep_fn)(unsigned int);

unsigned int sleep(unsigned int seconds)
{
	static sleep_fn real;
	const char *ms = getenv("TESTXEN_TAPDISK_RETRY_MS");

	if (ms && *ms) {
		usleep((useconds_t)seconds * (useconds_t)atoi(ms) * 1000);
		return 0;
	}
	if (!real)
		real = (sleep_fn)dlsym(RTLD_NEXT, "sleep");
	return real(seconds);
}

/*
 * With TESTXEN_TAPDISK_NO_CONSOLE set, openlog() drops LOG_CONS (tapdisk asks for it): with no
 * syslog daemon on /dev/log (this test bed) glibc would write every message to /dev/console,
 * synchronously, 2-3 ms each here, several per pause and per unpause (an image closed, opened,
 * its parent validated); a host's syslog takes them in microseconds. The messages are dropped
 * instead. Unset, openlog() is the real one with tapdisk's options.
 */
typedef void (*openlog_fn)(const char *, int, int);

void openlog(const char *ident, int option, int facility)
{
	static openlog_fn real;
	const char *v = getenv("TESTXEN_TAPDISK_NO_CONSOLE");

	if (v && *v)
		option &= ~LOG_CONS;
	if (!real)
		real = (openlog_fn)dlsym(RTLD_NEXT, "openlog");
	real(ident, option, facility);
}
