/* edgevision: llama.cpp's eval callback, filtered in C.
 *
 * llama.cpp asks its eval callback about every node of every graph (hundreds per decoded token) and a Python
 * callback pays for each crossing into the interpreter. This filter answers for the nodes whose name does not
 * start with the prefix it holds, and passes the others on to the Python callback (`next`). Built by
 * edgevision/decoder/nodefilter.py with the system's C compiler; without one the Python callback sees every
 * node, as before. No ggml headers: the name's offset in struct ggml_tensor comes from the Python side. */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef bool (*edgevision_eval_cb)(void *tensor, bool ask, void *user_data);

struct edgevision_node_filter {
    size_t name_offset;      /* offsetof(struct ggml_tensor, name) */
    size_t prefix_len;       /* 0: every node goes to `next` */
    char prefix[64];
    int answer_ask;          /* 1: every node with the prefix is wanted; say so here, call `next` with the data only */
    edgevision_eval_cb next; /* the Python callback */
    void *next_data;
    unsigned long long asked, passed; /* nodes asked about, nodes passed on */
};

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
        return true;
    }
    f->passed++;
    return f->next(tensor, ask, f->next_data);
}
