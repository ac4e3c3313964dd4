"""The bare relay: SUB -> decode -> re-encode -> PUB, with no model.

It is the transport ceiling of ``sigclassd bench``: the same sockets, the same
poll-and-drain loop, the same protocol-v1 decoding and one label message per
gateway message (all-zero probabilities and labels, stamped with the time it was
received as the daemon stamps ``ingress_ns``), so whatever the daemon
does beyond this costs it throughput and latency that the relay does not pay.

Run it alone with ``python -m sigclassd.bench.relay --input EP --output EP``; it
prints one JSON line ``{"event": "ready", ...}`` once both sockets are bound and
stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import zmq

from sigclassd import protocol
from sigclassd.errors import FrameError
from sigclassd.stopflag import StopFlag

DRAIN_MAX = 20_000


class Relay:
    """Both sockets of the relay; ``turn`` moves what is queued, ``close`` ends it."""

    def __init__(self, ctx: zmq.Context, input_endpoint: str, output_endpoint: str, n_classes: int = 2) -> None:
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.bind(input_endpoint)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(output_endpoint)
        self.input = self.sub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.output = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.n_classes = n_classes
        # One zero block per message length, made once: the relay's output costs encoding, not allocation.
        self.zeros: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def turn(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for a message, relay everything queued; return how many were relayed."""
        if not self.sub.poll(timeout_ms):
            return 0
        recv, send = self.sub.recv_multipart, self.pub.send
        more = int(zmq.SNDMORE)  # two sends with an int flag cost a third of send_multipart
        decode, encode = protocol.decode_samples, protocol.encode_labels
        clock = time.time_ns
        moved = 0
        while moved < DRAIN_MAX:
            try:
                parts = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            ingress_ns = clock()
            try:
                frame = decode(parts)
            except FrameError:
                continue
            n = len(frame.samples)
            block = self.zeros.get(n)
            if block is None:
                block = self.zeros[n] = (np.zeros((n, self.n_classes), np.float32), np.zeros(n, np.uint8))
            topic, body = encode(parts[0], block[0], block[1], frame.seq, t0_ns=frame.t0_ns, ingress_ns=ingress_ns)
            send(topic, more)
            send(body)
            moved += 1
        return moved

    def close(self) -> None:
        self.sub.close(linger=0)
        self.pub.close(linger=0)


def serve(input_endpoint: str, output_endpoint: str, ready: object = None) -> int:
    """Relay until SIGTERM/SIGINT. ``ready`` is called with the bound endpoints once serving."""
    stop = StopFlag()
    ctx = zmq.Context()
    relay = Relay(ctx, input_endpoint, output_endpoint)
    try:
        if callable(ready):
            ready(relay.input, relay.output)
        while not stop.requested:
            relay.turn(50)
    finally:
        relay.close()
        ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sigclassd.bench.relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="endpoint the SUB socket binds, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--output", required=True, help="endpoint the PUB socket binds, e.g. tcp://127.0.0.1:5556")
    args = p.parse_args(argv)

    def announce(inp: str, out: str) -> None:
        print(json.dumps({"event": "ready", "input": inp, "output": out}), flush=True)

    return serve(args.input, args.output, announce)


if __name__ == "__main__":
    sys.exit(main())
