"""Per-message cost of each stage from ``recv`` to ``send``, stateful mode, real sockets and the real model.

Each turn, a sender process publishes one message (10 samples, 16 channels, 250 Hz) per stream
per ``--per`` to the daemon's own input socket (``sigclassd.ingest.Ingest``, TCP on loopback),
waits until they are queued, and this process then runs the daemon's turn one stage at a time:

| stage | code |
|---|---|
| recv | ``Ingest.drain``: the messages out of the socket into Python |
| decode | ``protocol.decode_batch`` |
| append | ``Core.accept``: frames into the streams' buffers, admission, the serving order |
| plan | ``Core.collect``: the batch's input and gathered states |
| engine | ``StatefulEngine.run`` on the bundled model |
| complete | ``Core.complete``: label runs, cursors, states written back |
| encode | ``protocol.label_body`` per label run |
| send | ``LabelPublisher.send_many`` to a connected consumer |

The daemon's metrics updates around these are not in it. Each figure is the wall time of the stage over
the timed turns (the first ``--warm`` turns, which open the streams, left out) divided by the messages
received, in microseconds; the process's CPU time over the same stages is printed beside it. The machine's
load average is printed before and after: on a busy machine the figures are high.

    .venv/bin/python bench/stage_costs.py [--streams 1000] [--per 1] [--turns 20]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection

import numpy as np

STAGES = ("recv", "decode", "append", "plan", "engine", "complete", "encode", "send")


class Laps:
    """Wall and main-thread CPU seconds per stage, each ``lap`` charging the time since the last one."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(STAGES, 0.0)
        self.cpu = dict.fromkeys(STAGES, 0.0)
        self.clock, self.cpu_clock = time.perf_counter(), time.thread_time()

    def lap(self, stage: str) -> None:
        now, now_cpu = time.perf_counter(), time.thread_time()
        self.wall[stage] += now - self.clock
        self.cpu[stage] += now_cpu - self.cpu_clock
        self.clock, self.cpu_clock = now, now_cpu


def sender(endpoint: str, streams: int, per: int, turns: int, pipe: Connection) -> None:
    """Publish ``per`` messages per stream each time the parent asks, sequence numbers continuing."""
    import zmq

    from sigclassd import protocol

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(endpoint)
    x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    pipe.send("connected")
    while pipe.recv() == "probe":  # until the daemon's socket has the subscription, a PUB drops
        pub.send_multipart([b"probe", b""])
        pipe.send("sent")
    seq = 0
    for turn in range(turns):
        # Encoded before the parent's clock starts: the gateway's cost is not the daemon's.
        messages = []
        for _ in range(per):
            messages += [protocol.encode_samples(f"s/{i}", x, seq, sample_rate_hz=250.0) for i in range(streams)]
            seq += 10
        if turn and pipe.recv() != "go":
            break
        for message in messages:
            pub.send_multipart(message)
        pipe.send(len(messages))
    pipe.recv()
    pub.close(linger=0)
    ctx.term()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--per", type=int, default=1, help="messages per stream per turn (default: %(default)s)")
    parser.add_argument("--turns", type=int, default=20, help="timed turns (default: %(default)s)")
    parser.add_argument("--warm", type=int, default=3, help="turns left out at the start (default: %(default)s)")
    args = parser.parse_args()

    import zmq
    from prometheus_client import CollectorRegistry

    from sigclassd import protocol
    from sigclassd.artifact import default_model_path, read_artifact
    from sigclassd.config import InputSettings, ModelSettings, OutputSettings, Settings
    from sigclassd.core import build_core
    from sigclassd.engine.stateful import StatefulEngine
    from sigclassd.ingest import Ingest
    from sigclassd.metrics import Metrics
    from sigclassd.publish import LabelPublisher

    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    artifact = read_artifact(default_model_path())
    meta = artifact.meta
    engine = StatefulEngine.load(artifact, max_batch=max(1024, args.streams))
    engine.warm_up()
    settings = Settings(model=ModelSettings(mode="stateful", max_batch_streams=max(1024, args.streams)),
                        input=InputSettings(bind=("tcp://127.0.0.1:*",), rcvhwm=0),
                        output=OutputSettings(bind="tcp://127.0.0.1:*"))
    core = build_core(settings, meta, engine, Metrics(CollectorRegistry(), process=False))
    ctx = zmq.Context()
    ingest = Ingest(ctx, settings.input)
    publisher = LabelPublisher(ctx, settings.output)
    consumer = ctx.socket(zmq.SUB)
    consumer.setsockopt(zmq.RCVHWM, 0)
    consumer.setsockopt(zmq.SUBSCRIBE, b"")
    consumer.connect(publisher.endpoint)

    turns = args.warm + args.turns
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=sender, args=(ingest.endpoints[0], args.streams, args.per, turns,
                                                                child))
    proc.start()
    parent.recv()
    while True:
        parent.send("probe")
        parent.recv()
        if ingest.drain(0.2)[0]:
            break
    time.sleep(0.1)
    ingest.drain(0.0)  # any later probe
    parent.send("ready")
    wall = dict.fromkeys(STAGES, 0.0)
    cpu = dict.fromkeys(STAGES, 0.0)
    received = labelled = 0
    model_id = artifact.model_id
    for turn in range(turns):
        if turn:
            parent.send("go")
        sent = parent.recv()
        time.sleep(0.2 + sent * 5e-6)  # until the I/O thread has queued them all
        laps = Laps()
        lap = laps.lap
        messages: list[list[bytes]] = []
        while len(messages) < sent:
            got, arrived = ingest.drain(1.0)
            if not got:
                msg = f"turn {turn}: {len(messages)} of {sent} messages arrived"
                raise SystemExit(msg)
            messages += got
        lap("recv")
        frames = protocol.decode_batch(messages, n_channels=meta.channels, max_abs=1e6)
        lap("decode")
        core.accept(frames, arrived)
        lap("append")
        samples = 0
        while True:
            batch = core.collect()
            lap("plan")
            if batch is None:
                break
            probs, state = engine.run(batch.x, batch.lengths, batch.state)
            lap("engine")
            runs = core.complete(batch, probs, state)
            lap("complete")
            bodies = [protocol.label_body(r.probabilities, r.labels, r.seq, r.t0_ns, model_id, r.flags, r.gap,
                                          r.ingress_ns) for r in runs]
            lap("encode")
            publisher.send_many([r.topic for r in runs], bodies)
            lap("send")
            samples += sum(len(r.labels) for r in runs)
        while True:  # the consumer keeps up, untimed
            try:
                consumer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
        if turn >= args.warm:
            received += len(messages)
            labelled += samples
            for stage in STAGES:
                wall[stage] += laps.wall[stage]
                cpu[stage] += laps.cpu[stage]
    parent.send("stop")
    proc.join(10)
    print(f"\nStateful, bundled model, {args.streams:,} streams x {args.per} message(s) of 10 samples per turn, "
          f"{args.turns} turns: {received:,} messages, {labelled:,} samples labelled\n")
    total, total_cpu = sum(wall.values()), sum(cpu.values())
    print("| stage | us per message (wall) | us per message (CPU) | share |\n|---|---:|---:|---:|")
    for stage in STAGES:
        print(f"| {stage} | {1e6 * wall[stage] / received:.2f} | {1e6 * cpu[stage] / received:.2f} | "
              f"{100 * wall[stage] / total:.0f} % |")
    print(f"| **recv to send** | **{1e6 * total / received:.2f}** | **{1e6 * total_cpu / received:.2f}** | |")
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    consumer.close(linger=0)
    ingest.close()
    publisher.socket.close(linger=0)
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
