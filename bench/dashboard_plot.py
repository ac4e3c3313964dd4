"""Draw the Grafana dashboard's main queries from a real Prometheus with matplotlib, as one PNG.

Queries ``/api/v1/query_range`` of a Prometheus that scrapes sigclassd with the
same PromQL as ``deploy/grafana/sigclassd-dashboard.json`` (without Grafana's
``$job`` and ``$instance`` filters) and draws each panel with matplotlib: not a
Grafana screenshot, but the same numbers, on real scraped data, without a Grafana server.

    python bench/dashboard_plot.py --prometheus http://127.0.0.1:9090 --minutes 2 \
        --out deploy/grafana/dashboard-queries.png
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    # (legend, PromQL); "{reason}" in a legend is filled from the series' labels.
    queries: tuple[tuple[str, str], ...]


def panels(w: str) -> tuple[Panel, ...]:
    """The dashboard's main panels; ``w`` is the rate window (Grafana's ``$__rate_interval``)."""

    def q(p: float, metric: str) -> str:
        return f"histogram_quantile({p}, sum by (le) (rate({metric}_bucket[{w}])))"

    lat = "sigclassd_ingress_to_publish_seconds"
    return (
        Panel("Samples/s: received vs labelled", "samples/s", (
            ("received", f"sum(rate(sigclassd_samples_received_total[{w}]))"),
            ("labelled", f"sum(rate(sigclassd_samples_labelled_total[{w}]))"),
            ("shed", f"sum(rate(sigclassd_samples_shed_total[{w}]))"),
        )),
        Panel("Ingress to publish latency", "ms", (
            ("p50", q(0.5, lat) + " * 1000"), ("p90", q(0.9, lat) + " * 1000"), ("p99", q(0.99, lat) + " * 1000"),
        )),
        Panel("Frames rejected by reason", "frames/s", (
            ("{reason}", f"sum by (reason) (rate(sigclassd_frames_rejected_total[{w}])) > 0"),
        )),
        Panel("Streams active", "streams", (
            ("active", "sum(sigclassd_streams_active)"),
        )),
        # histogram_quantile interpolates inside the first bucket, (0, 1], and would put the p90
        # below 1 when most calls batch one stream: clamp at the smallest possible batch.
        Panel("Streams per model call", "streams", (
            ("mean", f"sum(rate(sigclassd_batch_streams_sum[{w}])) / sum(rate(sigclassd_batch_streams_count[{w}]))"),
            ("p90", f"clamp_min({q(0.9, 'sigclassd_batch_streams')}, 1)"),
        )),
        Panel("Inference duration", "ms", (
            ("p50", q(0.5, "sigclassd_inference_duration_seconds") + " * 1000"),
            ("p99", q(0.99, "sigclassd_inference_duration_seconds") + " * 1000"),
        )),
    )


def query_range(base: str, promql: str, start: float, end: float, step: float) -> list[dict]:
    """The ``result`` list of a Prometheus range query (a matrix: one entry per series)."""
    params = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base.rstrip('/')}/api/v1/query_range?{params}", timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        msg = f"Prometheus rejected {promql!r}: {body}"
        raise RuntimeError(msg)
    return body["data"]["result"]


def render(base: str, start: float, end: float, out: str, *, step: float = 1.0, rate_window: str = "10s") -> int:
    """Draw every panel into ``out``; returns how many series had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = 0
    specs = panels(rate_window)
    fig, axes = plt.subplots(3, 2, figsize=(13, 10), sharex=True)
    for ax, panel in zip(axes.flat, specs, strict=True):
        for legend, promql in panel.queries:
            for series in query_range(base, promql, start, end, step):
                ts = [float(t) - start for t, _ in series["values"]]
                vs = [float(v) for _, v in series["values"]]
                ax.plot(ts, vs, label=legend.format(**series["metric"]) if "{" in legend else legend)
                plotted += 1
        ax.set_title(panel.title)
        ax.set_ylabel(panel.unit)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[-1]:
        ax.set_xlabel("seconds")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start))
    fig.suptitle(f"sigclassd dashboard queries (matplotlib, not Grafana): Prometheus data from {stamp}, "
                 f"rate window {rate_window}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return plotted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument("--minutes", type=float, default=2.0, help="how far back from --end to plot")
    p.add_argument("--start", type=float, help="range start, Unix seconds (default: --end minus --minutes)")
    p.add_argument("--end", type=float, help="range end, Unix seconds (default: now)")
    p.add_argument("--step", type=float, default=1.0, help="query resolution, seconds")
    p.add_argument("--rate-window", default="10s", help="PromQL range of rate(), e.g. 10s or 1m")
    p.add_argument("--out", default="deploy/grafana/dashboard-queries.png")
    args = p.parse_args()
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - 60 * args.minutes
    n = render(args.prometheus, start, end, args.out, step=args.step, rate_window=args.rate_window)
    print(f"{args.out}: {n} series from {args.prometheus}")
    return 0 if n else 1


if __name__ == "__main__":
    raise SystemExit(main())
