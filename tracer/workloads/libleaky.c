/* A library that leaks one pthread key per load, as libgomp did under PHP's Imagick:
 * its constructor creates a key and nothing ever deletes it. */
#include <pthread.h>
#include <stdio.h>

static pthread_key_t key;
static int status;

static void destroy(void *p) { (void)p; }

__attribute__((constructor)) static void init(void)
{
    status = pthread_key_create(&key, destroy);
    if (status)
        fprintf(stderr, "libleaky: could not create thread pool destructor.\n");
}

int keytrace_status(void) { return status; }
