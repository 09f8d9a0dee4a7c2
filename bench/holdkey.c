/* A process that makes one pthread key and then waits until killed: one exported series. */
#include <pthread.h>
#include <unistd.h>

int main(void)
{
    pthread_key_t k;
    if (pthread_key_create(&k, 0) != 0)
        return 1;
    pause();
    return 0;
}
