"""``sigclassd bench``: throughput and latency of the daemon against the bare relay and the naive loop.

One command, one machine, every party a separate process over loopback:

- the system under test (SUT, :mod:`~sigclassd.bench.sut`): the daemon (``sigclassd run``,
  stateful or windowed), the bare relay (:mod:`~sigclassd.bench.relay`, the transport
  ceiling), or the naive baseline (:mod:`~sigclassd.bench.naive`, one ``model.predict`` per
  window per stream: the loop a user would otherwise write);
- a compiled load generator and a compiled consumer (``loadgen.c``, driven by
  :mod:`~sigclassd.bench.parties`): N streams on the schedule of :mod:`~sigclassd.bench.load`,
  and every label message timed and checked for continuity.

:mod:`~sigclassd.bench.run` runs the plan, :mod:`~sigclassd.bench.profile` samples a SUT with
py-spy, :mod:`~sigclassd.bench.report` writes ``results.md``, ``results.json`` and
``throughput_latency.png``. The command line is :mod:`~sigclassd.bench.cli`, registered with
``sigclassd`` by :mod:`~sigclassd.bench.commands` (an entry point); nothing heavier is imported until
a benchmark runs.
"""
