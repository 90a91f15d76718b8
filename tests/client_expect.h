/* client_expect.h — cmocka helper shared by the tests that drive a real coordinator through
 * libdsclient (include after <cmocka.h> and "ds_client.h"). */
#ifndef CLIENT_EXPECT_H
#define CLIENT_EXPECT_H

/* Submits token ids `prompt` (greedy, seed 1, n tokens) on c and checks that the stream
 * brings exactly want[0..n), the last one flagged last with finish_reason "length". */
static inline void expect_stream(ds_client *c, const uint32_t *prompt, size_t n_prompt,
                                 const uint32_t *want, int n)
{
    ds_client_request r = {
        .tokens = prompt, .n_tokens = n_prompt, .max_tokens = (uint32_t)n, .seed = 1};
    uint64_t job;
    assert_int_equal(ds_client_submit(c, &r, &job), 0);
    for (int i = 0; i < n; i++) {
        ds_client_token t;
        assert_int_equal(ds_client_next(c, job, &t, -1), 0);
        assert_true(t.has_id);
        assert_int_equal(t.id, want[i]);
        assert_int_equal(t.last, i == n - 1);
        if (t.last)
            assert_string_equal(t.finish_reason, "length");
    }
}

#endif
