/* test_http.c — the pure layers of the HTTP API (daemon/dsd_http.h):
 *   - chat templates: dsd_chat_render equals HF transformers' apply_chat_template on every
 *     template of tests/data/chat/ and every conversation (expected.json, made by
 *     tools/gen_chat_ref.py with the shipped tokenizer's bos/eos); each template is
 *     recognised as its family; unknown templates are refused naming chat_template_file;
 *   - request bodies: fields parsed, defaults, and each kind of bad body answered 400 with
 *     the offending field named, in OpenAI's error shape. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "dsd.h"
#include "dsd_http.h"

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    fclose(f);
    if (s) {
        s[n] = 0;
        *len = (size_t)n;
    }
    return s;
}

static int load_template(const char *name, dsd_chat_template *t)
{
    char path[512];
    size_t len = 0;
    snprintf(path, sizeof(path), DS_TEST_DATA "/chat/%s.jinja", name);
    char *text = read_file(path, &len);
    assert_non_null(text);
    ds_error err = {0};
    int rc = dsd_chat_template_detect(text, len, path, t, &err);
    free(text);
    return rc;
}

static void test_chat_matches_hf(void **state)
{
    (void)state;
    json_error_t je;
    json_t *exp = json_load_file(DS_TEST_DATA "/chat/expected.json", 0, &je);
    json_t *convs = json_load_file(DS_TEST_DATA "/chat/conversations.json", 0, &je);
    assert_non_null(exp);
    assert_non_null(convs);
    const char *bos = json_string_value(json_object_get(exp, "bos"));
    const char *eos = json_string_value(json_object_get(exp, "eos"));
    size_t i, n_cases = 0;
    json_t *c;
    json_array_foreach(json_object_get(exp, "cases"), i, c)
    {
        const char *name = json_string_value(json_object_get(c, "template"));
        dsd_chat_template t;
        assert_int_equal(load_template(name, &t), 0);
        json_t *conv =
            json_array_get(convs, (size_t)json_integer_value(json_object_get(c, "conversation")));
        size_t n = json_array_size(conv), k;
        dsd_chat_msg *m = calloc(n, sizeof(*m));
        json_t *x;
        json_array_foreach(conv, k, x)
        {
            m[k].role = json_string_value(json_object_get(x, "role"));
            m[k].content = json_string_value(json_object_get(x, "content"));
        }
        char *out;
        size_t len;
        ds_error err = {0};
        int rc = dsd_chat_render(
            &t, m, n, json_is_true(json_object_get(c, "add_generation_prompt")),
            json_is_true(json_object_get(c, "thinking")), bos, eos, &out, &len, &err);
        if (rc != 0)
            fail_msg("%s conversation %lld: %s", name,
                     (long long)json_integer_value(json_object_get(c, "conversation")),
                     ds_error_str(&err));
        const char *want = json_string_value(json_object_get(c, "text"));
        if (strcmp(out, want) || len != strlen(want))
            fail_msg("%s conversation %lld gen=%d thinking=%d:\n got: %s\nwant: %s", name,
                     (long long)json_integer_value(json_object_get(c, "conversation")),
                     json_is_true(json_object_get(c, "add_generation_prompt")),
                     json_is_true(json_object_get(c, "thinking")), out, want);
        free(out);
        free(m);
        n_cases++;
    }
    assert_true(n_cases >= 100);
    json_decref(exp);
    json_decref(convs);
}

static void test_chat_families(void **state)
{
    (void)state;
    static const struct {
        const char *file;
        enum dsd_chat_family fam;
        bool concat, think_gen, strip;
    } W[] = {
        {"deepseek_v2", DSD_CHAT_FAMILY_V2, false, false, false},
        {"deepseek_v2_5", DSD_CHAT_FAMILY_V3, false, false, false},
        {"deepseek_v3", DSD_CHAT_FAMILY_V3, true, false, false},
        {"deepseek_r1", DSD_CHAT_FAMILY_R1, false, false, true},
        {"deepseek_r1_0528", DSD_CHAT_FAMILY_R1, true, true, true},
        {"deepseek_v3_1", DSD_CHAT_FAMILY_V31, true, false, false},
    };
    for (size_t i = 0; i < sizeof(W) / sizeof(W[0]); i++) {
        dsd_chat_template t;
        assert_int_equal(load_template(W[i].file, &t), 0);
        assert_int_equal(t.family, W[i].fam);
        assert_int_equal(t.system_concat, W[i].concat);
        assert_int_equal(t.gen_think, W[i].think_gen);
        assert_int_equal(t.strip_think, W[i].strip);
    }
    /* a ChatML (Qwen-style) template and nothing at all are refused with the way out */
    const char *chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' "
                         "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
    dsd_chat_template t;
    ds_error err = {0};
    assert_int_equal(
        dsd_chat_template_detect(chatml, strlen(chatml), "m/tokenizer_config.json", &t, &err),
        -ENOTSUP);
    assert_non_null(strstr(ds_error_str(&err), "chat_template_file"));
    assert_non_null(strstr(ds_error_str(&err), "m/tokenizer_config.json"));
    assert_int_equal(dsd_chat_template_detect(NULL, 0, "x", &t, &err), -ENOTSUP);
    assert_non_null(strstr(ds_error_str(&err), "chat_template_file"));
    /* an unknown role is refused, not dropped */
    assert_int_equal(load_template("deepseek_v3", &t), 0);
    dsd_chat_msg m[] = {{"narrator", "x"}};
    char *out;
    size_t len;
    assert_int_equal(dsd_chat_render(&t, m, 1, true, false, "<s>", "</s>", &out, &len, &err),
                     -EINVAL);
    assert_non_null(strstr(ds_error_str(&err), "narrator"));
}

static int parse(enum dsd_http_kind k, const char *body, dsd_http_req *r, dsd_http_error *e)
{
    memset(e, 0, sizeof(*e));
    return dsd_http_req_parse(k, body, strlen(body), r, e);
}

static void test_req_fields(void **state)
{
    (void)state;
    dsd_http_req r;
    dsd_http_error e;
    assert_int_equal(parse(DSD_HTTP_KIND_COMPLETION,
                           "{\"model\":\"m\",\"prompt\":\"hi\",\"max_tokens\":7,\"temperature\":0,"
                           "\"top_p\":0.5,\"top_k\":3,\"seed\":42,\"stop\":[\"a\",\"bc\"],"
                           "\"stream\":true,\"stream_options\":{\"include_usage\":true},\"n\":1,"
                           "\"frequency_penalty\":0,\"user\":\"u\",\"unknown_field\":[1]}",
                           &r, &e),
                     0);
    assert_string_equal(r.model, "m");
    assert_string_equal(r.prompt, "hi");
    assert_int_equal(r.max_tokens, 7);
    assert_true(r.temperature == 0);
    assert_true(r.top_p == 0.5);
    assert_int_equal(r.top_k, 3);
    assert_true(r.has_seed);
    assert_int_equal(r.seed, 42);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[1], "bc");
    assert_true(r.stream && r.include_usage);
    dsd_http_req_clear(&r);
    /* defaults: OpenAI's temperature 1, no max_tokens; a stop string; ids as the prompt */
    assert_int_equal(
        parse(DSD_HTTP_KIND_COMPLETION, "{\"prompt\":[[5,6,7]],\"stop\":\"x\"}", &r, &e), 0);
    assert_true(r.temperature == 1 && r.top_p == 1 && r.max_tokens == 0 && !r.stream);
    assert_int_equal(r.n_prompt_ids, 3);
    assert_int_equal(r.prompt_ids[2], 7);
    assert_int_equal(r.n_stop, 1);
    dsd_http_req_clear(&r);
    /* chat: text parts joined, developer = system, max_completion_tokens */
    assert_int_equal(parse(DSD_HTTP_KIND_CHAT,
                           "{\"messages\":[{\"role\":\"developer\",\"content\":\"s\"},{\"role\":"
                           "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},{\"type\":"
                           "\"text\",\"text\":\"b\"}]}],\"max_completion_tokens\":9}",
                           &r, &e),
                     0);
    assert_int_equal(r.n_messages, 2);
    assert_string_equal(r.messages[0].role, "system");
    assert_string_equal(r.messages[1].content, "ab");
    assert_int_equal(r.max_tokens, 9);
    dsd_http_req_clear(&r);
}

static void test_req_errors(void **state)
{
    (void)state;
    static const struct {
        enum dsd_http_kind k;
        const char *body, *param;
    } B[] = {
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\": ", NULL},
        {DSD_HTTP_KIND_COMPLETION, "[1,2]", NULL},
        {DSD_HTTP_KIND_COMPLETION, "{}", "prompt"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"\"}", "prompt"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":[\"a\",\"b\"]}", "prompt"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":[1,-2]}", "prompt"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":0}", "max_tokens"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"max_tokens\":\"5\"}", "max_tokens"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"temperature\":3}", "temperature"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"top_p\":0}", "top_p"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"n\":2}", "n"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"stop\":\"\"}", "stop"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"stop\":[1]}", "stop"},
        {DSD_HTTP_KIND_COMPLETION,
         "{\"prompt\":\"a\",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\","
         "\"11\",\"12\",\"13\",\"14\",\"15\",\"16\"]}",
         "stop"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"stream\":1}", "stream"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"logprobs\":2}", "logprobs"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"presence_penalty\":0.5}",
         "presence_penalty"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"model\":5}", "model"},
        {DSD_HTTP_KIND_COMPLETION, "{\"prompt\":\"a\",\"prompt\":\"b\"}", NULL},
        {DSD_HTTP_KIND_CHAT, "{\"messages\":[]}", "messages"},
        {DSD_HTTP_KIND_CHAT, "{\"messages\":{}}", "messages"},
        {DSD_HTTP_KIND_CHAT, "{\"messages\":[{\"role\":\"user\"}]}", "messages"},
        {DSD_HTTP_KIND_CHAT, "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", "messages"},
        {DSD_HTTP_KIND_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", "messages"},
        {DSD_HTTP_KIND_CHAT,
         "{\"messages\":[{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{}]}]}",
         "messages"},
        {DSD_HTTP_KIND_CHAT,
         "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":\"function\"}]"
         "}",
         "tools"},
    };
    for (size_t i = 0; i < sizeof(B) / sizeof(B[0]); i++) {
        dsd_http_req r;
        dsd_http_error e;
        if (parse(B[i].k, B[i].body, &r, &e) != -EINVAL)
            fail_msg("accepted: %s", B[i].body);
        assert_int_equal(e.status, 400);
        if (B[i].param && (!e.param || strcmp(e.param, B[i].param)))
            fail_msg("%s: param %s, want %s", B[i].body, e.param ? e.param : "null", B[i].param);
        char *js = dsd_http_error_json(&e);
        json_t *o = json_loads(js, 0, NULL);
        json_t *er = json_object_get(o, "error");
        assert_non_null(json_string_value(json_object_get(er, "message")));
        assert_string_equal(json_string_value(json_object_get(er, "type")),
                            "invalid_request_error");
        assert_true(json_object_get(er, "param") && json_object_get(er, "code"));
        json_decref(o);
        free(js);
    }
}

/* --model as a hub cache entry: the entry directory, or org/name under $HF_HOME/hub, become
 * the newest snapshot; other paths are left alone. */
static void test_hf_cache(void **state)
{
    (void)state;
    char root[] = "/tmp/dsd-hf-XXXXXX", p[512], model[4096];
    assert_non_null(mkdtemp(root));
    const char *dirs[] = {"hub",
                          "hub/models--org--m",
                          "hub/models--org--m/snapshots",
                          "hub/models--org--m/snapshots/aaa",
                          "hub/models--org--m/snapshots/bbb",
                          "hub/models--org--empty",
                          "plain"};
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", root, dirs[i]);
        assert_int_equal(mkdir(p, 0755), 0);
    }
    /* bbb is the newest */
    struct timespec ts[2] = {{.tv_sec = 1000}, {.tv_sec = 1000}};
    snprintf(p, sizeof(p), "%s/hub/models--org--m/snapshots/aaa", root);
    utimensat(AT_FDCWD, p, ts, 0);
    ts[0].tv_sec = ts[1].tv_sec = 2000;
    snprintf(p, sizeof(p), "%s/hub/models--org--m/snapshots/bbb", root);
    utimensat(AT_FDCWD, p, ts, 0);
    ds_error err = {0};
    char repo[128] = "";
    snprintf(model, sizeof(model), "%s/hub/models--org--m/", root);
    assert_int_equal(dsd_model_resolve(model, sizeof(model), repo, sizeof(repo), &err), 1);
    assert_string_equal(model, p);
    assert_string_equal(repo, "org/m");
    setenv("HF_HOME", root, 1);
    unsetenv("HF_HUB_CACHE");
    snprintf(model, sizeof(model), "org/m");
    assert_int_equal(dsd_model_resolve(model, sizeof(model), repo, sizeof(repo), &err), 1);
    assert_string_equal(model, p);
    snprintf(model, sizeof(model), "org/empty");
    assert_int_equal(dsd_model_resolve(model, sizeof(model), repo, sizeof(repo), &err), -ENOENT);
    assert_non_null(strstr(ds_error_str(&err), "snapshot"));
    snprintf(model, sizeof(model), "org/absent"); /* not cached: left alone */
    assert_int_equal(dsd_model_resolve(model, sizeof(model), repo, sizeof(repo), &err), 0);
    assert_string_equal(model, "org/absent");
    snprintf(model, sizeof(model), "%s/plain", root); /* an ordinary directory */
    assert_int_equal(dsd_model_resolve(model, sizeof(model), repo, sizeof(repo), &err), 0);
    snprintf(model, sizeof(model), "/var/lib/dsd/model"); /* a worker without a copy */
    assert_int_equal(dsd_model_resolve(model, sizeof(model), repo, sizeof(repo), &err), 0);
    assert_string_equal(model, "/var/lib/dsd/model");
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", root);
    assert_int_equal(system(cmd), 0);
}

static void put_u32(FILE *f, uint32_t v)
{
    fwrite(&v, 4, 1, f);
}
static void put_u64(FILE *f, uint64_t v)
{
    fwrite(&v, 8, 1, f);
}
static void put_str(FILE *f, const char *s)
{
    put_u64(f, strlen(s));
    fwrite(s, 1, strlen(s), f);
}

/* Where the template comes from: chat_template_file, tokenizer_config.json (a string or the
 * "default" of a list), a GGUF's tokenizer.chat_template (a file written here: GGUF v3, no
 * tensors, two string keys). */
static void test_chat_template_sources(void **state)
{
    (void)state;
    char dir[] = "/tmp/dsd-chat-XXXXXX", p[600], src[700];
    assert_non_null(mkdtemp(dir));
    size_t v3len = 0;
    char *v3 = read_file(DS_TEST_DATA "/chat/deepseek_v3.jinja", &v3len);
    assert_non_null(v3);
    char *text;
    size_t len;
    ds_error err = {0};
    dsd_chat_template t;
    /* GGUF */
    snprintf(p, sizeof(p), "%s/m.gguf", dir);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fwrite("GGUF", 1, 4, f);
    put_u32(f, 3);
    put_u64(f, 0); /* tensors */
    put_u64(f, 2); /* kvs */
    put_str(f, "general.architecture");
    put_u32(f, 8); /* string */
    put_str(f, "deepseek2");
    put_str(f, "tokenizer.chat_template");
    put_u32(f, 8);
    put_str(f, v3);
    fclose(f);
    assert_int_equal(dsd_http_chat_template_find(p, "", &text, &len, src, sizeof(src), &err), 0);
    assert_non_null(text);
    assert_int_equal(len, v3len);
    assert_memory_equal(text, v3, len);
    assert_non_null(strstr(src, "tokenizer.chat_template"));
    assert_int_equal(dsd_chat_template_detect(text, len, src, &t, &err), 0);
    assert_int_equal(t.family, DSD_CHAT_FAMILY_V3);
    free(text);
    /* tokenizer_config.json with a list of named templates */
    json_t *cfg = json_pack("{s:[{s:s,s:s},{s:s,s:s}]}", "chat_template", "name", "tool_use",
                            "template", "x", "name", "default", "template", v3);
    snprintf(p, sizeof(p), "%s/tokenizer_config.json", dir);
    assert_int_equal(json_dump_file(cfg, p, 0), 0);
    json_decref(cfg);
    assert_int_equal(dsd_http_chat_template_find(dir, NULL, &text, &len, src, sizeof(src), &err),
                     0);
    assert_non_null(text);
    assert_string_equal(text, v3);
    free(text);
    /* none at all: no text, no error (chat is then refused, naming chat_template_file) */
    cfg = json_pack("{s:b}", "add_bos_token", 1);
    assert_int_equal(json_dump_file(cfg, p, 0), 0);
    json_decref(cfg);
    assert_int_equal(dsd_http_chat_template_find(dir, NULL, &text, &len, src, sizeof(src), &err),
                     0);
    assert_null(text);
    /* chat_template_file wins; a missing one is an error naming it */
    assert_int_equal(dsd_http_chat_template_find(dir, DS_TEST_DATA "/chat/deepseek_r1.jinja", &text,
                                                 &len, src, sizeof(src), &err),
                     0);
    assert_non_null(strstr(text, "</think>"));
    free(text);
    assert_true(dsd_http_chat_template_find(dir, "/nonexistent/t.jinja", &text, &len, src,
                                            sizeof(src), &err) < 0);
    assert_non_null(strstr(ds_error_str(&err), "chat_template_file /nonexistent/t.jinja"));
    free(v3);
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chat_matches_hf), cmocka_unit_test(test_chat_families),
        cmocka_unit_test(test_req_fields),      cmocka_unit_test(test_req_errors),
        cmocka_unit_test(test_hf_cache),        cmocka_unit_test(test_chat_template_sources),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
