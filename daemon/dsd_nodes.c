/* dsd_nodes.c — the coordinator's member table: finding a member by name or by its control
 * socket identity, and sending it a message. Below membership (dsd_members.c), rollout and the
 * clients subsystem, which all use it. */
#include <errno.h>
#include <string.h>

#include "dsd_loop.h"

struct node *dsd_members_find(struct dsd *d, const char *name, size_t len)
{
    for (uint32_t i = 0; i < d->coord.n_nodes; i++)
        if (strlen(d->coord.nodes[i].name) == len && !memcmp(d->coord.nodes[i].name, name, len))
            return &d->coord.nodes[i];
    return NULL;
}

struct node *dsd_members_find_peer(struct dsd *d, const void *peer, size_t len)
{
    for (uint32_t i = 1; i < d->coord.n_nodes; i++)
        if (d->coord.nodes[i].peer_len == len && !memcmp(d->coord.nodes[i].peer, peer, len))
            return &d->coord.nodes[i];
    return NULL;
}

int dsd_members_send(struct dsd *d, const struct node *n, Dsd__Envelope *env)
{
    if (!n->peer_len)
        return -ENOTCONN;
    return dsd_send(d->control, n->peer, n->peer_len, env, NULL, NULL, 0);
}
