/* dsctl_util.c — argument parsing the dsctl subcommands share (declared in dsctl.h). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

#include "dsctl.h"

int dsctl_parse_num(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double d = strtod(s, &end);
    if (end == s || *end || errno || !(d >= lo && d <= hi))
        return -EINVAL;
    *out = d;
    return 0;
}

int dsctl_parse_ids(const char *s, uint32_t max_value, size_t max_count, uint32_t **out,
                    size_t *n)
{
    size_t cap = 16, k = 0;
    uint32_t *v = malloc(cap * sizeof(*v));
    if (!v)
        return -ENOMEM;
    while (*s) {
        char *end;
        errno = 0;
        unsigned long long x = strtoull(s, &end, 10);
        if (end == s || *s == '-' || errno || x > max_value || (*end && *end != ',') ||
            k >= max_count) {
            free(v);
            return -EINVAL;
        }
        if (k == cap) {
            uint32_t *nv = realloc(v, (cap *= 2) * sizeof(*v));
            if (!nv) {
                free(v);
                return -ENOMEM;
            }
            v = nv;
        }
        v[k++] = (uint32_t)x;
        s = *end ? end + 1 : end;
    }
    if (!k) {
        free(v);
        return -EINVAL;
    }
    *out = v;
    *n = k;
    return 0;
}
