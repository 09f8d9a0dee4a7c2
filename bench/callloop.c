/* The calls microbenchmark: N calls of rand(), a cheap libc function.
 *
 *   callloop N
 *
 * Prints "ready" and waits for a line on stdin (so a tracer can attach to this pid first),
 * then runs the loop and prints "ns_per_iter=X iterations=N" (CLOCK_MONOTONIC around the loop
 * only). Built plainly (lazy PLT), so that ltrace sees the calls too. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 1000000;
    char line[16];
    volatile long sink = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof(line), stdin))
        return 1;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        sink += rand();
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("ns_per_iter=%.1f iterations=%ld\n", ns / n, n);
    return 0;
}
