/* quantize.c — which weights --quantize turns into which ggml block type (ds_model.h); the
 * block quantisers themselves are in quant.c. */
#include <errno.h>
#include <strings.h>

#include "ds_model.h"
#include "ds_quant.h"

int ds_quantize_parse(const char *s, enum ds_quantize *q)
{
    if (!strcasecmp(s, "none") || !*s)
        *q = DS_QUANTIZE_NONE;
    else if (!strcasecmp(s, "q8_0"))
        *q = DS_QUANTIZE_Q8_0;
    else if (!strcasecmp(s, "q4_k"))
        *q = DS_QUANTIZE_Q4_K;
    else
        return -EINVAL;
    return 0;
}

const char *ds_quantize_name(enum ds_quantize q)
{
    switch (q) {
    case DS_QUANTIZE_Q8_0:
        return "q8_0";
    case DS_QUANTIZE_Q4_K:
        return "q4_k";
    default:
        return "none";
    }
}

bool ds_quantize_weight_type(enum ds_quantize q, uint32_t src_type, uint64_t cols, uint32_t *out)
{
    if (q == DS_QUANTIZE_NONE)
        return false;
    if (src_type != DS_QUANT_F32 && src_type != DS_QUANT_F16 && src_type != DS_QUANT_BF16 &&
        src_type != DS_QUANTIZE_SRC_F8)
        return false; /* already a block type (or one the loader refuses) */
    if (q == DS_QUANTIZE_Q4_K && cols % 256 == 0) {
        *out = DS_QUANT_Q4_K;
        return true;
    }
    if (cols % 32)
        return false;
    *out = DS_QUANT_Q8_0;
    return true;
}
