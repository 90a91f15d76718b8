/* dsctl_generate_plan.h — `dsctl generate --local --plan FILE` (dsctl_generate_plan.c): the
 * units of one process on the devices a `dsctl plan --json` plan names. */
#ifndef DSCTL_GENERATE_PLAN_H
#define DSCTL_GENERATE_PLAN_H

#include <stdio.h>

#include "ds_engine.h"
#include "ds_model.h"

typedef struct gen_plan gen_plan;

/* Reads plan FILE and uploads each unit to the device it names (m, model_dir, pool borrowed;
 * they must outlive the result). -EINVAL for a plan that is not one of this model's (the
 * message names the file and the entry), -ENOTSUP for experts split over devices. */
int gen_plan_load(const char *path, const ds_model *m, const char *model_dir, ds_pool *pool,
                  gen_plan **ret, ds_error *err);
/* The engine runs its units through the plan's devices (free the engine before the plan). */
void gen_plan_install(gen_plan *gp, ds_engine *e);
/* One line saying what runs where. */
void gen_plan_describe(const gen_plan *gp, FILE *f);
gen_plan *gen_plan_free(gen_plan *gp);

#endif
