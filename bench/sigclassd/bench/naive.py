"""The naive baseline: the loop a user would write, one ``model.predict`` per window per stream.

Run as ``python -m sigclassd.bench.naive --input EP --output EP [--model DIR] [--hop N]``; it
prints one JSON line ``{"event": "ready", ...}`` once serving and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from sigclassd import protocol
from sigclassd.stopflag import StopFlag


def naive_serve(input_endpoint: str, output_endpoint: str, model_dir: Path | None, hop: int) -> int:
    """Per stream a rolling window, one ``model.predict`` per ``hop`` new samples.

    Labels are published in the daemon's format. The first full window labels
    all its samples; on SIGTERM every stream's unlabelled samples are labelled
    from its current window (flagged FLUSHED), as the daemon's drain does.
    """
    from sigclassd.artifact import default_model_path, read_artifact
    from sigclassd.engine.activations import to_probabilities
    from sigclassd.models.train import load_keras_model

    artifact = read_artifact(model_dir or default_model_path())
    meta = artifact.meta
    model = load_keras_model(artifact)
    mean = np.asarray(meta.norm_mean, np.float32)
    std = np.asarray(meta.norm_std, np.float32)
    window = meta.window

    def predict(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs = to_probabilities(model.predict(((buf - mean) / std)[None], verbose=0)[0])
        return probs, probs.argmax(axis=-1).astype(np.uint8)

    predict(np.zeros((window, meta.channels), np.float32))  # Keras builds its predict function on the first call
    stop = StopFlag()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(input_endpoint)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 2000)
    pub.bind(output_endpoint)
    # topic -> [window buffer, samples held (<= window), unlabelled, seq after the newest]
    streams: dict[bytes, list[Any]] = {}
    print(json.dumps({"event": "ready", "runtime": "keras predict"}), flush=True)
    while not stop.requested:
        if not sub.poll(50):
            continue
        parts = sub.recv_multipart()
        ingress_ns = time.time_ns()
        frame = protocol.decode_samples(parts)
        s = streams.get(parts[0])
        if s is None or frame.restart:
            s = streams[parts[0]] = [np.tile(mean, (window, 1)), 0, 0, 0]
        buf, k = s[0], len(frame.samples)
        buf[:-k] = buf[k:]
        buf[-k:] = frame.samples
        s[1] = min(window, s[1] + k)
        s[2] += k
        s[3] = frame.seq + k
        if s[1] == window and s[2] >= hop:
            probs, labels = predict(buf)
            n = min(s[2], window)
            pub.send_multipart(protocol.encode_labels(parts[0], probs[-n:], labels[-n:], s[3] - n,
                                                      ingress_ns=ingress_ns))
            s[2] = 0
    for topic, s in streams.items():
        if s[2]:
            probs, labels = predict(s[0])
            n = min(s[2], window)
            pub.send_multipart(protocol.encode_labels(topic, probs[-n:], labels[-n:], s[3] - n,
                                                      flags=protocol.LABEL_FLUSHED | protocol.LABEL_FINAL))
    sub.close()
    pub.close()
    ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sigclassd.bench.naive", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="endpoint the SUB socket binds")
    p.add_argument("--output", required=True, help="endpoint the PUB socket binds")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    p.add_argument("--hop", type=int, default=50, help="new samples per stream between two predicts (default 50)")
    a = p.parse_args(argv)
    return naive_serve(a.input, a.output, a.model, a.hop)


if __name__ == "__main__":
    sys.exit(main())
