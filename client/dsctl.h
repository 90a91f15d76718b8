/* dsctl.h — how a dsctl subcommand registers itself.
 *
 * Each subcommand lives in its own file client/dsctl_<name>.c and ends with
 *     DSCTL_COMMAND(name, "one-line summary", fn);
 * which places a descriptor in the "dsctl_cmds" linker section; dsctl.c walks that section.
 * fn(argc, argv) gets argv[0] == the subcommand name and returns the process exit status:
 *   0 success, 1 runtime failure (cannot reach the coordinator, I/O error), 2 usage error or
 *   invalid input (bad flags, malformed file, infeasible plan), 3 not found (unknown node/job). */
#ifndef DSCTL_H
#define DSCTL_H

#include <stddef.h>
#include <stdint.h>

enum {
    DSCTL_EXIT_OK = 0,
    DSCTL_EXIT_FAILURE = 1,
    DSCTL_EXIT_USAGE = 2,
    DSCTL_EXIT_NOT_FOUND = 3,
};

/* "1.5" within [lo, hi] -> *out; -EINVAL otherwise (dsctl_util.c). */
int dsctl_parse_num(const char *s, double lo, double hi, double *out);
/* "3,17,42" -> *out (malloc'd) of *n ids, each <= max_value, at most max_count of them;
 * -EINVAL for anything else (empty, negative, stray characters), -ENOMEM. */
int dsctl_parse_ids(const char *s, uint32_t max_value, size_t max_count, uint32_t **out,
                    size_t *n);

struct dsctl_command {
    const char *name;
    const char *summary;
    int (*run)(int argc, char **argv);
};

#define DSCTL_COMMAND(n, s, fn)                                                               \
    static const struct dsctl_command dsctl_cmd_##n                                           \
        __attribute__((used, section("dsctl_cmds"), aligned(sizeof(void *)))) = {#n, s, fn}

#endif
