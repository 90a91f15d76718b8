// llama_greedy.cpp — llama.cpp's greedy tokens (and logits) for fixed prompt token ids, the
// reference for tests/test_gguf_model.c (tools/gen_gguf_model_ref.sh builds and runs it).
// Reference data only: dsd never links llama.cpp.
//
//   llama_greedy MODEL.gguf --tokens 0,17,42 -n N [--logits-out FILE]
//       prints "tokens: a,b,c" (N greedy ids; EOS does not stop it) and writes float32 rows of
//       n_vocab logits: the last prompt position, then each decode step but the last
//   llama_greedy MODEL.gguf --text TEXT
//       prints "tokens: ..." = llama.cpp's tokenisation (BOS as the file says, specials parsed)
#include "llama.h"

#include <clocale>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void set_tokens(llama_batch_ext *b, const llama_token *t, int32_t n, llama_pos p0)
{
    llama_batch_ext_clear(b);
    for (int32_t i = 0; i < n; ++i) {
        const int32_t idx = llama_batch_ext_add_token(b, 0, t[i]);
        const llama_pos pos = p0 + i;
        llama_batch_ext_set_pos(b, idx, &pos);
    }
    llama_batch_ext_set_output_logits(b, n - 1, true);
}

static void quiet(enum ggml_log_level level, const char *text, void *)
{
    if (level == GGML_LOG_LEVEL_ERROR)
        fputs(text, stderr);
}

int main(int argc, char **argv)
{
    std::setlocale(LC_NUMERIC, "C");
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL --tokens IDS -n N [--logits-out F] | MODEL --text T\n",
                argv[0]);
        return 2;
    }
    const char *path = argv[1], *logits_out = nullptr, *text = nullptr;
    std::vector<llama_token> prompt;
    int n_predict = 16;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--tokens")) {
            for (char *s = argv[i + 1]; *s;) {
                prompt.push_back((llama_token)strtol(s, &s, 10));
                if (*s == ',')
                    s++;
            }
        } else if (!strcmp(argv[i], "-n")) {
            n_predict = atoi(argv[i + 1]);
        } else if (!strcmp(argv[i], "--logits-out")) {
            logits_out = argv[i + 1];
        } else if (!strcmp(argv[i], "--text")) {
            text = argv[i + 1];
        } else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    // Plain CPU buffers: no repacked or AMX weight layouts. With them, a -march=native build on
    // an AVX-512 + AMX Xeon aborts for every one of these models while reserving the
    // flash-attention probe graph (ggml-backend.cpp: GGML_ASSERT(*cur_backend_id != -1)); without
    // them every matmul takes ggml's plain vec_dot path, whatever the CPU.
    mp.use_extra_bufts = false;
    llama_model *model = llama_model_load_from_file(path, mp);
    if (!model)
        return 1;
    const llama_vocab *vocab = llama_model_get_vocab(model);
    if (text) {
        int n = -llama_tokenize(vocab, text, (int32_t)strlen(text), nullptr, 0, true, true);
        std::vector<llama_token> ids(n);
        if (llama_tokenize(vocab, text, (int32_t)strlen(text), ids.data(), n, true, true) < 0)
            return 1;
        printf("tokens: ");
        for (int i = 0; i < n; i++)
            printf("%s%d", i ? "," : "", ids[i]);
        printf("\n");
        return 0;
    }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    const int n_prompt = (int)prompt.size();
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_predict;
    cp.n_batch = n_prompt;
    cp.n_threads = cp.n_threads_batch = 2;
    llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx)
        return 1;
    FILE *lf = logits_out ? fopen(logits_out, "wb") : nullptr;
    llama_batch_ext *batch = llama_batch_ext_init(ctx);
    set_tokens(batch, prompt.data(), n_prompt, 0);
    std::vector<llama_token> out;
    int pos = 0, n_batch = n_prompt;
    while ((int)out.size() < n_predict) {
        if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch))
            return 1;
        pos += n_batch;
        const float *lg = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int v = 1; v < n_vocab; v++)
            if (lg[v] > lg[best])
                best = v;
        out.push_back(best);
        if (lf &&
            fwrite(lg, sizeof(float), n_vocab, lf) != (size_t)n_vocab)
            return 1;
        llama_token t = best;
        set_tokens(batch, &t, 1, pos);
        n_batch = 1;
    }
    if (lf)
        fclose(lf);
    printf("tokens: ");
    for (size_t i = 0; i < out.size(); i++)
        printf("%s%d", i ? "," : "", out[i]);
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
