/* edgevision: llama.cpp's eval callback, filtered in C.
 *
 * llama.cpp asks its eval callback about every node of every graph (hundreds per decoded token) and a Python
 * callback pays for each crossing into the interpreter. This filter answers for the nodes whose name does not
 * start with the prefix it holds, and passes the others on to the Python callback (`next`). Built by
 * edgevision/decoder/nodefilter.py with the system's C compiler; without one the Python callback sees every
 * node, as before. No ggml headers: the name's offset in struct ggml_tensor comes from the Python side.
 *
 * Capture: with `ring` set, a computed node with the prefix is not passed on. Its leading fields (type,
 * buffer, ne[4], nb[4]: HEAD bytes), its name and its data (read with ggml_backend_tensor_get, whatever
 * backend holds it) are copied into the ring, and Python reads them all after llama_decode returns: no
 * crossing into the interpreter during the decode. A node that does not fit goes to `next` as before, and is
 * counted (`overflowed`), so that Python can give the ring more room.
 *
 * Sampling: with `every` > 1, only one graph in `every` is wanted (its first wanted node is named `first`), so
 * the other graphs run without splits and without Python, as without a callback. */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef bool (*edgevision_eval_cb)(void *tensor, bool ask, void *user_data);
typedef size_t (*edgevision_nbytes_fn)(const void *tensor);
typedef void (*edgevision_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

#define HEAD 80    /* type (+ padding), buffer, ne[4], nb[4] */
#define NAME 64    /* GGML_MAX_NAME */

struct edgevision_capture {
    size_t offset, size;  /* of the node's data in the ring */
    unsigned char head[HEAD];
    char name[NAME];
};

struct edgevision_node_filter {
    size_t name_offset;      /* offsetof(struct ggml_tensor, name) */
    size_t prefix_len;       /* 0: every node goes to `next` */
    char prefix[64];
    int answer_ask;          /* 1: every node with the prefix is wanted; say so here, call `next` with the data only */
    edgevision_eval_cb next; /* the Python callback */
    void *next_data;
    unsigned long long asked, passed; /* nodes asked about, nodes passed on */
    /* capture (ring NULL: off) */
    unsigned char *ring;
    size_t ring_size, used;
    struct edgevision_capture *captures;
    size_t max_captures, count;
    unsigned long long overflowed;
    edgevision_nbytes_fn nbytes;
    edgevision_get_fn get;
    /* sampling, with answer_ask: only one graph in `every` is wanted; a graph starts at the node named `first` */
    unsigned long long every, graphs;
    char first[64];
    int active;
};

static bool capture(struct edgevision_node_filter *f, void *tensor, const char *name) {
    size_t size = f->nbytes(tensor);
    size_t at = (f->used + 63) & ~(size_t)63;
    if (f->count >= f->max_captures || at + size > f->ring_size) {
        f->overflowed++;
        return false;
    }
    struct edgevision_capture *c = &f->captures[f->count++];
    c->offset = at;
    c->size = size;
    memcpy(c->head, tensor, HEAD);
    memcpy(c->name, name, NAME);
    c->name[NAME - 1] = 0;
    f->get(tensor, f->ring + at, 0, size);
    f->used = at + size;
    return true;
}

bool edgevision_node_filter(void *tensor, bool ask, void *user_data) {
    struct edgevision_node_filter *f = user_data;
    const char *name = (const char *)tensor + f->name_offset;
    if (ask) {
        f->asked++;
    }
    if (f->prefix_len && strncmp(name, f->prefix, f->prefix_len) != 0) {
        return !ask; /* not wanted; on an eval call (never reached for such a node) let the graph go on */
    }
    if (ask && f->answer_ask) {
        if (f->every > 1) {
            if (strcmp(name, f->first) == 0) {
                f->graphs++;
                f->active = f->graphs % f->every == 0;
            }
            return f->active;
        }
        return true;
    }
    if (!ask && f->ring && capture(f, tensor, name)) {
        return true;
    }
    f->passed++;
    return f->next(tensor, ask, f->next_data);
}
