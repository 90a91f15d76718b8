/* dsclient_example.c — the whole libdsclient cycle: connect, submit token ids, stream tokens
 * with a callback, cancel a second job mid-stream, generate from text up to a stop string,
 * ask for status, close.
 * Build: cc dsclient_example.c $(pkg-config --cflags --libs dsclient) -o dsclient_example
 * Run:   ./dsclient_example tcp://127.0.0.1:7101 */
#include <stdio.h>
#include <stdlib.h>

#include <ds_client.h>

static int print_token(void *ctx, const ds_client_token *t)
{
    (void)ctx;
    if (t->has_id)
        printf("token %u%s\n", t->id, t->last ? " (last)" : "");
    return 0; /* non-zero would cancel the job */
}

int main(int argc, char **argv)
{
    const char *ep = argc > 1 ? argv[1] : "tcp://127.0.0.1:7101";
    ds_client_opts opts = {.timeout_ms = 10000};
    ds_client *c;
    if (ds_client_connect(ep, &opts, &c) < 0)
        return 1;
    uint32_t prompt[] = {5, 6, 7};
    ds_client_request req = {.tokens = prompt, .n_tokens = 3, .max_tokens = 8, .seed = 1};
    int rc = ds_client_generate(c, &req, print_token, NULL, NULL); /* callback mode */
    if (rc < 0)
        fprintf(stderr, "generate: %s\n", ds_client_error(c));
    uint64_t job; /* pull mode, cancelled after the first token */
    req.max_tokens = 100;
    if (rc == 0 && (rc = ds_client_submit(c, &req, &job)) == 0) {
        ds_client_token t;
        for (int n = 0; ds_client_next(c, job, &t, -1) == 0 && !t.last; n++)
            if (n == 0)
                ds_client_cancel(c, job);
        printf("second job ended: %s\n", t.finish_reason);
    }
    /* text in, text out: the coordinator tokenizes, decodes, and stops at the stop string */
    const char *stops[] = {"\n"};
    ds_client_request text = {.prompt = "The meaning of life is", .max_tokens = 32, .seed = 1,
                              .stop = stops, .n_stop = 1};
    if (rc == 0 && (rc = ds_client_submit(c, &text, &job)) == 0) {
        ds_client_token t;
        while (ds_client_next(c, job, &t, -1) == 0) {
            fwrite(t.text, 1, t.text_len, stdout);
            if (t.last)
                break;
        }
        printf("\n(ended: %s)\n", t.finish_reason);
    }
    char *status = NULL;
    if (rc == 0 && ds_client_status(c, "status", &status) == 0)
        printf("status: %s\n", status);
    free(status);
    ds_client_close(c);
    return rc < 0 ? 1 : 0;
}
