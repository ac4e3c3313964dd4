"""A gateway simulator speaking protocol v1: N streams at R Hz in chunks of K samples.

Samples come from the synthetic generator or from an ``.npz`` recording
(``X`` [T, C], or ``<run>_X`` arrays), looped. Each stream starts at its own
offset of the source and sends its messages at its own phase of the chunk
period, so that the load is spread evenly over time as real gateways' would be.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from sigclassd.client import Publisher, Stream
from sigclassd.errors import EXIT_CONFIG
from sigclassd.stopflag import StopFlag
from sigclassd.tap import plural

# A few distinct recordings are enough to make streams differ; generating one
# per stream would cost gigabytes at thousands of streams.
POOL = 8


def load_source(source: str, channels: int, rate: float, seed: int, seconds: float = 120.0) -> list[np.ndarray]:
    """Recordings to loop over, each float32 [T, C]."""
    if source == "synthetic":
        from sigclassd.synthetic import make_recording

        n = int(rate * seconds)
        return [make_recording(n, channels=channels, sample_rate_hz=rate, seed=seed + i)[0] for i in range(POOL)]
    path = Path(source)
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        msg = f"cannot read {path}: {e}"
        raise SystemExit(msg) from e
    keys = [k for k in data.files if k == "X" or k.endswith("_X")]
    if not keys:
        msg = f"{path} holds no 'X' or '<run>_X' array"
        raise SystemExit(msg)
    recs = [np.ascontiguousarray(data[k], np.float32) for k in keys]
    if any(r.ndim != 2 for r in recs):
        msg = f"{path}: recordings must be 2-D [T, channels]"
        raise SystemExit(msg)
    return recs


def replay_source(args: argparse.Namespace) -> list[np.ndarray]:
    """``--from FILE``: its samples, played from the start at the file's own rate (``--rate`` if it gives
    none), once: for ``--seconds`` (if given) the recording loops."""
    from sigclassd.replay import read_recording

    rec = read_recording(args.from_file)
    if rec.rate is not None:
        args.rate = rec.rate
    if not args.seconds:
        args.seconds = len(rec.samples) / args.rate
    rate = f"{args.rate:g} Hz" + ("" if rec.rate is not None else " (--rate: the file gives no rate)")
    print(f"replaying {args.from_file}: {rec.source}, {len(rec.samples)} samples x {rec.samples.shape[1]} channels "
          f"at {rate}, {args.seconds:g} s", file=sys.stderr)
    return [rec.samples]


class Source:
    """Where one simulated stream reads its samples: a recording, looped from an offset."""

    __slots__ = ("recording", "pos")

    def __init__(self, recording: np.ndarray, pos: int) -> None:
        self.recording = recording
        self.pos = pos

    def next_chunk(self, k: int) -> np.ndarray:
        """The next ``k`` samples; the recording's last ones are sent too, in a shorter chunk, before it loops."""
        if self.pos >= len(self.recording):
            self.pos = 0
        chunk = self.recording[self.pos : self.pos + k]
        self.pos += len(chunk)
        return chunk


def default_prefix() -> str:
    """Stream ids unique to this run (host and pid), so two simulators never feed the same streams."""
    return f"sim-{socket.gethostname().split('.')[0]}-{os.getpid()}-"


def subscription_note(pub: Publisher, streams: list[Stream], endpoints: str) -> str | None:
    """A line saying which streams no daemon subscribes to (ZeroMQ drops those), or None if all are."""
    unheard = [s.id for s in streams if not pub.is_subscribed(s.id)]
    if not unheard:
        return None
    prefixes = pub.subscribed_prefixes()
    heard_by = (f"the subscribers there take only prefixes {prefixes}" if prefixes
                else "nobody is subscribed there (is the daemon running, and its input bound there?)")
    return (f"simulate: {len(unheard)} of {plural(len(streams), 'stream')} (e.g. {unheard[0]!r}) reach"
            f"{'es' if len(unheard) == 1 else ''} no daemon at "
            f"{endpoints}: {heard_by}; {'its' if len(unheard) == 1 else 'their'} messages are dropped")


def rejections(metrics_url: str) -> dict[str, float] | None:
    """The daemon's message and sample counters by reason (``frames_received``, ``frames_rejected:REASON``,
    ``samples_rejected:REASON``, ``samples_labelled``), or None if its metrics cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as r:
            text = r.read().decode()
        counts = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removeprefix("sigclassd_").removesuffix("_total")
                if name in ("frames_received", "samples_labelled"):
                    counts[name] = sample.value
                elif name in ("frames_rejected", "samples_rejected"):
                    counts[f"{name}:{sample.labels.get('reason', '')}"] = sample.value
    except (OSError, ValueError):
        return None
    return counts


class LabelWatch:
    """Whether labels for this run's streams come back from the daemon, and if not, the likely reason.

    It listens on the daemon's label output for its own stream prefix until the first label arrives,
    and reads the daemon's metrics at the start and when it gives up waiting."""

    def __init__(self, output: str, metrics_url: str, prefix: str, timeout_s: float, channels: int) -> None:
        self.output, self.metrics_url, self.timeout_s, self.channels = output, metrics_url, timeout_s, channels
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        self.sock.connect(output)
        self.before = rejections(metrics_url) if metrics_url else None
        self.deadline = time.monotonic() + timeout_s
        self.done = False

    def poll(self) -> str | None:
        """Once: a line saying that no labels came within the timeout and why; None meanwhile or once they come."""
        if self.done:
            return None
        if self.sock.poll(0):
            self.close()
            return None
        if time.monotonic() < self.deadline:
            return None
        self.close()
        return self.diagnosis()

    def diagnosis(self) -> str:
        head = f"simulate: no labels for these streams after {self.timeout_s:g} s on {self.output}"
        after = rejections(self.metrics_url) if self.metrics_url else None
        if after is None:
            return (f"{head}, and no daemon metrics at {self.metrics_url or '(--metrics not given)'}: is a daemon "
                    "running, with its input.bind where simulate sends and its output.bind where it listens?")
        before = self.before or {}
        delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
        refused = {k: int(v) for k, v in delta.items() if v > 0 and ":" in k}
        if refused:
            reasons = ", ".join(f"{k.split(':', 1)[1]} {v:,} {'messages' if k.startswith('frames') else 'samples'}"
                                for k, v in sorted(refused.items(), key=lambda kv: -kv[1]))
            hint = ""
            if "frames_rejected:channel_mismatch" in refused:
                hint = f" (simulate sends {self.channels} channels: --channels to send as many as the model takes)"
            return f"{head}; the daemon at {self.metrics_url} rejected since simulate started: {reasons}{hint}"
        if delta.get("frames_received", 0) <= 0:
            return (f"{head}; the daemon at {self.metrics_url} received no messages since simulate started: "
                    "is its input.bind where simulate sends, and its input.subscribe taking these stream ids? "
                    "(or is it another daemon: --metrics and --output name the one simulate sends to)")
        if delta.get("samples_labelled", 0) > 0:
            return (f"{head}; the daemon at {self.metrics_url} labels samples, so its labels go elsewhere: "
                    "is its output.bind where simulate listens (--output)?")
        return (f"{head}; the daemon at {self.metrics_url} received messages, rejected none and labelled none "
                "yet: in windowed mode a stream's first labels wait for a full window (see --label-timeout)")

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.sock.close()
            self.ctx.term()


def simulate(args: argparse.Namespace) -> int:
    if args.from_file:
        recs = replay_source(args)
    else:
        recs = load_source(args.source, args.channels, args.rate, args.seed)
    channels = recs[0].shape[1]
    if args.source != "synthetic" and channels != args.channels:
        print(f"note: {args.source} has {channels} channels; sending those", file=sys.stderr)
    if args.lsl:
        from sigclassd.lsl import simulate_outlets

        return simulate_outlets(recs, streams=args.streams, rate=args.rate, chunk=args.chunk, prefix=args.prefix,
                                seconds=args.seconds, seed=args.seed, quiet=args.quiet, from_start=bool(args.from_file))
    rng = np.random.default_rng(args.seed)
    endpoints = ", ".join(args.connect + args.bind)
    try:
        pub = Publisher(args.connect, bind=args.bind, send_hwm=args.hwm, partitioned=args.partitioned)
    except ValueError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return EXIT_CONFIG
    streams, sources = [], []
    for i in range(args.streams):
        rec = recs[i % len(recs)]
        streams.append(pub.stream(f"{args.prefix}{i:04d}", channels, args.rate))
        sources.append(Source(rec, 0 if args.from_file else int(rng.integers(0, max(1, len(rec) - args.chunk)))))
    stop = StopFlag()
    # PUB drops what it sends before the daemon's subscription arrives: wait for it, a bounded time.
    pub.wait_subscribed(streams[0].id, args.settle)
    note = subscription_note(pub, streams, endpoints)
    if note:
        print(note, file=sys.stderr)
    watch = LabelWatch(args.output, args.metrics, args.prefix, args.label_timeout, channels) if args.output else None
    period = args.chunk / args.rate
    start = time.time()
    sent_msgs = sent_samples = 0
    next_report = time.monotonic() + 1.0
    deadline = start + args.seconds if args.seconds > 0 else float("inf")
    tick = 0
    while not stop.requested:
        base = start + tick * period
        if base >= deadline:
            break
        for i, (stream, source) in enumerate(zip(streams, sources, strict=True)):
            due = base + period * i / len(streams)
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            stream.send(source.next_chunk(args.chunk))
            sent_msgs += 1
            sent_samples += args.chunk
        tick += 1
        if watch is not None:
            silence = watch.poll()
            if silence:
                print(("\n" if not args.quiet else "") + silence, file=sys.stderr, flush=True)
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + 1.0
            new_note = subscription_note(pub, streams, endpoints)
            if new_note != note:
                print(("\n" if not args.quiet else "") + (new_note or "simulate: every stream now reaches a daemon"),
                      file=sys.stderr)
                note = new_note
            if not args.quiet:
                elapsed = time.time() - start
                print(f"\rsent {plural(sent_msgs, 'message')}, {plural(sent_samples, 'sample')} "
                      f"({sent_samples / elapsed:,.0f}/s) to {plural(args.streams, 'stream')} {args.prefix}0000...",
                      end="", file=sys.stderr, flush=True)
    if not args.quiet:
        print(f"\nsent {plural(sent_msgs, 'message')}, {plural(sent_samples, 'sample')}", file=sys.stderr)
    pub.close()
    if watch is not None:
        watch.close()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="act as sensor gateways: publish protocol-v1 samples for N streams",
        description="Publish protocol-v1 sample messages for N simulated streams at R Hz, K samples per message, "
                    "from the synthetic generator or an .npz recording, through sigclassd.client. Warns when no "
                    "daemon subscribes to the streams, and when no labels come back (with the daemon's rejections "
                    "by reason, from its metrics). Stops after --seconds or on Ctrl-C.",
    )
    p.add_argument("--connect", action="append", default=None, metavar="ENDPOINT",
                   help="daemon input endpoint to connect to (repeatable; default tcp://127.0.0.1:5555)")
    p.add_argument("--bind", action="append", default=[], metavar="ENDPOINT",
                   help="bind instead, for a daemon whose input connects (repeatable)")
    p.add_argument("--streams", type=int, default=4, help="number of streams (default 4)")
    p.add_argument("--rate", type=float, default=250.0, help="samples per second per stream (default 250)")
    p.add_argument("--chunk", type=int, default=10, help="samples per message (default 10)")
    p.add_argument("--channels", type=int, default=16, help="channels of synthetic data (default 16)")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: run until Ctrl-C)")
    p.add_argument("--source", default="synthetic", help="'synthetic' (default) or an .npz recording to loop")
    p.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                   help="replay a recording (.npz, .csv, .edf/.bdf with edfio, .xdf with pyxdf) from its start at its "
                        "own rate (--rate when the file gives none), once (looped for --seconds)")
    p.add_argument("--prefix", default=None,
                   help="stream id prefix; ids are PREFIX0000, PREFIX0001, ... (default 'sim-HOST-PID-', unique to "
                        "this run, so that two simulators never send the same streams)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and start offsets")
    p.add_argument("--hwm", type=int, default=100_000, help="PUB send high-water mark in messages")
    p.add_argument("--partitioned", action="store_true",
                   help="send partitioned topics (docs/protocol.md), so that each of a daemon's workers receives "
                        "only its own streams")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait at most for a daemon to subscribe before sending; it warns if none does "
                        "(default 2)")
    p.add_argument("--output", default="tcp://127.0.0.1:5556", metavar="ENDPOINT",
                   help="the daemon's label output (output.bind), watched until the first label of these streams "
                        "comes back; '' not to watch (default tcp://127.0.0.1:5556)")
    p.add_argument("--metrics", default="http://127.0.0.1:5557/metrics", metavar="URL",
                   help="the daemon's metrics, read to say why no labels come back: rejected messages by reason, "
                        "or nothing received (default http://127.0.0.1:5557/metrics; '' not to read)")
    p.add_argument("--label-timeout", type=float, default=None, metavar="SECONDS",
                   help="say why if no label of these streams has come back after this long (default: 5 s, or "
                        "the time 1,000 samples take at --rate if longer: a windowed stream's first labels "
                        "wait for its window)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--lsl", action="store_true",
                   help="publish LSL outlets instead (name and source_id PREFIX0000, ...; needs the lsl extra): "
                        "for a daemon with [lsl] enabled")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from sigclassd import logs

    logs.configure("auto", "info")  # the client's warnings come out like the daemon's lines (journal included)
    if args.connect is None and not args.bind:
        args.connect = ["tcp://127.0.0.1:5555"]
    args.connect = args.connect or []
    args.prefix = default_prefix() if args.prefix is None else args.prefix
    if args.streams < 1 or args.rate <= 0 or args.chunk < 1:
        print("error: --streams, --rate and --chunk must be positive", file=sys.stderr)
        return 2
    if args.label_timeout is None:
        args.label_timeout = max(5.0, 1000 / args.rate)
    return simulate(args)
