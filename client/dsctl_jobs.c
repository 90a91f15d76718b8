/* dsctl_jobs.c — `dsctl jobs`: the coordinator's running jobs. */
#include <stdio.h>

#include <jansson.h>

#include "dsctl.h"

int dsctl_simple_query(int argc, char **argv, const char *what, const char *usage,
                       void (*table)(json_t *));

static void jobs_table(json_t *j)
{
    printf("%-8s %-8s %-8s %-10s %s\n", "JOB", "STATE", "PROMPT", "GENERATED", "MAX");
    size_t i;
    json_t *x;
    json_array_foreach(json_object_get(j, "jobs"), i, x)
        printf("%-8lld %-8s %-8lld %-10lld %lld\n",
               (long long)json_integer_value(json_object_get(x, "id")),
               json_string_value(json_object_get(x, "state")),
               (long long)json_integer_value(json_object_get(x, "prompt_tokens")),
               (long long)json_integer_value(json_object_get(x, "generated")),
               (long long)json_integer_value(json_object_get(x, "max_tokens")));
    printf("running %zu, finished %lld, steps %lld\n", json_array_size(json_object_get(j, "jobs")),
           (long long)json_integer_value(json_object_get(j, "finished")),
           (long long)json_integer_value(json_object_get(j, "steps")));
}

static int cmd_jobs(int argc, char **argv)
{
    return dsctl_simple_query(argc, argv, "jobs",
                              "usage: dsctl jobs [--endpoint E] [--json]\n"
                              "  running jobs on the coordinator\n",
                              jobs_table);
}

DSCTL_COMMAND(jobs, "running jobs", cmd_jobs);
