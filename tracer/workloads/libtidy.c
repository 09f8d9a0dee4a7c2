/* A library that creates a pthread key when loaded and deletes it when unloaded. */
#include <pthread.h>

static pthread_key_t key;
static int status;

static void destroy(void *p) { (void)p; }

__attribute__((constructor)) static void init(void) { status = pthread_key_create(&key, destroy); }

__attribute__((destructor)) static void fini(void)
{
    if (status == 0)
        pthread_key_delete(key);
}

int keytrace_status(void) { return status; }
