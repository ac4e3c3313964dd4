"""sigclassd: streaming, real-time per-timestep signal classification over ZeroMQ."""

__version__ = "0.1.0"
