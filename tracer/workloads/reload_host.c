/* The reload workload: what Apache does to its modules on every graceful restart.
 *
 *   reload_host LIB[:LIB...] COUNT [INTERVAL_US [HOLD_S]]
 *
 * dlopen()s every LIB, then dlclose()s them all, COUNT times (COUNT 0: until a library reports
 * that pthread_key_create failed). After each dlopen it calls the library's keytrace_status(),
 * the return value of the pthread_key_create its constructor made. Exit status: 0 if every
 * load succeeded, 2 if a key could not be created (the outage), 1 on usage or dlopen errors.
 * With HOLD_S it then stays alive that long, like a server between restarts, so that a scan
 * can read the keys it holds.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s LIB COUNT [INTERVAL_US]\n", argv[0]);
        return 1;
    }
    char *libs[16];
    int nlibs = 0;
    for (char *tok = strtok(argv[1], ":"); tok && nlibs < 16; tok = strtok(NULL, ":"))
        libs[nlibs++] = tok;
    long count = strtol(argv[2], NULL, 10);
    long interval = argc > 3 ? strtol(argv[3], NULL, 10) : 0;
    int failed = 0;
    for (long i = 0; count == 0 || i < count; i++) {
        void *h[16];
        int st = 0;
        for (int l = 0; l < nlibs; l++) {
            h[l] = dlopen(libs[l], RTLD_NOW | RTLD_LOCAL);
            if (!h[l]) {
                fprintf(stderr, "reload_host: dlopen: %s\n", dlerror());
                return 1;
            }
            int (*status)(void) = (int (*)(void))dlsym(h[l], "keytrace_status");
            if (status && status() != 0 && st == 0)
                st = status();
        }
        for (int l = nlibs - 1; l >= 0; l--)
            dlclose(h[l]);
        if (st != 0) {
            if (!failed)
                fprintf(stderr, "reload_host: reload %ld: a library could not create its key: %s\n",
                        i + 1, strerror(st));
            failed = 1;
            if (count == 0)
                break;
        }
        if (interval)
            usleep(interval);
    }
    if (argc > 4)
        sleep((unsigned)strtol(argv[4], NULL, 10));
    return failed ? 2 : 0;
}
