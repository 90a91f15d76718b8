/* dsctl_keygen.c — `dsctl keygen [--out FILE]`: make a CURVE key pair, the cluster key of
 * dsd (curve_secret_key_file) or a client's own key (DSD_CLIENT_KEY), in the key file format
 * of common/ds_keyfile.h. No daemon involved. */
#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include <zmq.h>

#include "ds_keyfile.h"
#include "dsctl.h"

static int cmd_keygen(int argc, char **argv)
{
    static const struct option opts[] = {{"out", required_argument, NULL, 'o'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *out = NULL;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        if (ch == 'o') {
            out = optarg;
        } else {
            FILE *f = ch == 'h' ? stdout : stderr;
            fprintf(f, "usage: dsctl keygen [--out FILE]\n"
                       "  make a CURVE key pair: 'public = KEY' and 'secret = KEY' (Z85)\n"
                       "  --out FILE  write it to FILE (created 0600, never overwritten) and\n"
                       "              print only the public line; default: print both\n");
            return ch == 'h' ? DSCTL_EXIT_OK : DSCTL_EXIT_USAGE;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "usage: dsctl keygen [--out FILE]\n");
        return DSCTL_EXIT_USAGE;
    }
    char pub[DS_KEY_Z85_LEN + 1], sec[DS_KEY_Z85_LEN + 1];
    if (!zmq_has("curve") || zmq_curve_keypair(pub, sec) < 0) {
        fprintf(stderr, "dsctl keygen: this libzmq has no CURVE support\n");
        return DSCTL_EXIT_FAILURE;
    }
    int rc = 0;
    if (out) {
        ds_error err = {0};
        if ((rc = ds_keyfile_write(out, pub, sec, &err)) < 0)
            fprintf(stderr, "dsctl keygen: %s\n", ds_error_str(&err));
        else
            printf("public = %s\n", pub);
    } else {
        printf("public = %s\nsecret = %s\n", pub, sec);
    }
    memset(sec, 0, sizeof(sec));
    return rc < 0 ? DSCTL_EXIT_FAILURE : DSCTL_EXIT_OK;
}

DSCTL_COMMAND(keygen, "make a CURVE key pair (cluster key or client key)", cmd_keygen);
