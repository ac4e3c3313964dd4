"""Micro-benchmark of the daemon's per-message Python work, without sockets or the model.

1,000 streams send PER messages each per turn (10 samples, 16 channels, 250 Hz); each turn is decoded
(protocol.decode_batch), accepted (StreamTable.accept_batch), planned and completed by the stateful
planner with a zero model output, and encoded (protocol.label_body). Prints microseconds per message
for each stage, the first turn (which opens the streams) left out.

    python bench/hotpath_micro.py 1     # one message per stream per turn
    python bench/hotpath_micro.py 2
"""
import sys
import time

import numpy as np
from prometheus_client import CollectorRegistry
from sigclassd import protocol
from sigclassd.config import StreamSettings
from sigclassd.metrics import Metrics
from sigclassd.planner import make_planner
from sigclassd.streams import StreamTable

S=1000; PER=int(sys.argv[1]) if len(sys.argv)>1 else 1
t=StreamTable(StreamSettings(), Metrics(CollectorRegistry(), process=False), channels=16, history=4, ready_after=1, initial_state=lambda: np.zeros(100,np.float32), warmup=400)
p=make_planner("stateful", t, window=400, lag=0, lookahead=4, pad_value=np.zeros(16,np.float32), n_classes=2, max_streams=1024)
x=np.random.default_rng(0).normal(size=(10,16)).astype(np.float32)
rounds=[]
seq=0
for r in range(21):
    msgs=[]
    for j in range(PER):
        msgs+=[protocol.encode_samples(f"s/{i}", x, seq, sample_rate_hz=250.0) for i in range(S)]
        seq+=10
    rounds.append(msgs)
T={'decode':0,'accept':0,'collect':0,'complete':0,'encode':0}
nmsg=0
for ri,rnd in enumerate(rounds):
    a=time.perf_counter(); fb=protocol.decode_batch(rnd, n_channels=16, max_abs=1e6); b=time.perf_counter()
    t.accept_batch(fb, 0.0)
    c=time.perf_counter()
    runs=[]; tc=tp=0
    while True:
        c0=time.perf_counter(); batch=p.collect(); c1=time.perf_counter(); tc+=c1-c0
        if batch is None: break
        probs=np.zeros((*batch.x.shape[:2],2),np.float32)
        r=p.complete(batch, probs, batch.state); c2=time.perf_counter(); tp+=c2-c1
        runs+=r
    e0=time.perf_counter()
    for r in runs: protocol.label_body(r.probabilities, r.labels, r.seq, r.t0_ns, 1, r.flags, r.gap, r.ingress_ns)
    e1=time.perf_counter()
    if ri==0: continue
    nmsg+=len(rnd)
    T['decode']+=b-a; T['accept']+=c-b; T['collect']+=tc; T['complete']+=tp; T['encode']+=e1-e0
print(PER, "msgs/stream/turn:", {k: round(v/nmsg*1e6,2) for k,v in T.items()}, "us per message; total", round(sum(T.values())/nmsg*1e6,2))
