/* test_dsctl_placement.c — the human table of `dsctl placement` (client/dsctl_placement_table.c)
 * on hand-written coordinator replies whose numbers are chosen so every printed figure can be
 * worked out by hand: the historical lines stay, the predicted-vs-measured section shows the
 * solver's busy time per device (summed per node) and per link beside the measured compute and
 * transfer per step, and "-" wherever there is nothing to show (a round-robin plan). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "dsctl_placement_table.h"

/* two layers (layer 1 MoE with 2 experts), coordinator "coord" + worker "w1"; 4 steps run */
static const char *const REPLY_MEASURED =
    "{\"plan\": {\"version\": 3, \"units\": {\"embed\": \"coord\", \"head\": \"coord\","
    "  \"attn[0]\": \"w1\", \"attn[1]\": \"coord\","
    "  \"expert[1][0]\": \"w1\", \"expert[1][1]\": \"coord\"}},"
    " \"measured\": {"
    "  \"units\": {\"attn[0]\": {\"node\": \"w1\", \"measured_compute_s\": 0.008, \"calls\": 4},"
    "             \"attn[1]\": {\"node\": \"coord\", \"measured_compute_s\": 0.004, \"calls\": 4},"
    "             \"expert[1][0]\": {\"node\": \"w1\", \"measured_compute_s\": 0.012, \"rows\": 6},"
    "             \"expert[1][1]\": {\"node\": \"coord\", \"measured_compute_s\": 0.008, \"rows\": 2}},"
    "  \"links\": ["
    "   {\"from\": \"coord\", \"to\": \"w1\", \"latency_s\": 0.0001, \"bandwidth_bytes_per_s\": "
    "1e9,"
    "    \"measured_transfer_s\": 0.002, \"measured_compute_s\": 0.006, \"messages\": 8,"
    "    \"bytes\": 8000000, \"expert_compute_s\": 0.006},"
    "   {\"from\": \"w1\", \"to\": \"coord\", \"latency_s\": 0.0001, \"bandwidth_bytes_per_s\": "
    "1e9,"
    "    \"measured_transfer_s\": 0.001, \"measured_compute_s\": 0.002, \"messages\": 4,"
    "    \"bytes\": 4000000, \"expert_compute_s\": 0.002}],"
    "  \"nodes\": {\"coord\": {}, \"w1\": {}}},"
    " \"coordinator_units\": null,";

static const char *const PREDICTED =
    " \"predicted\": {\"version\": 1, \"solver\": \"heuristic\","
    "  \"predicted\": {\"decode_step_s\": 0.0105, \"decode_tokens_per_s\": 95.2,"
    "                 \"prefill_s_per_1k_tokens\": 1.0, \"bottleneck\": \"w1/cuda0\","
    "                 \"bottleneck_busy_s\": 0.004},"
    "  \"devices\": [{\"device\": \"coord/cpu0\", \"busy_s\": 0.0025},"
    "              {\"device\": \"w1/cpu0\", \"busy_s\": 0.001},"
    "              {\"device\": \"w1/cuda0\", \"busy_s\": 0.004}],"
    "  \"links\": [{\"a\": \"coord\", \"b\": \"w1\", \"bytes_per_step\": 1000000,"
    "             \"seconds_per_step\": 0.0006}]}}";

static char *render(const char *reply, long layer, bool explain)
{
    json_error_t e;
    json_t *j = json_loads(reply, 0, &e);
    if (!j)
        fail_msg("test JSON: %s at line %d col %d", e.text, e.line, e.column);
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    assert_non_null(f);
    dsctl_placement_print(f, j, layer, explain);
    fclose(f);
    json_decref(j);
    return out;
}

static char *concat(const char *a, const char *b)
{
    char *s = malloc(strlen(a) + strlen(b) + 1);
    assert_non_null(s);
    strcpy(s, a);
    strcat(s, b);
    return s;
}

/* the whitespace-separated fields of the line of out that starts with `first` (as its own
 * first field), joined by single spaces, or NULL */
static char *line_fields(const char *out, const char *first)
{
    const char *p = out;
    while (p && *p) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        char line[512];
        snprintf(line, sizeof(line), "%.*s", (int)n, p);
        char norm[512] = "", *save, *tok = strtok_r(line, " ", &save);
        if (tok && !strcmp(tok, first)) {
            for (; tok; tok = strtok_r(NULL, " ", &save)) {
                if (norm[0])
                    strcat(norm, " ");
                strcat(norm, tok);
            }
            return strdup(norm);
        }
        p = eol ? eol + 1 : NULL;
    }
    return NULL;
}

static void expect_line(const char *out, const char *first, const char *want)
{
    char *got = line_fields(out, first);
    if (!got || strcmp(got, want))
        fail_msg("line '%s':\n  want: %s\n  got:  %s\nwhole output:\n%s", first, want,
                 got ? got : "(none)", out);
    free(got);
}

static void test_predicted_beside_measured(void **state)
{
    (void)state;
    char *reply = concat(REPLY_MEASURED, PREDICTED);
    char *out = render(reply, -1, false);
    /* historical lines, unchanged */
    assert_non_null(strstr(out, "plan v3   embed -> coord   head -> coord\n"));
    expect_line(out, "0", "0 w1 2.000 ms/call (dense)");
    expect_line(out, "1", "1 coord 1.000 ms/call 0:w1 1:coord");
    /* 2 x 100 us + 1 MB / 1 GB/s = 1200 us per message; 2 ms / 8 = 250 us measured */
    expect_line(out, "coord->w1", "coord->w1 100.0 us 1000.0 MB/s 1200.0 us 250.0 us 8 6.000 ms");
    /* the new section */
    assert_non_null(strstr(out, "PREDICTED VS MEASURED per decode step (predicted step 10.500 ms, "
                                "bottleneck w1/cuda0, solver heuristic; measured over 4 steps)"));
    expect_line(out, "NODE/DEVICE", "NODE/DEVICE PRED BUSY/STEP MEAS COMPUTE/STEP");
    /* coord: predicted 2.5 ms; measured (4 ms attn[1] + 8 ms expert[1][1]) / 4 steps */
    expect_line(out, "coord", "coord 2.500 ms 3.000 ms");
    expect_line(out, "coord/cpu0", "coord/cpu0 2.500 ms -");
    /* w1: 1 + 4 ms predicted; (8 ms attn[0] + 12 ms expert[1][0]) / 4 steps measured */
    expect_line(out, "w1", "w1 5.000 ms 5.000 ms");
    expect_line(out, "w1/cpu0", "w1/cpu0 1.000 ms -");
    expect_line(out, "w1/cuda0", "w1/cuda0 4.000 ms -");
    /* links, one row per direction: 0.6 ms predicted for the pair; 2 ms and 1 ms / 4 steps
     * measured */
    expect_line(out, "coord=>w1", "coord=>w1 0.600 ms 0.500 ms");
    expect_line(out, "w1=>coord", "w1=>coord 0.600 ms 0.250 ms");
    assert_null(strstr(out, "coord=>coord"));
    assert_null(strstr(out, "why:"));
    free(out);
    free(reply);
}

/* per device: a node's units count on the device the plan gave them (experts on an
 * accelerator), the rest on its CPU engine (its first cpu* device) */
static void test_measured_per_device(void **state)
{
    (void)state;
    const char *reply =
        "{\"plan\": {\"version\": 5, \"units\": {\"embed\": \"coord\", \"head\": \"coord\","
        "  \"attn[0]\": \"w1\", \"expert[0][0]\": \"w1\", \"expert[0][1]\": \"w1\"},"
        "  \"devices\": {\"expert[0][0]\": \"cuda0\"}},"
        " \"measured\": {\"units\": {\"attn[0]\": {\"node\": \"w1\", \"measured_compute_s\": 0.008,"
        "  \"calls\": 4}}, \"links\": [],"
        "  \"nodes\": {\"w1\": {\"units\": {\"attn[0]\": {\"compute_s\": 0.008, \"calls\": 4},"
        "    \"expert[0][0]\": {\"compute_s\": 0.012, \"rows\": 6},"
        "    \"expert[0][1]\": {\"compute_s\": 0.004, \"rows\": 2}}}}},"
        " \"predicted\": {\"solver\": \"heuristic\", \"predicted\": {\"decode_step_s\": 0.005},"
        "  \"devices\": [{\"device\": \"w1/cpu0\", \"busy_s\": 0.002},"
        "              {\"device\": \"w1/cuda0\", \"busy_s\": 0.001}], \"links\": []}}";
    char *out = render(reply, -1, false);
    expect_line(out, "0", "0 w1 2.000 ms/call 0:w1/cuda0 1:w1"); /* 8 ms / 4 calls */
    /* w1: (8 + 12 + 4) ms / 4 steps; cpu0: attn 8 + expert[0][1] 4; cuda0: expert[0][0] 12 */
    expect_line(out, "w1", "w1 3.000 ms 6.000 ms");
    expect_line(out, "w1/cpu0", "w1/cpu0 2.000 ms 3.000 ms");
    expect_line(out, "w1/cuda0", "w1/cuda0 1.000 ms 3.000 ms");
    free(out);
}

/* extra copies of a hot expert appear after its primary node */
static void test_replicas_listed(void **state)
{
    (void)state;
    const char *reply =
        "{\"plan\": {\"version\": 4, \"units\": {\"embed\": \"coord\", \"head\": \"coord\","
        "  \"attn[0]\": \"w1\", \"expert[0][0]\": \"w1\", \"expert[0][1]\": \"coord\"},"
        "  \"replicas\": {\"expert[0][1]\": [\"w1\", \"w2\"]}},"
        " \"measured\": null, \"predicted\": null}";
    char *out = render(reply, -1, false);
    expect_line(out, "0", "0 w1 0.000 ms/call 0:w1 1:coord+w1+w2");
    free(out);
}

static void test_round_robin_plan_prints_dashes(void **state)
{
    (void)state;
    char *reply = concat(REPLY_MEASURED, " \"predicted\": null}");
    char *out = render(reply, 1, true);
    assert_non_null(strstr(out,
                           "PREDICTED VS MEASURED per decode step (predicted step -, no solver "
                           "prediction for this plan; measured over 4 steps)"));
    expect_line(out, "coord", "coord - 3.000 ms");
    expect_line(out, "w1", "w1 - 5.000 ms");
    expect_line(out, "coord=>w1", "coord=>w1 - 0.500 ms");
    assert_null(line_fields(out, "w1/cuda0"));
    /* --layer 1 only */
    assert_null(line_fields(out, "0"));
    expect_line(out, "1", "1 coord 1.000 ms/call 0:w1 1:coord");
    assert_non_null(strstr(out, "\nwhy: "));
    free(out);
    free(reply);
}

static void test_nothing_measured_yet(void **state)
{
    (void)state;
    /* a plan and a prediction but no scheduler statistics yet (measured: null), a node the
     * coordinator has no link to, and a predicted link between two workers */
    const char *reply =
        "{\"plan\": {\"version\": 1, \"units\": {\"embed\": \"coord\", \"head\": \"coord\"}},"
        " \"measured\": null, \"coordinator_units\": null,"
        " \"predicted\": {\"solver\": \"exact-milp\", \"predicted\": {\"decode_step_s\": 0.002},"
        "  \"devices\": [{\"device\": \"w1/cpu0\", \"busy_s\": 0.001},"
        "              {\"device\": \"w2/cpu0\", \"busy_s\": 0.0015}],"
        "  \"links\": [{\"a\": \"w1\", \"b\": \"w2\", \"seconds_per_step\": 0.00025}]}}";
    char *out = render(reply, -1, false);
    assert_non_null(
        strstr(out, "(predicted step 2.000 ms, solver exact-milp; measured over 0 steps)"));
    expect_line(out, "w1", "w1 1.000 ms -");
    expect_line(out, "w2", "w2 1.500 ms -");
    expect_line(out, "w1<->w2", "w1<->w2 0.250 ms -");
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_predicted_beside_measured),
        cmocka_unit_test(test_replicas_listed),
        cmocka_unit_test(test_measured_per_device),
        cmocka_unit_test(test_round_robin_plan_prints_dashes),
        cmocka_unit_test(test_nothing_measured_yet),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
