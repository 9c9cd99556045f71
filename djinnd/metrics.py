"""An optional Prometheus text endpoint on loopback (`djinnd start --metrics-port N`).

It renders from `status`, so the figures are the ones every other client sees; a scrape never
touches a session or the device.
"""

import logging
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

log = logging.getLogger("djinnd.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(status: dict, sessions: list[dict]) -> str:
    """The Prometheus text exposition format, version 0.0.4."""
    lines: list[str] = []

    def metric(name, kind, help, samples):
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{label}}} {value}" if label else f"{name} {value}")

    m, swap, sched = status["memory"], status["swap"], status["scheduler"]
    metric("djinn_vram_used_bytes", "gauge", "Device memory charged to the weights and sessions.", [({}, m["device_bytes"])])
    metric("djinn_vram_budget_bytes", "gauge", "The device-memory budget.", [({}, m["budget_bytes"])])
    metric("djinn_vram_capacity_bytes", "gauge", "The device's memory.", [({}, m["capacity_bytes"])])
    metric("djinn_vram_peak_bytes", "gauge", "Peak device memory since start or the last reset.", [({}, m["peak_device_bytes"])])
    metric("djinn_weights_bytes", "gauge", "The model's weights on the device.", [({}, m["weights_bytes"])])
    metric("djinn_host_pool_used_bytes", "gauge", "Swapped state in the host pool.", [({}, m["host_bytes"])])
    metric("djinn_host_pool_capacity_bytes", "gauge", "The host pool's size.", [({}, m["host_capacity_bytes"])])
    metric("djinn_disk_tier_used_bytes", "gauge", "Swapped state on the disk tier.", [({}, m["disk_bytes"])])
    metric("djinn_swaps_total", "counter", "Swaps by direction.",
           [({"direction": "out"}, swap["swap_outs"]), ({"direction": "in"}, swap["swap_ins"])])
    metric("djinn_swap_bytes_total", "counter", "Bytes swapped by direction.",
           [({"direction": "out"}, swap["bytes_out"]), ({"direction": "in"}, swap["bytes_in"])])
    metric("djinn_swap_failures_total", "counter", "Swaps that failed and left the session where it was.",
           [({}, swap["failures"])])
    metric("djinn_demotions_total", "counter", "Host-pool entries moved to the disk tier.", [({}, swap["demotions"])])
    metric("djinn_prefetch_total", "counter", "Phase-signal prefetches by outcome.",
           [({"result": r}, swap.get(f"prefetch_{r}", 0)) for r in ("scheduled", "done", "hits", "misses")])
    where = Counter(s["location"] for s in sessions)
    metric("djinn_sessions", "gauge", "Open sessions by where their state is.",
           [({"location": loc}, where[loc]) for loc in ("device", "host", "disk")])
    metric("djinn_scheduler_served_total", "counter", "Device grants by QoS class.",
           [({"qos": q}, n) for q, n in sched["served"].items()])
    metric("djinn_scheduler_busy_seconds_total", "counter", "Device time by QoS class.",
           [({"qos": q}, v) for q, v in sched["busy_s"].items()])
    metric("djinn_scheduler_waiting", "gauge", "Requests waiting for the device by QoS class.",
           [({"qos": q}, n) for q, n in sched["waiting"].items()])
    metric("djinn_events_total", "counter", "Events emitted (the last sequence number).", [({}, status["seq"])])
    proc = psutil.Process()
    cpu = proc.cpu_times()
    metric("process_resident_memory_bytes", "gauge", "Resident memory of djinnd.", [({}, proc.memory_info().rss)])
    metric("process_cpu_seconds_total", "counter", "CPU time of djinnd.", [({}, round(cpu.user + cpu.system, 3))])
    return "\n".join(lines) + "\n"


class MetricsServer:
    """GET /metrics on 127.0.0.1:port (0 picks a free port; `url` says which)."""

    def __init__(self, service, port: int):
        render_now = lambda: render(service.status(), service.rt.list_sessions())  # noqa: E731

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render_now().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not news
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="djinn-metrics", daemon=True)

    def start(self):
        self._thread.start()
        log.info("Prometheus metrics on %s", self.url)

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
