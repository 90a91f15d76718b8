/* ds_keyfile.h — CURVE key files shared by dsd and dsctl (docs/operations.md, "Securing a
 * cluster"). A key file is text, `key = value` lines, blank lines and # comments:
 *     public = <40 Z85 characters>
 *     secret = <40 Z85 characters>
 * `dsctl keygen` writes one (mode 0600). A file holding a secret must not be readable by group
 * or others. Only the text is checked here (no libzmq): that the secret matches the public
 * key is checked by the daemon, which has libzmq. */
#ifndef DS_KEYFILE_H
#define DS_KEYFILE_H

#include <stdbool.h>

#include "ds_err.h"

#define DS_KEY_Z85_LEN 40 /* a 32-byte CURVE key in Z85 */

/* true when s is exactly DS_KEY_Z85_LEN characters of the Z85 alphabet. */
bool ds_key_is_z85(const char *s);

/* Reads the key file at path into pub and sec (each DS_KEY_Z85_LEN + 1 bytes). need_secret:
 * the secret is required and the file is refused when group or others may read it (mode &
 * 077: -EACCES). A missing public line leaves pub "" (the caller may derive it). -EBADMSG for a
 * malformed line or key; err names the file and line. pub and sec are written only on
 * success. */
int ds_keyfile_read(const char *path, bool need_secret, char *pub, char *sec, ds_error *err);

/* Writes "public = ..\nsecret = ..\n" to path, created with mode 0600 (O_EXCL: an existing
 * file is never overwritten, -EEXIST). */
int ds_keyfile_write(const char *path, const char *pub, const char *sec, ds_error *err);

/* Strips leading blanks and trailing blanks/newlines in place; returns the start. (The line
 * reader of key files, authorized_keys and dsd.conf.) */
char *ds_trim(char *s);

#endif
