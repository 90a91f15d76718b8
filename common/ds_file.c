/* ds_file.c — see ds_file.h. */
#include "ds_file.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int ds_file_map(const char *path, void **map, size_t *size, ds_error *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return ds_error_set(err, -e, "%s: cannot open: %s", path, strerror(e));
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return ds_error_set(err, -EBADMSG, "%s: not a regular file", path);
    }
    if (sb.st_size == 0) {
        close(fd);
        return ds_error_set(err, -EBADMSG, "%s: empty file", path);
    }
    void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (m == MAP_FAILED)
        return ds_error_set(err, -e, "%s: mmap failed: %s", path, strerror(e));
    *map = m;
    *size = (size_t)sb.st_size;
    return 0;
}
