/* dsd_net.c — one wire message = [peer identity,] envelope, raw tensor frames.
 *
 * dsd_msg_recv always drains every part of a multipart message, so a refused message can
 * never leave stray frames that would be read as the next message. Tensor frames stay in their
 * zmq_msg_t (no copy); handlers read them in place after the size checks here. */
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ds_log.h"
#include "dsd.h"

uint64_t dsd_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static bool more(void *sock)
{
    int m = 0;
    size_t sz = sizeof(m);
    return zmq_getsockopt(sock, ZMQ_RCVMORE, &m, &sz) == 0 && m;
}

static void drain_rest(void *sock)
{
    /* bounded by the message: zmq delivers multipart messages atomically */
    while (more(sock)) {
        zmq_msg_t x;
        zmq_msg_init(&x);
        zmq_msg_recv(&x, sock, 0);
        zmq_msg_close(&x);
    }
}

int dsd_msg_recv(void *sock, bool router, size_t max_envelope, dsd_msg *m, ds_error *err)
{
    memset(m, 0, sizeof(*m));
    zmq_msg_t part;
    if (router) {
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&part);
            return -EAGAIN;
        }
        size_t n = zmq_msg_size(&part);
        if (n > DSD_MAX_PEER_ID)
            n = DSD_MAX_PEER_ID;
        memcpy(m->peer, zmq_msg_data(&part), n);
        m->peer_len = n;
        zmq_msg_close(&part);
        if (!more(sock)) {
            m->refused = DSD__ERROR_CODE__ERROR_CODE_MALFORMED;
            return ds_error_set(err, -EPROTO, "empty message");
        }
    }
    zmq_msg_init(&part);
    if (zmq_msg_recv(&part, sock, router ? 0 : ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&part);
        return -EAGAIN;
    }
    size_t len = zmq_msg_size(&part);
    int rc;
    const char *uid = zmq_msg_gets(&part, "User-Id");
    snprintf(m->user_id, sizeof(m->user_id), "%s", uid ? uid : "");
    if (len > max_envelope) {
        zmq_msg_close(&part);
        drain_rest(sock);
        m->refused = DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE;
        return ds_error_set(err, -EPROTO, "envelope of %zu bytes exceeds the %zu byte limit", len,
                            max_envelope);
    }
    rc = ds_wire_unpack(zmq_msg_data(&part), len, &m->env, err);
    if (rc < 0) {
        /* Tell a peer speaking another version that this is why (it may be well formed). */
        Dsd__Envelope *raw = dsd__envelope__unpack(NULL, len, zmq_msg_data(&part));
        m->refused = raw && raw->protocol_version != DS_PROTOCOL_VERSION
                         ? DSD__ERROR_CODE__ERROR_CODE_VERSION
                     : rc == -EMSGSIZE ? DSD__ERROR_CODE__ERROR_CODE_TOO_LARGE
                                       : DSD__ERROR_CODE__ERROR_CODE_MALFORMED;
        if (raw)
            dsd__envelope__free_unpacked(raw, NULL);
        zmq_msg_close(&part);
        drain_rest(sock);
        return -EPROTO;
    }
    zmq_msg_close(&part);
    while (more(sock)) {
        if (m->n_frames >= m->env->n_tensor_frames) {
            drain_rest(sock);
            rc = ds_error_set(err, -EPROTO, "%s: more frames than the %u announced",
                              ds_wire_body_name(m->env), m->env->n_tensor_frames);
            goto refuse;
        }
        zmq_msg_t *f = &m->frames[m->n_frames];
        zmq_msg_init(f);
        zmq_msg_recv(f, sock, 0);
        m->n_frames++;
        int64_t want = ds_wire_tensor_bytes(m->env->tensors[m->n_frames - 1]);
        if (want < 0 || (size_t)want != zmq_msg_size(f)) {
            drain_rest(sock);
            rc = ds_error_set(
                err, -EPROTO, "%s: tensor frame %u has %zu bytes, descriptor says %lld",
                ds_wire_body_name(m->env), m->n_frames - 1, zmq_msg_size(f), (long long)want);
            goto refuse;
        }
    }
    if (m->n_frames != m->env->n_tensor_frames) {
        rc = ds_error_set(err, -EPROTO, "%s: %u tensor frames announced, %u received",
                          ds_wire_body_name(m->env), m->env->n_tensor_frames, m->n_frames);
        goto refuse;
    }
    return 0;
refuse:
    m->refused = DSD__ERROR_CODE__ERROR_CODE_MALFORMED;
    for (uint32_t i = 0; i < m->n_frames; i++)
        zmq_msg_close(&m->frames[i]);
    m->n_frames = 0;
    ds_wire_free(m->env);
    m->env = NULL;
    return rc;
}

void dsd_msg_close(dsd_msg *m)
{
    for (uint32_t i = 0; i < m->n_frames; i++) {
        zmq_msg_close(&m->frames[i]);
        free(m->aligned[i]);
        m->aligned[i] = NULL;
    }
    m->n_frames = 0;
    if (m->env)
        ds_wire_free(m->env);
    m->env = NULL;
}

const void *dsd_msg_frame(dsd_msg *m, uint32_t i, size_t *len)
{
    if (i >= m->n_frames)
        return NULL;
    zmq_msg_t *f = &m->frames[i];
    size_t n = zmq_msg_size(f);
    if (len)
        *len = n;
    void *d = zmq_msg_data(f);
    if (!((uintptr_t)d & 15))
        return d;
    if (!m->aligned[i]) {
        m->aligned[i] = aligned_alloc(16, (n + 15) & ~(size_t)15);
        if (!m->aligned[i])
            return NULL;
        memcpy(m->aligned[i], d, n);
    }
    return m->aligned[i];
}

static void frame_free(void *data, void *hint)
{
    (void)hint;
    free(data);
}

int dsd_send(void *sock, const void *peer, size_t peer_len, Dsd__Envelope *env, void **frames,
             const size_t *sizes, uint32_t n_frames)
{
    uint8_t *buf;
    size_t len;
    env->n_tensor_frames = n_frames;
    int rc = ds_wire_pack(env, &buf, &len);
    if (rc < 0) {
        for (uint32_t i = 0; i < n_frames; i++)
            free(frames[i]);
        return rc;
    }
    if (peer && zmq_send(sock, peer, peer_len, ZMQ_SNDMORE) < 0) {
        rc = -zmq_errno();
        free(buf);
        return rc;
    }
    rc = zmq_send(sock, buf, len, n_frames ? ZMQ_SNDMORE : 0) < 0 ? -zmq_errno() : 0;
    free(buf);
    for (uint32_t i = 0; i < n_frames; i++) {
        if (rc < 0) {
            free(frames[i]);
            frames[i] = NULL;
            continue;
        }
        zmq_msg_t f;
        /* zero copy: zmq owns the buffer from here and frees it once it is on the wire */
        zmq_msg_init_data(&f, frames[i], sizes[i], frame_free, NULL);
        frames[i] = NULL;
        if (zmq_msg_send(&f, sock, i + 1 < n_frames ? ZMQ_SNDMORE : 0) < 0) {
            rc = -zmq_errno();
            zmq_msg_close(&f);
        }
    }
    return rc;
}

int dsd_send_error(void *sock, const void *peer, size_t peer_len, uint64_t request_id,
                   Dsd__ErrorCode code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Error e = DSD__ERROR__INIT;
    e.code = code;
    e.message = msg;
    env.request_id = request_id;
    env.body_case = DSD__ENVELOPE__BODY_ERROR;
    env.error = &e;
    return dsd_send(sock, peer, peer_len, &env, NULL, NULL, 0);
}

void dsd_tensor_desc(Dsd__TensorDesc *td, uint32_t *shape_buf, Dsd__Dtype dt, uint32_t d0,
                     uint32_t d1)
{
    dsd__tensor_desc__init(td);
    td->dtype = dt;
    shape_buf[0] = d0;
    shape_buf[1] = d1;
    td->n_shape = 2;
    td->shape = shape_buf;
}
