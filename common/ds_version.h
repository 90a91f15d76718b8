/* ds_version.h — the dsd version. */
#ifndef DS_VERSION_H
#define DS_VERSION_H
#define DS_VERSION_STRING "0.1.0"
const char *ds_version(void);
#endif
