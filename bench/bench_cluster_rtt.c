/* bench_cluster_rtt.c — the floor under the cluster's per-layer routing cost: a raw ZeroMQ
 * DEALER -> ROUTER -> DEALER round trip on loopback carrying one activation frame of
 * [rows, hidden] f32 each way, no protobuf, no compute. Prints the median in microseconds.
 * usage: bench_cluster_rtt ROWS HIDDEN [ITERATIONS] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

struct echo_arg {
    void *ctx;
    int iters;
};

static void *echo(void *p)
{
    struct echo_arg *a = p;
    void *s = zmq_socket(a->ctx, ZMQ_ROUTER);
    zmq_bind(s, "tcp://127.0.0.1:29977");
    for (int i = 0; i < a->iters + 1; i++) { /* +1: the warm-up */
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        zmq_msg_init(&body);
        zmq_msg_recv(&id, s, 0);
        zmq_msg_recv(&body, s, 0);
        zmq_msg_send(&id, s, ZMQ_SNDMORE);
        zmq_msg_send(&body, s, 0);
    }
    zmq_close(s);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_cluster_rtt ROWS HIDDEN [ITERATIONS]\n");
        return 2;
    }
    int rows = atoi(argv[1]), hidden = atoi(argv[2]), iters = argc > 3 ? atoi(argv[3]) : 2000;
    if (rows < 1 || hidden < 1 || iters < 1 || iters > 1000000 || (long)rows * hidden > (1 << 26))
        return 2;
    void *ctx = zmq_ctx_new();
    struct echo_arg a = {ctx, iters};
    pthread_t th;
    pthread_create(&th, NULL, echo, &a);
    void *d = zmq_socket(ctx, ZMQ_DEALER);
    zmq_connect(d, "tcp://127.0.0.1:29977");
    size_t bytes = (size_t)rows * hidden * sizeof(float);
    float *buf = calloc((size_t)rows * hidden, sizeof(float));
    double *t = malloc((size_t)iters * sizeof(double));
    zmq_send(d, buf, bytes, 0);
    zmq_recv(d, buf, bytes, 0);
    for (int i = 0; i < iters; i++) {
        double t0 = now_s();
        zmq_send(d, buf, bytes, 0);
        zmq_recv(d, buf, bytes, 0);
        t[i] = now_s() - t0;
    }
    pthread_join(th, NULL);
    qsort(t, (size_t)iters, sizeof(double), cmp);
    printf("raw_zmq_rtt_us %.2f\n", t[iters / 2] * 1e6);
    free(buf);
    free(t);
    zmq_close(d);
    zmq_ctx_term(ctx);
    return 0;
}
