/* The microbenchmark: N iterations of pthread_key_create + pthread_key_delete.
 *
 *   keyloop N [now]
 *
 * Prints "ready" and waits for a line on stdin (so a tracer can attach to this pid first),
 * unless "now" is given, then runs the loop and prints "ns_per_iter=X iterations=N". The time comes from
 * CLOCK_MONOTONIC around the loop only. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000000;
    char line[16];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    if (!(argc > 2 && argv[2][0] == 'n') && !fgets(line, sizeof(line), stdin))
        return 1;
    struct timespec a, b;
    pthread_key_t k;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        if (pthread_key_create(&k, NULL) != 0)
            return 2;
        pthread_key_delete(k);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("ns_per_iter=%.1f iterations=%ld\n", ns / n, n);
    return 0;
}
