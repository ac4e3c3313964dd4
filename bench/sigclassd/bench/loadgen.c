/*
 * The benchmark's load generator and consumer, compiled so that neither takes the CPU the
 * system under test (SUT) is measured with. One program, two roles sharing one schedule:
 *
 *   loadgen send    ENDPOINT --streams N --seconds S [--rate HZ --speed X --chunk C --channels K --prefix P]
 *                   [--connections G --declare HZ --partitioned]
 *   loadgen receive ENDPOINT[,ENDPOINT...] --streams N --seconds S [--rate HZ --chunk C --prefix P --lookahead L --warmup W]
 *
 * Both connect, print {"event": "ready"} on stdout, then read the start time (Unix ns) as one line
 * on stdin. The schedule: stream i (topic P + 5-digit i) sends message m, samples m*C .. m*C+C-1,
 * at due(i, m) = start + (m + i/N) * C/HZ, the moment its newest sample exists; it sends the
 * messages due before start + S. Protocol v1, float32, the restart flag on message 0.
 * --speed X (default 1) sends X times faster than the HZ the frames declare: a flooding gateway
 * (X = 10: 2,500 samples/s per stream declared as 250 Hz); the schedule then uses HZ * X.
 * --partitioned sends each topic as 0x00, the id's partition (FNV-1a 32 of the id mod 256), then the id
 * (docs/protocol.md, "Partitioned topics"), so that each of the daemon's workers receives only its own.
 *
 * `send` sends on schedule, prints messages sent, how late the sends were and its CPU, and stays
 * connected until it reads "stop" (or EOF) on stdin.
 * `receive` times every label message until it reads "stop" on stdin (or EOF), then prints its
 * report: latency from the due time of the message carrying the newest sample each label depends
 * on (its newest labelled sample + L, the model's look-ahead) and from the SUT's ingress_ns stamp
 * of that sample (arrival),
 * labelled samples per second inside [start + W, start + S], and per-stream seq continuity.
 *
 * Build: cc -O2 -o loadgen loadgen.c $(pkg-config --cflags --libs libzmq) -lm
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define SAMPLE_HEADER 32
#define LABEL_HEADER 40
#define LABEL_FLUSHED (1 << 6)
#define LABEL_SHED (1 << 3)
#define LABEL_GAP (1 << 2)
#define PAYLOADS 61 /* distinct payloads, cycled; a prime, so streams do not move in lockstep */
/* A send up to this early rather than a sleep for less: at 1,000 streams sends are 40 us apart. */
#define EARLY_NS 200000

typedef struct {
    const char *endpoint, *prefix;
    long streams;
    double seconds, rate, speed, warmup;
    double declare; /* the rate the frames declare, if not --rate (may be 0: unknown) */
    int chunk, channels, lookahead, connections, partitioned;
    int64_t start_ns;
} Load;

static double period_ns(const Load *l) { return l->chunk * 1e9 / (l->rate * l->speed); }

/* Offset of stream i's messages from the start: its phase, i/N of the period. */
static double phase_ns(const Load *l, long i) { return period_ns(l) * (double)i / (double)l->streams; }

/* How many messages stream i sends: those due before start + seconds. */
static long messages(const Load *l, long i) {
    double m = ceil(l->seconds * 1e9 / period_ns(l) - (double)i / (double)l->streams);
    return m > 0 ? (long)m : 0;
}

/* The partition of a stream id: FNV-1a 32-bit of its bytes, mod 256. */
static uint8_t partition_of(const char *id, size_t len) {
    uint32_t h = 0x811C9DC5u;
    for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)id[i]) * 0x01000193u;
    return (uint8_t)(h % 256);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static double cpu_s(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static void put_u16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint64_t get_le(const uint8_t *p, int size) {
    uint64_t v = 0;
    for (int i = size - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Percentile q of sorted values, interpolated linearly as numpy.percentile does. */
static double percentile(const double *v, size_t n, double q) {
    if (n == 0) return NAN;
    double pos = q / 100.0 * (double)(n - 1);
    size_t lo = (size_t)pos;
    return lo + 1 < n ? v[lo] + (pos - lo) * (v[lo + 1] - v[lo]) : v[n - 1];
}

/* JSON has no NaN: an empty statistic is null. */
static void json_number(const char *key, double v) {
    if (isnan(v)) printf("\"%s\": null", key);
    else printf("\"%s\": %.4f", key, v);
}

static void json_stats(const char *prefix, double *v, size_t n) {
    qsort(v, n, sizeof *v, cmp_double);
    const char *names[] = {"p50_ms", "p90_ms", "p99_ms", "max_ms"};
    const double qs[] = {50, 90, 99, 100};
    for (int k = 0; k < 4; k++) {
        char key[64];
        snprintf(key, sizeof key, "%s%s", prefix, names[k]);
        json_number(key, percentile(v, n, qs[k]));
        printf(", ");
    }
}

typedef struct {
    double *v;
    size_t n, cap;
} Vec;

static void push(Vec *a, double x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? 2 * a->cap : 65536;
        a->v = realloc(a->v, a->cap * sizeof *a->v);
        if (!a->v) { perror("realloc"); exit(1); }
    }
    a->v[a->n++] = x;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

/* Announce readiness, then block until the orchestrator says when message 0 of stream 0 is due. */
static int64_t wait_for_start(void) {
    printf("{\"event\": \"ready\"}\n");
    fflush(stdout);
    char line[64];
    if (!fgets(line, sizeof line, stdin)) { fprintf(stderr, "loadgen: no start time on stdin\n"); exit(1); }
    return strtoll(line, NULL, 10);
}

static void sleep_until(int64_t t) {
    struct timespec ts = {t / 1000000000, t % 1000000000};
    while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
}

static int send_load(Load *l) {
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake on time: a late send counts as the SUT's latency */
    void *ctx = zmq_ctx_new();
    /* --connections G: G sockets, stream i on socket i % G (many gateways from one process). */
    void **pubs = malloc(l->connections * sizeof *pubs);
    for (int c = 0; c < l->connections; c++) {
        void *pub = pubs[c] = zmq_socket(ctx, ZMQ_PUB);
        int hwm = 100000, linger = 2000;
        zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof hwm);
        zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof linger);
        if (zmq_connect(pub, l->endpoint) != 0) die(l->endpoint);
    }

    size_t payload = (size_t)l->chunk * l->channels * 4;
    uint8_t *payloads = malloc(PAYLOADS * payload);
    uint32_t x = 2463534242u; /* xorshift32: values in [-2, 2), no NaN or Inf */
    for (size_t k = 0; k < PAYLOADS * payload / 4; k++) {
        x ^= x << 13; x ^= x >> 17; x ^= x << 5;
        float f = (float)((double)x / 4294967296.0 * 4.0 - 2.0);
        uint32_t bits;
        memcpy(&bits, &f, 4);
        put_u32(payloads + 4 * k, bits);
    }
    long total = 0;
    for (long i = 0; i < l->streams; i++) total += messages(l, i);
    double *late = malloc((total ? total : 1) * sizeof *late);
    uint8_t *body = malloc(SAMPLE_HEADER + payload);
    char wire[258], *topic = wire + 2; /* room for the partition marker before the id */
    size_t prefix_len = strlen(l->prefix);
    memcpy(topic, l->prefix, prefix_len);
    float rate = (float)(l->declare >= 0 ? l->declare : l->rate);
    uint32_t rate_bits;
    memcpy(&rate_bits, &rate, 4);
    double sample_ns = 1e9 / (l->rate * l->speed); /* as sent, so sensor times do not overlap */

    l->start_ns = wait_for_start();
    long sent = 0;
    for (long m = 0;; m++) {
        long i = 0;
        /* messages(i) falls with i: the streams still sending in round m are a prefix. */
        for (; i < l->streams && m < messages(l, i); i++) {
            int64_t due = l->start_ns + (int64_t)llround(m * period_ns(l) + phase_ns(l, i));
            if (due - now_ns() > EARLY_NS) sleep_until(due);
            body[0] = 1;                 /* version */
            body[1] = 1;                 /* dtype float32 */
            put_u16(body + 2, (uint16_t)l->channels);
            put_u32(body + 4, (uint32_t)l->chunk);
            put_u64(body + 8, (uint64_t)m * l->chunk);
            put_u64(body + 16, (uint64_t)(due - (int64_t)llround((l->chunk - 1) * sample_ns)));
            put_u32(body + 24, rate_bits);
            put_u32(body + 28, m == 0 ? 1 : 0); /* restart: each run is a new incarnation */
            memcpy(body + SAMPLE_HEADER, payloads + ((i + m) % PAYLOADS) * payload, payload);
            int n = snprintf(topic + prefix_len, sizeof wire - 2 - prefix_len, "%05ld", i);
            size_t topic_len = prefix_len + n;
            const char *sent_topic = topic;
            if (l->partitioned) {
                wire[0] = 0;
                wire[1] = (char)partition_of(topic, topic_len);
                sent_topic = wire;
                topic_len += 2;
            }
            void *pub = pubs[i % l->connections];
            if (zmq_send(pub, sent_topic, topic_len, ZMQ_SNDMORE) < 0 ||
                zmq_send(pub, body, SAMPLE_HEADER + payload, 0) < 0)
                die("send");
            late[sent++] = (now_ns() - due) / 1e6;
        }
        if (i == 0) break;
    }
    double cpu = cpu_s();
    qsort(late, sent, sizeof *late, cmp_double);
    printf("{\"messages\": %ld, \"samples\": %ld, ", sent, sent * l->chunk);
    json_number("late_p99_ms", percentile(late, sent, 99));
    printf(", ");
    json_number("late_max_ms", sent ? late[sent - 1] : NAN);
    printf(", \"cpu_s\": %.3f}\n", cpu);
    fflush(stdout);
    /* Stay connected until told: while the SUT is behind, its receive queue is full and the rest of the load
     * waits in this socket's queue, which closing would drop (after the linger). */
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "stop", 4) != 0) {}
    for (int c = 0; c < l->connections; c++) zmq_close(pubs[c]);
    zmq_ctx_term(ctx);
    return 0;
}

static int receive_labels(Load *l) {
    void *ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    int hwm = 0, linger = 0;
    zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, l->prefix, strlen(l->prefix));
    char *endpoints = strdup(l->endpoint), *save = NULL; /* several: one per shard */
    for (char *e = strtok_r(endpoints, ",", &save); e; e = strtok_r(NULL, ",", &save))
        if (zmq_connect(sub, e) != 0) die(e);
    free(endpoints);

    uint64_t *next = calloc(l->streams, sizeof *next); /* per stream: the seq after the newest labelled */
    Vec from_due = {0}, from_arrival = {0};
    long labelled = 0, label_messages = 0, events = 0, in_window_samples = 0, in_window_messages = 0;
    long gaps = 0, duplicates = 0, flagged_shed = 0, flagged_gap = 0, malformed = 0;
    size_t prefix_len = strlen(l->prefix);

    l->start_ns = wait_for_start();
    int64_t window_from = l->start_ns + (int64_t)(l->warmup * 1e9);
    int64_t window_to = l->start_ns + (int64_t)(l->seconds * 1e9);
    zmq_pollitem_t items[] = {{sub, 0, ZMQ_POLLIN, 0}, {NULL, STDIN_FILENO, ZMQ_POLLIN, 0}};
    zmq_msg_t topic, body;
    zmq_msg_init(&topic);
    zmq_msg_init(&body);
    for (;;) {
        if (zmq_poll(items, 2, 100) < 0 && zmq_errno() != EINTR) die("poll");
        if (items[1].revents) {
            char line[64];
            if (!fgets(line, sizeof line, stdin) || strncmp(line, "stop", 4) == 0) break;
        }
        while (zmq_msg_recv(&topic, sub, ZMQ_DONTWAIT) >= 0) {
            if (!zmq_msg_more(&topic) || zmq_msg_recv(&body, sub, 0) < 0) { malformed++; continue; }
            int64_t now = now_ns();
            const uint8_t *b = zmq_msg_data(&body);
            const char *t = zmq_msg_data(&topic);
            size_t topic_len = zmq_msg_size(&topic);
            int more = zmq_msg_more(&body);
            while (more) { /* a third frame: not protocol v1; drop the rest of the message */
                zmq_msg_recv(&body, sub, 0);
                more = zmq_msg_more(&body);
                b = NULL;
            }
            char digits[16] = {0};
            size_t nd = topic_len - prefix_len;
            if (!b || zmq_msg_size(&body) < LABEL_HEADER || nd == 0 || nd >= sizeof digits) { malformed++; continue; }
            memcpy(digits, t + prefix_len, nd);
            char *end;
            long index = strtol(digits, &end, 10);
            if (*end || index < 0 || index >= l->streams) { malformed++; continue; }
            unsigned flags = get_le(b + 2, 2);
            uint64_t n = get_le(b + 4, 4), seq = get_le(b + 8, 8);
            int64_t ingress = (int64_t)get_le(b + 32, 8);
            if (n == 0) { events++; continue; }
            if (seq > next[index]) gaps += seq - next[index];
            else if (seq < next[index]) duplicates += next[index] - seq < n ? next[index] - seq : n;
            if (seq + n > next[index]) next[index] = seq + n;
            label_messages++;
            labelled += n;
            flagged_shed += (flags & LABEL_SHED) != 0;
            flagged_gap += (flags & LABEL_GAP) != 0;
            if (now >= window_from && now <= window_to) {
                in_window_samples += n;
                in_window_messages++;
            }
            if (flags & LABEL_FLUSHED) continue; /* labelled at shutdown with padding: no sample made it due */
            /* The newest sample these labels depend on, and when the message carrying it was due. */
            uint64_t message = (seq + n - 1 + l->lookahead) / l->chunk;
            int64_t due = l->start_ns + (int64_t)llround(message * period_ns(l) + phase_ns(l, index));
            if (due >= window_from) {
                push(&from_due, (now - due) / 1e6);
                if (ingress > 0) push(&from_arrival, (now - ingress) / 1e6);
            }
        }
        if (zmq_errno() != EAGAIN && zmq_errno() != EINTR) die("receive");
    }
    double cpu = cpu_s();
    long unlabelled_tail = 0;
    for (long i = 0; i < l->streams; i++) {
        uint64_t sent = (uint64_t)messages(l, i) * l->chunk;
        if (sent > next[i]) unlabelled_tail += sent - next[i];
    }
    double measured = (window_to - window_from) / 1e9;
    if (measured <= 0) measured = 1e-9;
    printf("{");
    json_stats("", from_due.v, from_due.n);
    json_stats("arrival_", from_arrival.v, from_arrival.n);
    printf("\"labelled\": %ld, \"label_messages\": %ld, \"events\": %ld, \"labelled_per_s\": %.3f, "
           "\"messages_per_s\": %.3f, \"gaps\": %ld, \"duplicates\": %ld, \"unlabelled_tail\": %ld, "
           "\"timed\": %zu, \"flagged_shed\": %ld, \"flagged_gap\": %ld, \"malformed\": %ld, \"cpu_s\": %.3f}\n",
           labelled, label_messages, events, in_window_samples / measured, in_window_messages / measured, gaps,
           duplicates, unlabelled_tail, from_due.n, flagged_shed, flagged_gap, malformed, cpu);
    zmq_msg_close(&topic);
    zmq_msg_close(&body);
    zmq_close(sub);
    zmq_ctx_term(ctx);
    return 0;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s send|receive ENDPOINT --streams N --seconds S [--rate HZ] [--speed X] [--chunk C] [--channels K]\n"
            "       [--prefix P] [--lookahead L] [--warmup W] [--connections G] [--declare HZ] [--partitioned]\n",
            argv0);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 3) usage(argv[0]);
    const char *role = argv[1];
    Load l = {.endpoint = argv[2], .prefix = "bench-", .rate = 250, .speed = 1, .chunk = 10, .channels = 16,
              .connections = 1, .declare = -1};
    static struct option opts[] = {
        {"streams", 1, 0, 'n'}, {"seconds", 1, 0, 's'}, {"rate", 1, 0, 'r'}, {"speed", 1, 0, 'x'}, {"chunk", 1, 0, 'c'},
        {"channels", 1, 0, 'k'}, {"prefix", 1, 0, 'p'}, {"lookahead", 1, 0, 'l'}, {"warmup", 1, 0, 'w'},
        {"connections", 1, 0, 'g'}, {"declare", 1, 0, 'd'}, {"partitioned", 0, 0, 'P'}, {0}};
    optind = 3;
    for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (c) {
        case 'n': l.streams = atol(optarg); break;
        case 's': l.seconds = atof(optarg); break;
        case 'r': l.rate = atof(optarg); break;
        case 'x': l.speed = atof(optarg); break;
        case 'c': l.chunk = atoi(optarg); break;
        case 'k': l.channels = atoi(optarg); break;
        case 'p': l.prefix = optarg; break;
        case 'l': l.lookahead = atoi(optarg); break;
        case 'w': l.warmup = atof(optarg); break;
        case 'g': l.connections = atoi(optarg); break;
        case 'd': l.declare = atof(optarg); break;
        case 'P': l.partitioned = 1; break;
        default: usage(argv[0]);
        }
    }
    if (l.streams < 1 || l.streams > 99999 || l.seconds <= 0 || l.rate <= 0 || l.speed <= 0 || l.chunk < 1 || l.channels < 1 ||
        l.connections < 1 || l.connections > 4096 || strlen(l.prefix) > 200) {
        fprintf(stderr, "loadgen: need 1 <= --streams <= 99999, positive --seconds, --rate, --speed, --chunk, --channels "
                        "and a --prefix of at most 200 bytes\n");
        return 2;
    }
    if (strcmp(role, "send") == 0) return send_load(&l);
    if (strcmp(role, "receive") == 0) return receive_labels(&l);
    usage(argv[0]);
}
