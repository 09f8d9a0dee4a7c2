/* A process that makes a pthread key from one code path on three separate occasions (150 ms
 * apart: leaking, by keytrace's rules) and then waits until killed: a process at risk, so the
 * agent exports series of its own for it. */
#include <pthread.h>
#include <unistd.h>

int main(void)
{
    for (int i = 0; i < 3; i++) {
        pthread_key_t k;
        if (pthread_key_create(&k, 0) != 0)
            return 1;
        usleep(150000);
    }
    pause();
    return 0;
}
