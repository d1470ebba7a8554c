/* The eval callback that copies a shard's last layer output out of the llama.cpp graph.
 *
 * The scheduler asks about every graph node of every step (~46 per layer), so this runs on the
 * per-token hot path; in C it costs nanoseconds where a Python callback costs microseconds.
 * ggml functions arrive as pointers in the state struct, so nothing needs linking at build time.
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef const char *(*get_name_fn)(const void *tensor);
typedef size_t (*nbytes_fn)(const void *tensor);
typedef void (*tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

struct swarm_capture {
    get_name_fn get_name;
    nbytes_fn nbytes;
    tensor_get_fn tensor_get;
    char target[64];   /* node name, e.g. "l_out-5" */
    void *out;         /* destination buffer */
    size_t want;       /* bytes expected for this batch */
    size_t got;        /* bytes seen on the node; 0 until it was reached */
    int status;        /* 0 ok, 1 size mismatch */
};

bool swarm_capture_cb(void *tensor, bool ask, void *user_data) {
    struct swarm_capture *c = (struct swarm_capture *) user_data;
    if (ask) {
        return strcmp(c->get_name(tensor), c->target) == 0;
    }
    size_t n = c->nbytes(tensor);
    c->got = n;
    if (n != c->want) {
        c->status = 1;
        return false;
    }
    c->tensor_get(tensor, c->out, 0, n);
    return false; /* stop the split: the output norm and head are not needed */
}
