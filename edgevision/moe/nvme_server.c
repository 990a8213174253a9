/* edgevision: the emulated NVMe's FUSE server (edgevision/moe/nvme.py), its request loop in C.
 *
 * The Python side mounts the file system, answers the kernel's INIT and then starts this server on the
 * /dev/fuse descriptor. Its threads (no GIL) take requests from the descriptor and answer the rest of the
 * protocol of this read-only file system of one file: LOOKUP, GETATTR, OPEN, READ, READDIR, STATFS, ...
 * (include/uapi/linux/fuse.h, protocol 7.31). A READ that arrives at t is answered at
 * max(t + latency, channel_free) + size / bandwidth (channel_free moves to that time; the reply is written a
 * measured lead before, which the server's own round trip takes up), from a populated
 * mapping of the model's copy, with one writev; the bytes served are added to a counter the benchmark's
 * children read. Built by edgevision/moe/nvme_server.py with the system's C compiler; without one the
 * Python server in nvme.py answers instead. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum {
    OP_LOOKUP = 1, OP_FORGET = 2, OP_GETATTR = 3, OP_OPEN = 14, OP_READ = 15, OP_STATFS = 17, OP_RELEASE = 18,
    OP_FLUSH = 25, OP_OPENDIR = 27, OP_READDIR = 28, OP_RELEASEDIR = 29, OP_ACCESS = 34, OP_INTERRUPT = 36,
    OP_DESTROY = 38, OP_BATCH_FORGET = 42,
};
enum { ROOT = 1, FILE_NODE = 2 };           /* node ids, as in nvme.py */
enum { VALID = 24 * 3600 };                 /* seconds the kernel may keep names and attributes */
enum { FOPEN_KEEP_CACHE = 1 << 1 };
enum { BUFFER = 16 * 1024 };                /* a request: at least FUSE_MIN_READ_BUFFER (8 KiB) */
enum { NAME_MAX_LEN = 255 };

struct in_header { uint32_t len, opcode; uint64_t unique, nodeid; uint32_t uid, gid, pid; uint16_t extlen, pad; };
struct out_header { uint32_t len; int32_t error; uint64_t unique; };
struct read_in { uint64_t fh, offset; uint32_t size, read_flags; uint64_t lock_owner; uint32_t flags, padding; };
struct open_in { uint32_t flags, open_flags; };
struct attr {
    uint64_t ino, size, blocks, atime, mtime, ctime;
    uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags;
};
struct entry_out { uint64_t nodeid, generation, entry_valid, attr_valid; uint32_t entry_nsec, attr_nsec; struct attr attr; };
struct attr_out { uint64_t attr_valid; uint32_t attr_valid_nsec, dummy; struct attr attr; };
struct open_out { uint64_t fh; uint32_t open_flags; int32_t backing_id; };
struct statfs_out { uint64_t blocks, bfree, bavail, files, ffree; uint32_t bsize, namelen, frsize, padding, spare[6]; };
struct dirent_head { uint64_t ino, off; uint32_t namelen, type; };
_Static_assert(sizeof(struct in_header) == 40 && sizeof(struct read_in) == 40 && sizeof(struct attr) == 88, "");
_Static_assert(sizeof(struct entry_out) == 128 && sizeof(struct attr_out) == 104 && sizeof(struct statfs_out) == 80, "");

struct edgevision_nvme {
    int fd;
    const char *data;  /* the populated mapping of the backing file */
    uint64_t size;
    char name[NAME_MAX_LEN + 1];
    size_t name_len;
    uint64_t *counter; /* bytes served, in the benchmark's shared 8-byte file */
    pthread_mutex_t lock;
    int64_t latency_ns, channel_free_ns, lead_ns; /* lead: replies go out this early (the round trip after) */
    double ns_per_byte; /* 0: unthrottled */
    uint64_t requests, write_errors;
    int last_write_errno, read_errno; /* read_errno: why a thread stopped reading, other than an unmount */
    int threads, joined;
    pthread_t thread[];
};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void sleep_until(int64_t due) {
    struct timespec t = {.tv_sec = due / 1000000000, .tv_nsec = due % 1000000000};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
}

static void reply(struct edgevision_nvme *s, uint64_t unique, int error, const void *payload, size_t size) {
    struct out_header head = {.len = (uint32_t)(sizeof head + size), .error = error, .unique = unique};
    struct iovec iov[2] = {{&head, sizeof head}, {(void *)payload, size}};
    if (writev(s->fd, iov, size ? 2 : 1) < 0 && errno != ENOENT && errno != ENODEV) {
        /* ENOENT: the request was interrupted meanwhile; ENODEV: unmounted */
        pthread_mutex_lock(&s->lock);
        s->write_errors++;
        s->last_write_errno = errno;
        pthread_mutex_unlock(&s->lock);
    }
}

static struct attr attr_of(const struct edgevision_nvme *s, uint64_t node) {
    uint64_t now = (uint64_t)time(NULL);
    struct attr a = {.ino = node, .atime = now, .mtime = now, .ctime = now, .blksize = 4096};
    if (node == FILE_NODE) {
        a.mode = S_IFREG | 0444, a.size = s->size, a.nlink = 1;
    } else {
        a.mode = S_IFDIR | 0555, a.nlink = 2;
    }
    a.blocks = (a.size + 511) / 512;
    return a;
}

static void answer_read(struct edgevision_nvme *s, const struct in_header *in, const struct read_in *r, int64_t arrival) {
    uint64_t size = 0;
    if (in->nodeid == FILE_NODE && r->offset < s->size) {
        size = s->size - r->offset < r->size ? s->size - r->offset : r->size;
    }
    pthread_mutex_lock(&s->lock);
    int64_t start = arrival + s->latency_ns;
    if (start < s->channel_free_ns) {
        start = s->channel_free_ns;
    }
    int64_t due = start + (int64_t)(size * s->ns_per_byte);
    s->channel_free_ns = due;
    int64_t lead = s->lead_ns;
    pthread_mutex_unlock(&s->lock);
    sleep_until(due - lead);
    reply(s, in->unique, 0, size ? s->data + r->offset : NULL, size);
    __atomic_add_fetch(s->counter, size, __ATOMIC_RELAXED);
    __atomic_add_fetch(&s->requests, 1, __ATOMIC_RELAXED);
}

static void answer_readdir(struct edgevision_nvme *s, const struct in_header *in, const struct read_in *r) {
    char out[4096];
    size_t used = 0, limit = r->size < sizeof out ? r->size : sizeof out;
    struct { uint64_t ino; const char *name; size_t len; uint32_t type; } entries[] = {
        {ROOT, ".", 1, S_IFDIR >> 12}, {ROOT, "..", 2, S_IFDIR >> 12}, {FILE_NODE, s->name, s->name_len, S_IFREG >> 12},
    };
    for (uint64_t i = r->offset; i < 3; i++) {
        size_t length = (sizeof(struct dirent_head) + entries[i].len + 7) & ~(size_t)7;
        if (used + length > limit) {
            break;
        }
        struct dirent_head head = {entries[i].ino, i + 1, (uint32_t)entries[i].len, entries[i].type};
        memset(out + used, 0, length);
        memcpy(out + used, &head, sizeof head);
        memcpy(out + used + sizeof head, entries[i].name, entries[i].len);
        used += length;
    }
    reply(s, in->unique, 0, out, used);
}

static void answer(struct edgevision_nvme *s, const struct in_header *in, const char *body, size_t body_len) {
    switch (in->opcode) {
    case OP_LOOKUP:
        if (in->nodeid == ROOT && strnlen(body, body_len) == s->name_len && memcmp(body, s->name, s->name_len) == 0) {
            struct entry_out e = {.nodeid = FILE_NODE, .entry_valid = VALID, .attr_valid = VALID};
            e.attr = attr_of(s, FILE_NODE);
            reply(s, in->unique, 0, &e, sizeof e);
        } else {
            reply(s, in->unique, -ENOENT, NULL, 0);
        }
        return;
    case OP_GETATTR: {
        struct attr_out a = {.attr_valid = VALID, .attr = attr_of(s, in->nodeid)};
        reply(s, in->unique, 0, &a, sizeof a);
        return;
    }
    case OP_OPEN:
        if (body_len < sizeof(struct open_in) || (((const struct open_in *)body)->flags & O_ACCMODE) != O_RDONLY) {
            reply(s, in->unique, -EROFS, NULL, 0);
        } else {
            struct open_out o = {.open_flags = FOPEN_KEEP_CACHE};
            reply(s, in->unique, 0, &o, sizeof o);
        }
        return;
    case OP_OPENDIR: {
        struct open_out o = {0};
        reply(s, in->unique, 0, &o, sizeof o);
        return;
    }
    case OP_READDIR:
        if (body_len >= sizeof(struct read_in)) {
            answer_readdir(s, in, (const struct read_in *)body);
        } else {
            reply(s, in->unique, -EINVAL, NULL, 0);
        }
        return;
    case OP_STATFS: {
        struct statfs_out f = {.blocks = (s->size + 4095) / 4096, .files = 2, .bsize = 4096, .namelen = 255, .frsize = 4096};
        reply(s, in->unique, 0, &f, sizeof f);
        return;
    }
    case OP_RELEASE:
    case OP_RELEASEDIR:
    case OP_FLUSH:
    case OP_ACCESS:
    case OP_DESTROY:
        reply(s, in->unique, 0, NULL, 0);
        return;
    case OP_FORGET:
    case OP_BATCH_FORGET:
    case OP_INTERRUPT:
        return; /* no reply */
    default:
        reply(s, in->unique, -ENOSYS, NULL, 0);
    }
}

static void *serve(void *arg) {
    struct edgevision_nvme *s = arg;
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* sleeps wake within ~1 ns of their deadline, not 50 us */
    char *buffer = malloc(BUFFER);
    if (!buffer) {
        __atomic_store_n(&s->read_errno, ENOMEM, __ATOMIC_RELAXED);
        return NULL;
    }
    for (;;) {
        ssize_t n = read(s->fd, buffer, BUFFER);
        int64_t arrival = now_ns();
        if (n < 0) {
            if (errno == EINTR || errno == ENOENT || errno == EAGAIN) {
                continue;
            }
            if (errno != ENODEV) { /* ENODEV: unmounted, the connection ended */
                __atomic_store_n(&s->read_errno, errno, __ATOMIC_RELAXED);
            }
            break;
        }
        if ((size_t)n < sizeof(struct in_header)) {
            continue;
        }
        const struct in_header *in = (const struct in_header *)buffer;
        const char *body = buffer + sizeof *in;
        size_t body_len = (size_t)n - sizeof *in;
        if (in->opcode == OP_READ) {
            if (body_len >= sizeof(struct read_in)) {
                answer_read(s, in, (const struct read_in *)body, arrival);
            } else {
                reply(s, in->unique, -EINVAL, NULL, 0);
            }
        } else {
            answer(s, in, body, body_len);
            if (in->opcode == OP_DESTROY) {
                break;
            }
        }
    }
    free(buffer);
    return NULL;
}

/* Start `threads` server threads on the /dev/fuse descriptor `fd` (after INIT). NULL on failure (errno set). */
struct edgevision_nvme *edgevision_nvme_start(int fd, const char *data, uint64_t size, const char *name,
                                              int64_t latency_ns, double ns_per_byte, int threads,
                                              uint64_t *counter) {
    size_t name_len = strlen(name);
    if (threads < 1 || name_len > NAME_MAX_LEN) {
        errno = EINVAL;
        return NULL;
    }
    struct edgevision_nvme *s = calloc(1, sizeof *s + (size_t)threads * sizeof(pthread_t));
    if (!s) {
        return NULL;
    }
    s->fd = fd, s->data = data, s->size = size, s->counter = counter;
    memcpy(s->name, name, name_len + 1);
    s->name_len = name_len;
    s->latency_ns = latency_ns, s->ns_per_byte = ns_per_byte;
    pthread_mutex_init(&s->lock, NULL);
    for (s->threads = 0; s->threads < threads; s->threads++) {
        int err = pthread_create(&s->thread[s->threads], NULL, serve, s);
        if (err) {
            if (!s->threads) {
                free(s);
                errno = err;
                return NULL;
            }
            return s; /* fewer threads: fewer READs in flight */
        }
    }
    return s;
}

/* The device model from now on; each reply is written `lead_ns` before its due time (the server's own round
 * trip, as measured, takes that long). */
void edgevision_nvme_set_model(struct edgevision_nvme *s, int64_t latency_ns, double ns_per_byte, int64_t lead_ns) {
    pthread_mutex_lock(&s->lock);
    s->latency_ns = latency_ns, s->ns_per_byte = ns_per_byte, s->lead_ns = lead_ns;
    pthread_mutex_unlock(&s->lock);
}

/* READs answered so far; *write_errors, *last_write_errno, *read_errno: replies that failed, why, and why a
 * thread stopped reading requests (0: none). */
uint64_t edgevision_nvme_stats(struct edgevision_nvme *s, uint64_t *write_errors, int *last_write_errno,
                               int *read_errno) {
    pthread_mutex_lock(&s->lock);
    *write_errors = s->write_errors, *last_write_errno = s->last_write_errno;
    pthread_mutex_unlock(&s->lock);
    *read_errno = __atomic_load_n(&s->read_errno, __ATOMIC_RELAXED);
    return __atomic_load_n(&s->requests, __ATOMIC_RELAXED);
}

/* Wait up to `timeout_ms` for the threads to end (after the connection has ended: unmount or abort) and free
 * the server; the number still running (then nothing is freed: the caller must keep the mappings). */
int edgevision_nvme_stop(struct edgevision_nvme *s, int timeout_ms) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
        deadline.tv_sec++, deadline.tv_nsec -= 1000000000;
    }
    for (; s->joined < s->threads; s->joined++) {
        if (pthread_timedjoin_np(s->thread[s->joined], NULL, &deadline) != 0) {
            return s->threads - s->joined;
        }
    }
    pthread_mutex_destroy(&s->lock);
    free(s);
    return 0;
}
