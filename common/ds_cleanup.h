/* ds_cleanup.h — scope-bound cleanup (systemd style): a local declared with _cleanup_free_ is
 * freed when it goes out of scope; steal it with DS_TAKE_PTR to hand ownership on. */
#ifndef DS_CLEANUP_H
#define DS_CLEANUP_H

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static inline void ds_freep(void *p)
{
    free(*(void **)p);
}
static inline void ds_fclosep(FILE **f)
{
    if (*f)
        fclose(*f);
}
static inline void ds_closep(int *fd)
{
    if (*fd >= 0)
        close(*fd);
}

#define _cleanup_(f) __attribute__((cleanup(f)))
#define _cleanup_free_ _cleanup_(ds_freep)
#define _cleanup_fclose_ _cleanup_(ds_fclosep)
#define _cleanup_close_ _cleanup_(ds_closep)

/* Defines ds_<type>_freep for a type with a `T *ds_T_free(T *)` destructor. */
#define DS_DEFINE_CLEANUP(type, freefn)                                                        \
    static inline void freefn##p(type **p)                                                     \
    {                                                                                          \
        if (*p)                                                                                \
            freefn(*p);                                                                        \
    }

/* Returns the pointer and NULLs the variable, so its cleanup no longer frees it. */
#define DS_TAKE_PTR(p)                                                                         \
    ({                                                                                         \
        __typeof__(p) _tmp_ = (p);                                                             \
        (p) = NULL;                                                                            \
        _tmp_;                                                                                 \
    })

#define DS_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define DS_MIN(a, b) ((a) < (b) ? (a) : (b))
#define DS_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
