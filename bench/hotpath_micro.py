"""Micro-benchmark of the daemon's per-message Python work, without sockets or the model.

1,000 streams send PER messages each per turn (10 samples, 16 channels, 250 Hz); each turn is decoded
(protocol.decode_batch), accepted, planned and completed by the stateful core (sigclassd.core, built as the
daemon builds it) with a zero model output, and encoded (protocol.label_body). Prints microseconds per message
for each stage, the first turn (which opens the streams) left out.

    python bench/hotpath_micro.py 1     # one message per stream per turn
    python bench/hotpath_micro.py 2
"""
import sys
import time

import numpy as np
from prometheus_client import CollectorRegistry

from sigclassd import protocol
from sigclassd.artifact import ModelMeta
from sigclassd.config import ModelSettings, Settings
from sigclassd.core import build_core
from sigclassd.metrics import Metrics

STREAMS = 1000
PER = int(sys.argv[1]) if len(sys.argv) > 1 else 1



class Model:
    """The stateful model's shape without its arithmetic: a look-ahead of 4, 100 numbers of state."""

    lookahead = 4

    def initial_state(self) -> np.ndarray:
        return np.zeros(100, np.float32)


meta = ModelMeta("micro", "1", "tcn", 16, 400, ("a", "b"), "softmax", 4, (0.0,) * 16, (1.0,) * 16)
metrics = Metrics(CollectorRegistry(), process=False)
core = build_core(Settings(model=ModelSettings(mode="stateful")), meta, Model(), metrics)
x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
rounds = []
seq = 0
for _ in range(21):
    msgs = []
    for _ in range(PER):
        msgs += [protocol.encode_samples(f"s/{i}", x, seq, sample_rate_hz=250.0) for i in range(STREAMS)]
        seq += 10
    rounds.append(msgs)
totals = {"decode": 0.0, "accept": 0.0, "collect": 0.0, "complete": 0.0, "encode": 0.0}
n_messages = 0
for k, messages in enumerate(rounds):
    t0 = time.perf_counter()
    frames = protocol.decode_batch(messages, n_channels=16, max_abs=1e6)
    t1 = time.perf_counter()
    core.accept(frames, 0.0)
    t2 = time.perf_counter()
    runs = []
    collect_s = complete_s = 0.0
    while True:
        c0 = time.perf_counter()
        batch = core.collect()
        c1 = time.perf_counter()
        collect_s += c1 - c0
        if batch is None:
            break
        probs = np.zeros((*batch.x.shape[:2], 2), np.float32)
        done = core.complete(batch, probs, batch.state)
        complete_s += time.perf_counter() - c1
        runs += done
    e0 = time.perf_counter()
    for r in runs:
        protocol.label_body(r.probabilities, r.labels, r.seq, r.t0_ns, 1, r.flags, r.gap, r.ingress_ns)
    e1 = time.perf_counter()
    if k == 0:  # the first turn opens the streams
        continue
    n_messages += len(messages)
    totals["decode"] += t1 - t0
    totals["accept"] += t2 - t1
    totals["collect"] += collect_s
    totals["complete"] += complete_s
    totals["encode"] += e1 - e0
per_message = {stage: round(s / n_messages * 1e6, 2) for stage, s in totals.items()}
print(PER, "msgs/stream/turn:", per_message, "us per message; total", round(sum(totals.values()) / n_messages * 1e6, 2))
