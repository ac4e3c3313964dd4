"""Typed, frozen settings: loaded once from TOML plus overrides, validated, passed down.

Every key has a default, so ``sigclassd run`` with no config serves the bundled
model on loopback. Unknown keys and wrong types fail at start-up with a message
that names the key, because a typo in a config file must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sigclassd import partition, shard
from sigclassd.errors import ConfigError


@dataclass(frozen=True)
class InputSettings:
    """Gateway side: a SUB socket that binds and/or connects."""

    bind: tuple[str, ...] = ("tcp://127.0.0.1:5555",)
    connect: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ("",)
    # The largest frame a gateway may send (ZeroMQ MAXMSGSIZE): 1,000 samples of 16 float32 channels
    # fit. A peer that sends a larger frame is disconnected (it reconnects) and its frame never held.
    max_message_bytes: int = 64 << 10
    # Messages queued per gateway connection before libzmq drops (seen as seq gaps):
    # under overload this queue, not the stream table, is where latency builds up,
    # so it is kept to about a second of a busy gateway's traffic.
    rcvhwm: int = 20_000
    # Bytes one gateway connection may have queued in libzmq: its queue is cut to
    # max_connection_bytes // max_message_bytes messages when rcvhwm would allow more.
    max_connection_bytes: int = 64 << 20
    # Gateway connections served at once; a further one is refused at its handshake (and retries).
    # With max_connection_bytes it bounds the input queues' memory (docs/design.md, "Bounded memory").
    max_connections: int = 256
    # Messages taken from the socket per main-loop turn before the model runs:
    # bounds the time between model calls under a flood.
    drain_max_messages: int = 20_000
    # ...and at most this long receiving them (about 300 messages a millisecond). Short, so that
    # under a flood the other streams' labels wait for no more than this much reading.
    drain_max_ms: float = 1.0
    # "K/N": label only the streams that rendezvous hashing of their id gives to shard K of N
    # (sigclassd/shard.py); the others are dropped before decoding. Empty: every stream subscribed to.
    shard: str = ""
    # Partitions served (sigclassd/partition.py), e.g. "0-127,200": partitioned topics of others are not
    # subscribed to, plain topics whose id hashes elsewhere are dropped. Empty: all. Workers get theirs.
    partitions: str = ""
    # While the daemon cannot read all that is offered, a busy connection whose streams run on faster
    # than cut_speed times their declared rates (or that declares none) is cut, and its address refused
    # for cut_cooldown_s, doubling with each cut (sigclassd/connections.py). 0: never cut.
    cut_speed: float = 2.0
    cut_cooldown_s: float = 10.0


@dataclass(frozen=True)
class OutputSettings:
    bind: str = "tcp://127.0.0.1:5556"
    sndhwm: int = 100_000
    linger_ms: int = 1000


@dataclass(frozen=True)
class ModelSettings:
    path: str = ""  # empty: the bundled default model
    channels: int = 0  # 0: whatever the model takes; otherwise the model must take exactly this many
    mode: str = "windowed"  # "windowed" or "stateful"
    runtime: str = "auto"
    hop: int = 50
    lag: int = 0
    warmup_samples: int = 0  # 0: the model's window length
    max_batch_streams: int = 1024
    # While fewer than batch_target_streams streams have work, wait this long for more to
    # join the batch: a little latency for far fewer model calls at light and moderate load.
    max_wait_ms: float = 2.0
    batch_target_streams: int = 32
    # Windowed mode instead: a ready window waits up to this long, the input read meanwhile, for
    # others to join its model call (a call has a fixed cost of a few ms, each window a whole pass).
    window_wait_ms: float = 20.0


@dataclass(frozen=True)
class StreamSettings:
    max_streams: int = 10_000
    idle_ttl_s: float = 60.0
    max_pending_samples: int = 1000
    # A seq jump larger than this resets the stream (state and window) instead of
    # carrying on across the hole; smaller gaps carry on, flagged.
    gap_reset_samples: int = 400
    # seq moving backwards by more than this is taken as an unflagged restart.
    backwards_reset_samples: int = 4000
    # A stream may send up to rate_limit times the sample_rate_hz its frames declare, with
    # rate_burst_s seconds of catch-up; frames beyond that are rejected (rate_limited). A stream
    # whose seqs run more than 1 s ahead of real time (admission.AHEAD_S) is served after the
    # well-behaved ones for demote_s seconds, as is one with a frame rejected. 0 turns the limit off.
    rate_limit: float = 1.5
    rate_burst_s: float = 2.0
    demote_s: float = 10.0
    # Model input samples per model call for demoted streams (a window counts its length; a
    # stateful share is at most 32 samples): what a flood can add to the others' latency.
    demoted_samples_per_turn: int = 2048
    # Resets (restart flag, seq jumps) one stream id may cause per second, with a burst of
    # reset_burst; further resetting frames are rejected (reset_storm).
    max_resets_per_s: float = 2.0
    reset_burst: int = 10
    # Retired incarnations awaiting their last labels, across all ids; beyond it resets are refused.
    max_retired: int = 1024
    # Frames declaring a sample rate above this are refused (implausible_rate): no real sensor stream
    # is that fast, and a huge declared rate would switch the rate limit off for its stream.
    max_declared_rate_hz: float = 100_000.0
    # A frame that would end or jump a live stream's incarnation (restart flag, a seq jump) waits
    # until the stream's publisher has been silent this long (or twice its usual interval between
    # frames): one stray frame cannot take a live stream, and a reconnecting gateway's backlog is
    # labelled before its newer frames. If the publisher goes on, the frame is refused
    # (conflicting_publishers).
    publisher_silence_s: float = 0.5


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = "127.0.0.1:5557"  # empty: no HTTP listener
    # Connections served at once; never more than an eighth of the fd limit (RLIMIT_NOFILE),
    # so a flood of HTTP clients cannot take the descriptors the ZeroMQ sockets need.
    max_connections: int = 32
    # Export a `_created` series (the counter's creation time) beside every counter and histogram:
    # off by default, as they double the exposition and few dashboards read them.
    created_series: bool = False


@dataclass(frozen=True)
class LogSettings:
    format: str = "auto"  # "auto" (journal under systemd, console on a tty, else json), "json", "console", "journal"
    level: str = "info"
    stats_interval_s: float = 10.0
    reject_summary_interval_s: float = 10.0


@dataclass(frozen=True)
class ServiceSettings:
    drain_grace_s: float = 5.0
    tick_s: float = 0.05
    max_consecutive_inference_errors: int = 20
    # Worker processes labelling the streams, by partition, behind this one's sockets (docs/workers.md):
    # a number, or "auto" for one per CPU this process may run on. 1: this process labels them itself.
    workers: int | str = 1


@dataclass(frozen=True)
class SecuritySettings:
    """Optional CURVE on the input socket: the server key pair and the allowed gateway keys."""

    curve_secret_key_file: str = ""
    curve_allowed_keys_dir: str = ""


@dataclass(frozen=True)
class LslSettings:
    """Lab Streaming Layer input and label outlets (docs/lsl.md); needs pip install 'sigclassd[lsl]'."""

    enabled: bool = False
    # Which outlets to read: an XPath predicate over their stream info (liblsl's resolve_bypred, e.g.
    # "type='EEG' and starts-with(name,'cap')"), ANDed with name, type and source_id when those are set.
    # All empty: every outlet liblsl can see.
    predicate: str = ""
    name: str = ""
    type: str = ""
    source_id: str = ""
    # Seconds of samples liblsl keeps per inlet while the daemon is behind; older ones are dropped
    # by liblsl, which shows as a gap (flagged, counted in samples_missing).
    buffer_s: int = 10
    # A chunk starting more than this after the previous chunk's last sample (plus one period) is a gap.
    gap_tolerance_s: float = 0.1
    # The reading thread's pause between passes over the inlets (adds up to this to the latency).
    poll_ms: float = 5.0
    resolve_interval_s: float = 0.5
    # Per LSL input stream, publish <id>-labels and <id>-probabilities outlets.
    outlets: bool = True


@dataclass(frozen=True)
class ClusterSettings:
    """Membership on etcd (docs/cluster.md): partitions assigned among the live shards, taken over on failure."""

    endpoint: str = ""  # etcd's client URL, e.g. "http://10.0.0.5:2379"; empty: no cluster
    member: str = ""  # this shard's name among the members; empty: the host name
    # A member whose lease is not renewed for this long is dead and its partitions move (etcd's minimum is 2).
    lease_s: int = 3


@dataclass(frozen=True)
class Settings:
    input: InputSettings = field(default_factory=InputSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    lsl: LslSettings = field(default_factory=LslSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    source: str = "<defaults>"


MODES = ("windowed", "stateful")
LOG_FORMATS = ("auto", "json", "console", "journal")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Both modes run the NumPy engine; the TensorFlow runtimes (tf, xla, litert) were measured and removed.
RUNTIMES = ("auto", "numpy")
# Bounds that keep socket options within libzmq's C ints and the queues within a host's memory.
_MAX_HWM = 10_000_000
_MAX_MESSAGE_BYTES = 256 << 20
_MAX_QUEUED_BYTES = 64 << 30


def _coerce(where: str, value: Any, kind: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            msg = f"{where} must be true or false, got {value!r}"
            raise ConfigError(msg)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            msg = f"{where} must be an integer, got {value!r}"
            raise ConfigError(msg)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            msg = f"{where} must be a number, got {value!r}"
            raise ConfigError(msg)
        if not math.isfinite(value):  # inf would switch a limit off, nan would make every comparison false
            msg = f"{where} must be a finite number, got {value!r}"
            raise ConfigError(msg)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            msg = f"{where} must be a string, got {value!r}"
            raise ConfigError(msg)
        return value
    if isinstance(kind, types.UnionType):  # int | str: a number or a word such as "auto"
        if isinstance(value, bool) or not isinstance(value, kind.__args__):
            msg = f"{where} must be {' or '.join(t.__name__ for t in kind.__args__)}, got {value!r}"
            raise ConfigError(msg)
        return value
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            msg = f"{where} must be a list of strings, got {value!r}"
            raise ConfigError(msg)
        return tuple(value)
    msg = f"unsupported setting type for {where}"
    raise ConfigError(msg)


def _build(raw: dict[str, Any], source: str, origins: dict[tuple[str, str], str] | None = None) -> Settings:
    """``origins`` names where a (section, key) came from when it was not ``source``: a ``--set`` option."""
    origins = origins or {}
    sections = {}
    hints = typing.get_type_hints(Settings)
    for name, section in raw.items():
        if name not in hints or name == "source":
            known = ", ".join(f"[{f.name}]" for f in dataclasses.fields(Settings) if f.name != "source")
            where = next((o for (sec, _), o in origins.items() if sec == name), source)
            msg = f"{where}: unknown section [{name}]; known sections: {known}"
            raise ConfigError(msg)
        if not isinstance(section, dict):
            msg = f"{source}: [{name}] must be a table"
            raise ConfigError(msg)
        cls = hints[name]
        field_types = typing.get_type_hints(cls)
        values = {}
        for key, value in section.items():
            where = origins.get((name, key), source)
            if key not in field_types:
                msg = f"{where}: unknown key {name}.{key}; known keys: {', '.join(field_types)}"
                raise ConfigError(msg)
            values[key] = _coerce(f"{where}: {name}.{key}", value, field_types[key])
        sections[name] = cls(**values)
    settings = Settings(**sections, source=source)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Check values that types alone do not catch; each message says what to fix."""
    problems = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            problems.append(text)

    need(bool(s.input.bind or s.input.connect), "input.bind or input.connect must name at least one endpoint")
    for ep in (*s.input.bind, *s.input.connect, s.output.bind):
        need("://" in ep, f"endpoint {ep!r} needs a transport, e.g. 'tcp://127.0.0.1:5555' or 'ipc:///run/x.sock'")
    # Socket options are C ints in libzmq; 0 would mean "no limit" there, so it is refused here.
    need(64 <= s.input.max_message_bytes <= _MAX_MESSAGE_BYTES,
         f"input.max_message_bytes must be in [64, {_MAX_MESSAGE_BYTES}]")
    need(1 <= s.input.rcvhwm <= _MAX_HWM, f"input.rcvhwm must be in [1, {_MAX_HWM}]")
    need(1 <= s.output.sndhwm <= _MAX_HWM, f"output.sndhwm must be in [1, {_MAX_HWM}]")
    need(s.input.max_message_bytes <= s.input.max_connection_bytes <= _MAX_QUEUED_BYTES,
         f"input.max_connection_bytes must be in [input.max_message_bytes, {_MAX_QUEUED_BYTES}]")
    need(1 <= s.input.max_connections <= 10_000, "input.max_connections must be in [1, 10000]")
    need(1 <= s.input.drain_max_messages <= 1_000_000, "input.drain_max_messages must be in [1, 1000000]")
    need(0 <= s.output.linger_ms <= 3_600_000, "output.linger_ms must be in [0, 3600000]")
    need(s.model.mode in MODES, f"model.mode is {s.model.mode!r}; use one of {', '.join(MODES)}")
    need(s.model.runtime in RUNTIMES, f"model.runtime is {s.model.runtime!r}; use one of {', '.join(RUNTIMES)}")
    need(s.model.channels >= 0, "model.channels must be >= 0 (0 = take the model's channel count)")
    need(s.model.hop >= 1, "model.hop must be >= 1 (samples between windowed model runs)")
    need(s.model.lag >= 0, "model.lag must be >= 0")
    need(s.model.warmup_samples >= 0, "model.warmup_samples must be >= 0")
    need(s.input.drain_max_ms > 0, "input.drain_max_ms must be > 0")
    need(s.input.cut_speed == 0 or 1 <= s.input.cut_speed <= 1000,
         "input.cut_speed must be 0 (never cut) or in [1, 1000] (a multiple of the declared sample rates)")
    need(0 < s.input.cut_cooldown_s <= 3600, "input.cut_cooldown_s must be in (0, 3600]")
    if s.input.shard:
        try:
            shard.parse(s.input.shard)
        except ConfigError as e:
            problems.append(str(e))
    need(s.model.max_batch_streams >= 1, "model.max_batch_streams must be >= 1")
    need(0 <= s.model.max_wait_ms <= 1000, "model.max_wait_ms must be in [0, 1000]")
    need(0 <= s.model.window_wait_ms <= 1000, "model.window_wait_ms must be in [0, 1000]")
    need(s.model.batch_target_streams >= 1, "model.batch_target_streams must be >= 1")
    need(s.streams.max_streams >= 1, "streams.max_streams must be >= 1")
    need(s.streams.idle_ttl_s > 0, "streams.idle_ttl_s must be > 0")
    need(s.streams.max_pending_samples >= 1, "streams.max_pending_samples must be >= 1")
    need(s.streams.gap_reset_samples >= 0, "streams.gap_reset_samples must be >= 0")
    need(s.streams.backwards_reset_samples >= 0, "streams.backwards_reset_samples must be >= 0")
    need(s.streams.rate_limit == 0 or s.streams.rate_limit >= 1,
         "streams.rate_limit must be 0 (off) or >= 1 (a multiple of the declared sample rate)")
    need(s.streams.rate_burst_s > 0, "streams.rate_burst_s must be > 0")
    need(s.streams.demote_s >= 0, "streams.demote_s must be >= 0")
    need(s.streams.demoted_samples_per_turn >= 1, "streams.demoted_samples_per_turn must be >= 1")
    need(s.streams.max_resets_per_s > 0, "streams.max_resets_per_s must be > 0")
    need(s.streams.reset_burst >= 1, "streams.reset_burst must be >= 1")
    need(s.streams.max_retired >= 1, "streams.max_retired must be >= 1")
    need(0 < s.streams.max_declared_rate_hz <= 1e7, "streams.max_declared_rate_hz must be in (0, 1e7]")
    need(0 < s.streams.publisher_silence_s <= 60, "streams.publisher_silence_s must be in (0, 60]")
    if s.metrics.listen:
        _host, sep, port = s.metrics.listen.rpartition(":")
        need(bool(sep) and port.isdigit() and 0 <= int(port) < 65536,
             f"metrics.listen is {s.metrics.listen!r}; use HOST:PORT, e.g. '127.0.0.1:5557'")
    need(1 <= s.metrics.max_connections <= 10_000, "metrics.max_connections must be in [1, 10000]")
    need(s.log.format in LOG_FORMATS, f"log.format is {s.log.format!r}; use one of {', '.join(LOG_FORMATS)}")
    need(s.log.level in LOG_LEVELS, f"log.level is {s.log.level!r}; use one of {', '.join(LOG_LEVELS)}")
    need(s.log.stats_interval_s > 0 and s.log.reject_summary_interval_s > 0, "log intervals must be > 0")
    need(s.service.drain_grace_s >= 0, "service.drain_grace_s must be >= 0")
    need(0 < s.service.tick_s <= 1, "service.tick_s must be in (0, 1]")
    need(s.service.max_consecutive_inference_errors >= 1, "service.max_consecutive_inference_errors must be >= 1")
    need(s.service.workers == "auto" or (isinstance(s.service.workers, int) and 1 <= s.service.workers <= 256),
         f"service.workers is {s.service.workers!r}; use a number of worker processes in [1, 256] or \"auto\"")
    if s.input.partitions:
        try:
            partition.parse_set(s.input.partitions)
        except ConfigError as e:
            problems.append(str(e))
    need(bool(s.security.curve_secret_key_file) == bool(s.security.curve_allowed_keys_dir),
         "security.curve_secret_key_file and security.curve_allowed_keys_dir go together: set both or neither")
    need(1 <= s.lsl.buffer_s <= 3600, "lsl.buffer_s must be in [1, 3600] (whole seconds)")
    need(0 < s.lsl.gap_tolerance_s <= 60, "lsl.gap_tolerance_s must be in (0, 60]")
    need(0 < s.lsl.poll_ms <= 1000, "lsl.poll_ms must be in (0, 1000]")
    need(0 < s.lsl.resolve_interval_s <= 60, "lsl.resolve_interval_s must be in (0, 60]")
    for key in ("name", "type", "source_id"):
        need("'" not in getattr(s.lsl, key), f"lsl.{key} must not contain a single quote")
    need(not (s.lsl.enabled and s.security.curve_secret_key_file),
         "lsl.enabled = true cannot be combined with [security] CURVE (LSL frames enter unauthenticated)")
    if s.cluster.endpoint:
        need(s.cluster.endpoint.startswith("http://") and len(s.cluster.endpoint) > len("http://"),
             f"cluster.endpoint is {s.cluster.endpoint!r}; use etcd's client URL, e.g. 'http://127.0.0.1:2379'")
        need(not s.input.shard and not s.input.partitions,
             "cluster.endpoint excludes input.shard and input.partitions: the cluster assigns the partitions")
        need(s.service.workers == 1, "cluster.endpoint needs service.workers = 1 (workers are not cluster members yet)")
    need(all(c.isalnum() or c in "-_.@" for c in s.cluster.member) and len(s.cluster.member) <= 128,
         f"cluster.member is {s.cluster.member!r}; use up to 128 letters, digits and - _ . @")
    need(2 <= s.cluster.lease_s <= 600, "cluster.lease_s must be in [2, 600] (whole seconds; etcd's minimum is 2)")
    if problems:
        msg = f"{s.source}: " + "; ".join(problems)
        raise ConfigError(msg)


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value``, the value in TOML syntax (bare words are taken as strings)."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        msg = f"override {text!r} must look like section.key=value, e.g. model.mode=stateful"
        raise ConfigError(msg)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
        # A bare word is a string; a list, table or quoted value that is not valid TOML is a mistake
        # (e.g. [a/] for ["a/"]) that would otherwise surface later as a wrong topic or a libzmq error.
        if parsed.startswith(("[", "{", '"', "'")):
            msg = (f"--set {text}: {name.strip()} is not a valid TOML value; "
                   'strings inside a list need quotes, e.g. --set \'input.subscribe=["site-a/"]\'')
            raise ConfigError(msg) from None
    return section, key, parsed


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Load settings from a TOML file (or defaults) and apply ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            msg = f"config file {path} does not exist"
            raise ConfigError(msg) from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            msg = f"cannot read config {path}: {e}"
            raise ConfigError(msg) from e
    origins: dict[tuple[str, str], str] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        origins[(section, key)] = f"--set {text}"
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            msg = f"[{section}] must be a table"
            raise ConfigError(msg)
        raw[section][key] = value
    return _build(raw, source, origins)


def replace(settings: Settings, **sections: Any) -> Settings:
    """A copy of ``settings`` with whole sections swapped (used by tests and the CLI)."""
    return dataclasses.replace(settings, **sections)
