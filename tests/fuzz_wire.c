/* fuzz_wire.c — arbitrary bytes through the wire's only door. Seeds are valid envelopes of
 * several body types built in code, so mutations explore near-valid messages. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ds_wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Dsd__Envelope *env = NULL;
    ds_error err = {0};
    if (ds_wire_unpack(data, size, &env, &err) == 0) {
        for (size_t i = 0; i < env->n_tensors; i++)
            (void)ds_wire_tensor_bytes(env->tensors[i]);
        (void)ds_wire_body_name(env);
        ds_wire_free(env);
    }
    return 0;
}

static size_t push(Dsd__Envelope *env, uint8_t **bufs, size_t *sizes, size_t n, size_t max)
{
    if (n >= max)
        return n;
    size_t len;
    if (ds_wire_pack(env, &bufs[n], &len) == 0)
        sizes[n++] = len;
    return n;
}

size_t ds_fuzz_seeds(uint8_t **bufs, size_t *sizes, size_t max)
{
    size_t n = 0;
    uint32_t shape[] = {2, 64};
    Dsd__TensorDesc td = DSD__TENSOR_DESC__INIT;
    td.dtype = DSD__DTYPE__DTYPE_BF16;
    td.n_shape = 2;
    td.shape = shape;
    Dsd__TensorDesc *tds[] = {&td};

    Dsd__Envelope env = DSD__ENVELOPE__INIT;
    Dsd__Hello hello = DSD__HELLO__INIT;
    hello.node = "n1";
    hello.data_endpoint = "tcp://127.0.0.1:9";
    env.body_case = DSD__ENVELOPE__BODY_HELLO;
    env.hello = &hello;
    n = push(&env, bufs, sizes, n, max);

    Dsd__DispatchHeader d = DSD__DISPATCH_HEADER__INIT;
    uint32_t rows[] = {0, 1}, experts[] = {5, 7};
    float w[] = {0.5f, 0.25f};
    d.layer = 3;
    d.rows = 2;
    d.n_pair_rows = d.n_pair_experts = d.n_pair_weights = 2;
    d.pair_rows = rows;
    d.pair_experts = experts;
    d.pair_weights = w;
    env = (Dsd__Envelope)DSD__ENVELOPE__INIT;
    env.body_case = DSD__ENVELOPE__BODY_DISPATCH;
    env.dispatch = &d;
    env.n_tensor_frames = 1;
    env.n_tensors = 1;
    env.tensors = tds;
    n = push(&env, bufs, sizes, n, max);

    Dsd__Submit s = DSD__SUBMIT__INIT;
    Dsd__Sampling samp = DSD__SAMPLING__INIT;
    samp.temperature = 0.7f;
    s.prompt = "The meaning of life is";
    s.sampling = &samp;
    s.max_tokens = 16;
    env = (Dsd__Envelope)DSD__ENVELOPE__INIT;
    env.body_case = DSD__ENVELOPE__BODY_SUBMIT;
    env.submit = &s;
    n = push(&env, bufs, sizes, n, max);

    Dsd__StepHeader st = DSD__STEP_HEADER__INIT;
    uint64_t seqs[] = {1, 2};
    uint32_t pos[] = {0, 9};
    st.n_seq_ids = 2;
    st.seq_ids = seqs;
    st.n_positions = 2;
    st.positions = pos;
    st.unit = "attn[1]";
    env = (Dsd__Envelope)DSD__ENVELOPE__INIT;
    env.body_case = DSD__ENVELOPE__BODY_STEP;
    env.step = &st;
    env.n_tensor_frames = 1;
    env.n_tensors = 1;
    env.tensors = tds;
    n = push(&env, bufs, sizes, n, max);
    return n;
}
