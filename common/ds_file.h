/* ds_file.h — a whole regular file mapped read-only (the checkpoint readers' one way in). */
#ifndef DS_FILE_H
#define DS_FILE_H

#include <stddef.h>

#include "ds_err.h"

/* Maps the regular, non-empty file at path read-only (MAP_PRIVATE). On success stores the
 * mapping and its size (the caller munmaps it) and returns 0; else a negative errno with an
 * error naming the file (cannot open, not a regular file (-EBADMSG), empty (-EBADMSG), mmap). */
int ds_file_map(const char *path, void **map, size_t *size, ds_error *err);

#endif
