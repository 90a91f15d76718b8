#!/usr/bin/env python3
"""tcp_proxy.py LISTEN:TARGET [LISTEN:TARGET ...] — a loopback "link" for the chaos test.

Forwards every connection to 127.0.0.1:LISTEN to 127.0.0.1:TARGET, both ways. Stopping the
process (SIGSTOP) cuts the link the way a pulled cable does: the connections stay open and
nothing crosses them; SIGCONT mends it. Runs until killed."""
import select
import socket
import sys


def main(argv):
    listeners = {}
    for spec in argv[1:]:
        lp, tp = (int(x) for x in spec.split(":"))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", lp))
        s.listen(64)
        listeners[s] = tp
    peer = {}  # socket -> the socket it forwards to
    while True:
        r, _, _ = select.select(list(listeners) + list(peer), [], [])
        for s in r:
            if s in listeners:
                c, _ = s.accept()
                try:
                    t = socket.create_connection(("127.0.0.1", listeners[s]), timeout=5)
                except OSError:
                    c.close()
                    continue
                peer[c], peer[t] = t, c
                continue
            if s not in peer:
                continue
            try:
                data = s.recv(1 << 16)
            except OSError:
                data = b""
            other = peer[s]
            if data:
                try:
                    other.sendall(data)
                    continue
                except OSError:
                    pass
            for x in (s, other):
                peer.pop(x, None)
                x.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
