#!/usr/bin/env python3
"""zmtp_peer.py — a hostile ZeroMQ peer for the robustness tests, written from the ZMTP 3.0
spec (rfc.zeromq.org/spec/23, NULL mechanism) and the wire schema (proto/dsd.proto) with no
ZeroMQ library, so it can send what libzmq never would: a frame header announcing 8 GiB, a
hello with an impossible profile, a step opening thousands of sequences.

  zmtp_peer.py bigframe HOST PORT MIB         announce an 8 GiB frame, then send MIB MiB of it;
                                              prints "closed after N MiB" or "accepted N MiB"
  zmtp_peer.py hello HOST PORT NAME FLOPS [DIGEST]
                                              a Hello (device cpu0, 1 GiB); prints the reply
  zmtp_peer.py step HOST PORT PLAN LAYER ROWS HIDDEN [IDENTITY] [FIRST_ID] [RID]
                                              a StepHeader of ROWS new sequences (ids FIRST_ID..)
                                              at position 0; prints the reply ("none" if none)
  zmtp_peer.py flood HOST PORT PLAN LAYERS HIDDEN RIDS SEQS STOPFILE SECONDS
                                              forged head results, errors, steps over running
                                              jobs' sequences and cancels, until STOPFILE exists
Replies are printed as "error CODE: MESSAGE", "welcome", or the body's field number."""
import socket
import struct
import sys


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wt):
    return varint(field << 3 | wt)


def f_varint(field, n):
    return key(field, 0) + varint(n)


def f_bytes(field, b):
    if isinstance(b, str):
        b = b.encode()
    return key(field, 2) + varint(len(b)) + b


def f_double(field, x):
    return key(field, 1) + struct.pack("<d", x)


def f_packed(field, values):
    return f_bytes(field, b"".join(varint(v) for v in values))


def read_varint(b, i):
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def fields(b):
    """{field: [values]} of one protobuf message (varints as ints, others as bytes)."""
    out, i = {}, 0
    while i < len(b):
        k, i = read_varint(b, i)
        f, wt = k >> 3, k & 7
        if wt == 0:
            v, i = read_varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 2:
            n, i = read_varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError("wire type %d" % wt)
        out.setdefault(f, []).append(v)
    return out


class Peer:
    def __init__(self, host, port, identity=b""):
        self.s = socket.create_connection((host, int(port)), timeout=10)
        greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
        self.s.sendall(greeting + b"\0" + b"\0" * 31)
        self.recv_exact(64)
        props = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        if identity:
            props += b"\x08Identity" + struct.pack(">I", len(identity)) + identity
        self.send_frame(b"\x05READY" + props, command=True)
        flags, body = self.recv_frame()
        if not flags & 4 or not body.startswith(b"\x05READY"):
            raise IOError("no READY from the peer")

    def recv_exact(self, n):
        b = bytearray()
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return bytes(b)

    def send_frame(self, body, more=False, command=False):
        flags = (1 if more else 0) | (4 if command else 0)
        if len(body) > 255:
            self.s.sendall(bytes([flags | 2]) + struct.pack(">Q", len(body)) + body)
        else:
            self.s.sendall(bytes([flags, len(body)]) + body)

    def recv_frame(self):
        flags = self.recv_exact(1)[0]
        n = struct.unpack(">Q", self.recv_exact(8))[0] if flags & 2 else self.recv_exact(1)[0]
        return flags, self.recv_exact(n)

    def recv_message(self):
        parts = []
        while True:
            flags, body = self.recv_frame()
            if flags & 4:
                continue  # a command (PING, ...)
            parts.append(body)
            if not flags & 1:
                return parts


def envelope(body_field, body, tensors=(), request_id=0):
    e = f_varint(1, 1) + f_varint(2, request_id) + f_varint(3, len(tensors))
    for dtype, shape in tensors:
        e += f_bytes(4, f_varint(1, dtype) + f_packed(2, shape))
    return e + f_bytes(body_field, body)


def describe(parts):
    env = fields(parts[0])
    if 40 in env:
        err = fields(env[40][0])
        return "error %d: %s" % (err.get(1, [0])[0], err.get(2, [b""])[0].decode(errors="replace"))
    if 11 in env:
        return "welcome"
    return "body %s" % ",".join(str(f) for f in env if f >= 10)


def reply(p, timeout):
    p.s.settimeout(timeout)
    try:
        return describe(p.recv_message())
    except (socket.timeout, EOFError):
        return "none"


def main(argv):
    cmd, host, port = argv[1], argv[2], argv[3]
    if cmd == "bigframe":
        mib = int(argv[4])
        p = Peer(host, port)
        sent = 0
        try:
            p.s.sendall(b"\x02" + struct.pack(">Q", 8 << 30))
            chunk = b"\0" * (1 << 20)
            p.s.settimeout(2)
            for _ in range(mib):
                p.s.sendall(chunk)
                sent += 1
        except (OSError, socket.timeout):
            print("closed after %d MiB" % sent)
            return 0
        print("accepted %d MiB" % sent)
        return 0
    if cmd == "hello":
        name, flops = argv[4], float(argv[5])
        digest = argv[6] if len(argv) > 6 else ""
        dev = (f_bytes(1, "cpu0") + f_bytes(2, "cpu") + f_bytes(3, "server") +
               f_varint(4, 1 << 30) + f_double(5, 1e10) + f_double(6, flops))
        hello = (f_bytes(1, name) + f_bytes(2, "tcp://127.0.0.1:9") + f_bytes(3, dev) +
                 f_bytes(4, "server") + f_varint(5, 1))
        if digest:
            hello += f_bytes(6, digest)
        p = Peer(host, port, name.encode())
        p.send_frame(envelope(10, hello, request_id=1))
        print(reply(p, 5))
        return 0
    if cmd == "step":
        plan, layer, rows, hidden = (int(x) for x in argv[4:8])
        ident = argv[8].encode() if len(argv) > 8 and argv[8] != "-" else b""
        first = int(argv[9]) if len(argv) > 9 else 1 << 40
        rid = int(argv[10]) if len(argv) > 10 else 1 << 50
        step = (f_varint(1, 1) + f_varint(2, plan) + f_varint(3, layer) +
                f_bytes(4, "attn[%d]" % layer) + f_packed(5, range(first, first + rows)) +
                f_packed(6, [0] * rows))
        p = Peer(host, port, ident)
        p.send_frame(envelope(20, step, tensors=[(1, [rows, hidden])], request_id=rid),
                     more=True)
        p.send_frame(struct.pack("<f", 0.5) * (rows * hidden))
        print(reply(p, 10))
        return 0
    if cmd == "flood":
        # FLOOD: until the file STOP exists (at most SECONDS), forged results for the head
        # (layer LAYERS, one row) and errors for every request id 1..RIDS, and steps at layer
        # 0..LAYERS-1 for sequences 1..SEQS at positions 0 and 3 (a job's KV cache overwritten)
        plan, layers, hidden, rids, seqs = (int(x) for x in argv[4:9])
        stop, seconds = argv[9], float(argv[10])
        import os
        import time
        p = Peer(host, port)
        p.s.setblocking(True)
        sent, t_end = 0, time.time() + seconds
        row = struct.pack("<f", 3.0) * hidden
        while time.time() < t_end and not os.path.exists(stop):
            for rid in range(1, rids + 1):
                head = (f_varint(1, rid) + f_varint(2, plan) + f_varint(3, layers) +
                        f_bytes(4, "head") + f_packed(5, [1]) + f_packed(6, [0]))
                p.send_frame(envelope(20, head, tensors=[(1, [1, hidden])], request_id=rid),
                             more=True)
                p.send_frame(row)
                err = f_varint(1, 7) + f_bytes(2, "forged failure")
                p.send_frame(envelope(40, err, request_id=rid))
                sent += 2
            for layer in range(layers):
                for seq in range(1, seqs + 1):
                    for pos in (0, 3):
                        st = (f_varint(1, 1) + f_varint(2, plan) + f_varint(3, layer) +
                              f_bytes(4, "attn[%d]" % layer) + f_packed(5, [seq]) +
                              f_packed(6, [pos]))
                        p.send_frame(envelope(20, st, tensors=[(1, [1, hidden])],
                                              request_id=1 << 40), more=True)
                        p.send_frame(row)
                        sent += 1
                cancel = f_varint(1, layer + 1)
                p.send_frame(envelope(32, cancel))
                sent += 1
        print("sent %d forged messages" % sent)
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
