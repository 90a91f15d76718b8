/* dsctl_placement_table.h — the human table of `dsctl placement`, apart from the socket so it
 * can be tested on a hand-written status reply (tests/test_dsctl_placement.c). */
#ifndef DSCTL_PLACEMENT_TABLE_H
#define DSCTL_PLACEMENT_TABLE_H

#include <stdbool.h>
#include <stdio.h>

#include <jansson.h>

/* Writes the table for the coordinator's "placement" reply `pl` ({"plan", "measured",
 * "coordinator_units", "predicted"}; any of them may be missing or null) to f: the plan
 * line, the per-layer unit map (only layer only_layer when >= 0), the per-link table, then the
 * predicted-vs-measured section per node/device and per link. Missing numbers print as "-".
 * Borrows pl. */
void dsctl_placement_print(FILE *f, json_t *pl, long only_layer, bool explain);

#endif
