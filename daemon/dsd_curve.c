/* dsd_curve.c — CURVE authentication and encryption of every TCP socket of the daemon
 * (docs/operations.md, "Securing a cluster").
 *
 * Design: ONE cluster key pair, shared by every node (curve_secret_key_file). Each node is the
 * CURVE server on its ROUTERs (control, data, client) with the cluster secret, and the CURVE
 * client of its peers (control DEALER to the coordinator, data DEALERs to every peer) with the
 * cluster key pair and the cluster public key as server key. A node therefore needs no list of
 * the other nodes' keys, and a node's identity towards another is "holds the cluster secret".
 * Clients (libdsclient, dsctl) hold their own key pairs and only the cluster public key.
 *
 * A ZAP handler (inproc://zeromq.zap.01, a REP socket served by one thread) runs whenever CURVE
 * is on and decides per ZAP domain: on the control and data sockets ("cluster") only the
 * cluster public key may connect, so a client that knows the public key cannot pose as a node;
 * on the client socket ("client") any key may connect when curve_authorized_keys is empty, else
 * only the listed keys (and the cluster key, held by the operators of the nodes). Refusals are
 * logged with the key and counted.
 *
 * State: one per process (the key pair is the process's identity), written by
 * dsd_curve_start before any socket exists and read-only afterwards, except the refusal
 * counter (atomic), so the event loop, the data thread and the ZAP thread read it freely. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "ds_keyfile.h"
#include "ds_log.h"
#include "dsd.h"

#define ZAP_ENDPOINT  "inproc://zeromq.zap.01"
#define MAX_AUTH_KEYS 4096 /* lines of curve_authorized_keys */

static struct {
    bool on;
    char pub[DS_KEY_Z85_LEN + 1], sec[DS_KEY_Z85_LEN + 1]; /* the cluster key pair */
    uint8_t pub_bin[32];
    uint8_t (*auth)[32]; /* [n_auth] authorized client keys; NULL = any client key */
    size_t n_auth;
    uint8_t (*ops)[32]; /* [n_ops] operator keys (curve_operator_keys); NULL = every client */
    size_t n_ops;
    void *zap; /* the ZAP REP socket (owned by the thread once it runs) */
    pthread_t thread;
    bool thread_started;
    atomic_uint_fast64_t refused;
} g;

/* Reads curve_authorized_keys: one Z85 public key a line, optionally followed by a # comment;
 * lines starting with # are comments ('#' is a Z85 character too, so a 40-character Z85 line
 * is a key even when it starts with '#'). */
static int load_keys(const char *opt, const char *path, uint8_t (**keys)[32], size_t *n_keys,
                     ds_error *err)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return ds_error_set(err, -errno, "option %s: %s: %s", opt, path, strerror(errno));
    char line[512];
    unsigned ln = 0;
    int rc = 0;
    while (fgets(line, sizeof(line), f)) {
        ln++;
        char *l = ds_trim(line);
        char *sp = l + strcspn(l, " \t");
        char *rest = *sp ? ds_trim(sp + 1) : sp;
        *sp = 0;
        if (!*l || (*l == '#' && !ds_key_is_z85(l)))
            continue;
        if (!ds_key_is_z85(l) || (*rest && *rest != '#')) {
            rc = ds_error_set(err, -EBADMSG,
                              "%s:%u: expected one Z85 public key (40 characters) per line", path,
                              ln);
            break;
        }
        if (*n_keys >= MAX_AUTH_KEYS) {
            rc = ds_error_set(err, -ERANGE, "%s:%u: more than %d keys", path, ln, MAX_AUTH_KEYS);
            break;
        }
        void *grown = realloc(*keys, (*n_keys + 1) * sizeof(**keys));
        if (!grown) {
            rc = ds_error_set(err, -ENOMEM, "%s: out of memory", path);
            break;
        }
        *keys = grown;
        zmq_z85_decode((*keys)[(*n_keys)++], l);
    }
    fclose(f);
    if (rc == 0 && *n_keys == 0)
        rc = ds_error_set(err, -EBADMSG, "%s: no keys (leave %s empty instead)", path, opt);
    return rc;
}

static bool key_in(const uint8_t (*keys)[32], size_t n, const uint8_t *key)
{
    for (size_t i = 0; i < n; i++)
        if (!memcmp(key, keys[i], 32))
            return true;
    return false;
}

/* The role of an admitted client key: "operator" (may also drain, undrain and replan) or
 * "client" (submit, cancel, status). */
static const char *key_role(const uint8_t *key)
{
    if (!memcmp(key, g.pub_bin, 32) || !g.ops || key_in((const uint8_t(*)[32])g.ops, g.n_ops, key))
        return DSD_ROLE_OPERATOR;
    return DSD_ROLE_CLIENT;
}

static bool key_authorized(const char *domain, const uint8_t *key)
{
    if (!memcmp(key, g.pub_bin, 32))
        return true; /* a node (or an operator holding the cluster key) */
    if (strcmp(domain, DSD_CURVE_DOMAIN_CLIENT))
        return false; /* control/data: nodes only */
    if (!g.auth)
        return true;
    /* an operator key is a client key too */
    return key_in((const uint8_t(*)[32])g.auth, g.n_auth, key) ||
           key_in((const uint8_t(*)[32])g.ops, g.n_ops, key);
}

/* The ZAP protocol (RFC 27): request version, request id, domain, address, routing id,
 * mechanism, credentials...; reply version, request id, status code, status text, user id,
 * metadata. */
static void *zap_main(void *arg)
{
    (void)arg;
    for (;;) {
        zmq_msg_t f[8];
        int n = 0;
        bool more = true, failed = false;
        while (more) {
            zmq_msg_t extra, *m = n < 8 ? &f[n] : &extra; /* frames past ZAP's are dropped */
            zmq_msg_init(m);
            if (zmq_msg_recv(m, g.zap, 0) < 0) {
                zmq_msg_close(m);
                failed = true;
                break;
            }
            more = zmq_msg_more(m);
            if (n < 8)
                n++;
            else
                zmq_msg_close(m);
        }
        if (failed) {
            for (int i = 0; i < n; i++)
                zmq_msg_close(&f[i]);
            if (zmq_errno() == ETERM)
                break; /* zmq_ctx_term: the daemon is stopping */
            continue;
        }
        char domain[64] = "", address[64] = "", mech[16] = "";
#define COPY(dst, i)                                                                               \
    snprintf(dst, sizeof(dst), "%.*s", (int)(n > (i) ? zmq_msg_size(&f[i]) : 0),                   \
             n > (i) ? (const char *)zmq_msg_data(&f[i]) : "")
        COPY(domain, 2);
        COPY(address, 3);
        COPY(mech, 5);
#undef COPY
        const char *code = "400", *text = "not authorized", *user = "";
        char z85[DS_KEY_Z85_LEN + 1] = "?";
        if (n >= 7 && !strcmp(mech, "CURVE") && zmq_msg_size(&f[6]) == 32) {
            const uint8_t *key = zmq_msg_data(&f[6]);
            zmq_z85_encode(z85, key, 32);
            if (key_authorized(domain, key)) {
                code = "200", text = "OK";
                /* the connection's User-Id: what each message on it may do */
                user = strcmp(domain, DSD_CURVE_DOMAIN_CLIENT) ? DSD_ROLE_OPERATOR : key_role(key);
            }
        }
        if (*code != '2') {
            uint64_t k = atomic_fetch_add(&g.refused, 1) + 1;
            ds_log_warn("curve: refused key %s from %s on the %s socket (%llu refused so far)", z85,
                        address, domain[0] ? domain : "?", (unsigned long long)k);
        }
        /* reply: echo version and request id, then the verdict */
        zmq_send(g.zap, "1.0", 3, ZMQ_SNDMORE);
        zmq_send(g.zap, n > 1 ? zmq_msg_data(&f[1]) : "", n > 1 ? zmq_msg_size(&f[1]) : 0,
                 ZMQ_SNDMORE);
        zmq_send(g.zap, code, 3, ZMQ_SNDMORE);
        zmq_send(g.zap, text, strlen(text), ZMQ_SNDMORE);
        zmq_send(g.zap, user, strlen(user), ZMQ_SNDMORE); /* user id: the role */
        zmq_send(g.zap, "", 0, 0);           /* metadata */
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
    }
    zmq_close(g.zap);
    g.zap = NULL;
    return NULL;
}

int dsd_curve_start(void *zctx, const dsd_opts *o, ds_error *err)
{
    if (!o->curve_secret_key_file[0])
        return 0;
    if (!zmq_has("curve"))
        return ds_error_set(err, -ENOTSUP,
                            "option curve_secret_key_file: this libzmq has no "
                            "CURVE support (built without libsodium)");
    char pub[DS_KEY_Z85_LEN + 1], sec[DS_KEY_Z85_LEN + 1], derived[DS_KEY_Z85_LEN + 1];
    int rc = ds_keyfile_read(o->curve_secret_key_file, true, pub, sec, err);
    if (rc < 0) {
        ds_error_prefix(err, "option curve_secret_key_file");
        return rc;
    }
    if (zmq_curve_public(derived, sec) < 0)
        return ds_error_set(err, -EBADMSG, "option curve_secret_key_file: %s: bad secret key",
                            o->curve_secret_key_file);
    if (pub[0] && strcmp(pub, derived))
        return ds_error_set(err, -EBADMSG,
                            "option curve_secret_key_file: %s: the public key is not the one of "
                            "the secret key",
                            o->curve_secret_key_file);
    if (o->curve_server_public_key[0] && strcmp(o->curve_server_public_key, derived))
        return ds_error_set(err, -EINVAL,
                            "option curve_server_public_key: %s is not the public key of %s; "
                            "every node uses the one cluster key pair",
                            o->curve_server_public_key, o->curve_secret_key_file);
    memcpy(g.pub, derived, sizeof(g.pub));
    memcpy(g.sec, sec, sizeof(g.sec));
    zmq_z85_decode(g.pub_bin, g.pub);
    if (o->curve_authorized_keys[0] &&
        (rc = load_keys("curve_authorized_keys", o->curve_authorized_keys, &g.auth, &g.n_auth,
                        err)) < 0)
        goto fail;
    if (o->curve_operator_keys[0] &&
        (rc = load_keys("curve_operator_keys", o->curve_operator_keys, &g.ops, &g.n_ops, err)) < 0)
        goto fail;
    /* the handler must be bound before the first CURVE server socket accepts a handshake */
    g.zap = zmq_socket(zctx, ZMQ_REP);
    int zero = 0;
    if (!g.zap || zmq_setsockopt(g.zap, ZMQ_LINGER, &zero, sizeof(zero)) < 0 ||
        zmq_bind(g.zap, ZAP_ENDPOINT) < 0) {
        rc = ds_error_set(err, -EIO, "curve: ZAP handler: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if ((rc = -pthread_create(&g.thread, NULL, zap_main, NULL)) < 0) {
        ds_error_set(err, rc, "curve: ZAP thread: %s", strerror(-rc));
        goto fail;
    }
    g.thread_started = true;
    g.on = true;
    ds_log_notice("curve: on, cluster key %s, %s", g.pub,
                  g.auth ? "listed client keys only" : "any client key");
    return 0;
fail:
    if (g.zap)
        zmq_close(g.zap);
    g.zap = NULL;
    free(g.auth);
    g.auth = NULL;
    g.n_auth = 0;
    free(g.ops);
    g.ops = NULL;
    g.n_ops = 0;
    memset(g.sec, 0, sizeof(g.sec));
    return rc;
}

void dsd_curve_stop(void)
{
    if (g.thread_started)
        pthread_join(g.thread, NULL);
    g.thread_started = false;
    free(g.auth);
    g.auth = NULL;
    g.n_auth = 0;
    memset(g.sec, 0, sizeof(g.sec));
    g.on = false;
}

bool dsd_curve_may_operate(const char *user_id)
{
    /* without CURVE there is no identity to tell a client from an operator */
    return !g.on || !g.ops || !strcmp(user_id, DSD_ROLE_OPERATOR);
}

bool dsd_curve_enabled(void)
{
    return g.on;
}

uint64_t dsd_curve_refused(void)
{
    return atomic_load(&g.refused);
}

int dsd_curve_server(void *sock, const char *domain)
{
    if (!g.on)
        return 0;
    int one = 1;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof(one)) < 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, g.sec, DS_KEY_Z85_LEN) < 0 ||
        zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, domain, strlen(domain)) < 0)
        return -zmq_errno();
    return 0;
}

int dsd_curve_client(void *sock)
{
    if (!g.on)
        return 0;
    if (zmq_setsockopt(sock, ZMQ_CURVE_SERVERKEY, g.pub, DS_KEY_Z85_LEN) < 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_PUBLICKEY, g.pub, DS_KEY_Z85_LEN) < 0 ||
        zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, g.sec, DS_KEY_Z85_LEN) < 0)
        return -zmq_errno();
    return 0;
}
