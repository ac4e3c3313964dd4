/*
 * A minimal sigclassd gateway in C, written from the README's "Wire protocol v1" section only.
 *
 * It publishes N_SAMPLES samples of a sine-plus-noise signal on N_CHANNELS channels for one
 * stream, CHUNK samples per message, as protocol v1 messages: [topic, 32-byte header + payload].
 *
 * Build:  cc -O2 -o gateway gateway.c $(pkg-config --cflags --libs libzmq) -lm
 * Run:    ./gateway tcp://127.0.0.1:5555 my-stream 2000
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#define N_CHANNELS 16
#define CHUNK 10
#define RATE_HZ 250.0f

/* Little-endian stores, so the code is right whatever the host's byte order. */
static void put_u16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static void put_f32(uint8_t *p, float f) { uint32_t v; memcpy(&v, &f, 4); put_u32(p, v); }

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s ENDPOINT STREAM_ID N_SAMPLES\n", argv[0]);
        return 2;
    }
    const char *endpoint = argv[1], *stream = argv[2];
    long total = atol(argv[3]);
    void *ctx = zmq_ctx_new();
    void *pub = zmq_socket(ctx, ZMQ_PUB);
    int linger = 2000;
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(pub, endpoint) != 0) {
        fprintf(stderr, "connect %s: %s\n", endpoint, zmq_strerror(zmq_errno()));
        return 1;
    }
    usleep(500 * 1000); /* PUB drops messages sent before the subscriber has connected */

    uint8_t body[32 + CHUNK * N_CHANNELS * 4];
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    int64_t t0 = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    for (uint64_t seq = 0; seq < (uint64_t)total; seq += CHUNK) {
        uint32_t n = (uint32_t)((uint64_t)total - seq < CHUNK ? (uint64_t)total - seq : CHUNK);
        body[0] = 1;                        /* version */
        body[1] = 1;                        /* dtype: float32 */
        put_u16(body + 2, N_CHANNELS);      /* n_channels */
        put_u32(body + 4, n);               /* n_samples */
        put_u64(body + 8, seq);             /* seq of the first sample */
        put_u64(body + 16, (uint64_t)(t0 + (int64_t)(seq * 1e9 / RATE_HZ))); /* t0_ns */
        put_f32(body + 24, RATE_HZ);        /* sample_rate_hz */
        put_u32(body + 28, seq == 0 ? 1 : 0); /* flags: bit 0 = stream (re)start */
        for (uint32_t i = 0; i < n; i++)
            for (int c = 0; c < N_CHANNELS; c++) {
                double t = (double)(seq + i) / RATE_HZ;
                float v = (float)(sin(2 * M_PI * (5 + c) * t) + 0.1 * ((rand() % 2001) / 1000.0 - 1));
                put_f32(body + 32 + (i * N_CHANNELS + c) * 4, v);
            }
        size_t len = 32 + (size_t)n * N_CHANNELS * 4;
        zmq_send(pub, stream, strlen(stream), ZMQ_SNDMORE);
        zmq_send(pub, body, len, 0);
        usleep((useconds_t)(n * 1e6 / RATE_HZ)); /* real time: the daemon refuses a stream far above its declared rate */
    }
    zmq_close(pub);
    zmq_ctx_term(ctx);
    return 0;
}
