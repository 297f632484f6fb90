"""The monitoring kit (docker-compose.yml and ops/), and the metrics a live `luna up` serves.

The Grafana dashboard may only query metrics the services serve: every metric name in a panel
expression must be one of the Prometheus names below (the exposition of `GET /metrics` on the
gateway, status and saver), so renaming a metric in the code without the dashboard, or the
other way round, fails here. The compose file, Prometheus, collector and Grafana provisioning
files must parse, everything the compose file mounts from ./ops must exist, Prometheus must
scrape all three Luna ports, and the collector must take OTLP in for traces and metrics.
Last, a `luna up` of its own saves one job and the reference Prometheus parser reads its
`/metrics`: valid text, the types and labels above, and counters that moved by exactly the job.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = OPS / "prometheus.yml"
COLLECTOR = OPS / "otel-collector.yaml"
DATASOURCES = OPS / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
DASHBOARD_PROVIDERS = OPS / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
DASHBOARD = OPS / "grafana" / "dashboards" / "luna-saver.json"

# The metrics the services serve: name -> (type, label names). Histograms are listed by their
# family name; their series carry the _bucket/_sum/_count suffixes.
METRICS = {
    "luna_gateway_request_duration_seconds": ("histogram", {"status"}),
    "luna_jobs_accepted_total": ("counter", set()),
    "luna_tasks_published_total": ("counter", {"format"}),
    "luna_publish_duration_seconds": ("histogram", {"kind"}),
    "luna_images_saved_total": ("counter", {"format"}),
    "luna_images_rejected_total": ("counter", {"format", "gate"}),
    "luna_images_failed_total": ("counter", {"format", "reason"}),
    "luna_save_retries_total": ("counter", {"format"}),
    "luna_tasks_parked_total": ("counter", {"reason"}),
    "luna_bytes_written_total": ("counter", {"format"}),
    "luna_encode_duration_seconds": ("histogram", {"format"}),
    "luna_write_duration_seconds": ("histogram", {"format"}),
    "luna_quality_gate_duration_seconds": ("histogram", {"gate"}),
    "luna_queue_depth": ("gauge", set()),
    "luna_queue_parked": ("gauge", set()),
    "luna_save_slots_active": ("gauge", set()),
    "luna_save_slots_busy": ("gauge", set()),
    "luna_save_slots_configured": ("gauge", {"bound"}),
    "luna_saver_consumers": ("gauge", set()),
    "luna_ws_subscribers": ("gauge", set()),
    "luna_events_relayed_total": ("counter", {"type"}),
    "luna_status_jobs_tracked": ("gauge", set()),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
LUNA_PORTS = {19283, 19284, 19285}

# A PromQL identifier that is not part of a label matcher, a string or a range.
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Everything inside {...} (label matchers), [...] (ranges), "..." (strings) and by/without (...)
# (grouping labels) names no metric.
NOT_METRICS = re.compile(r'\{[^}]*\}|\[[^\]]*\]|"(?:[^"\\]|\\.)*"|\b(?:by|without)\s*\([^)]*\)')


def load_yaml(path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_dashboard():
    with DASHBOARD.open(encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard):
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_exprs(dashboard):
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                yield panel.get("title", "?"), target["expr"]


def metric_names(expr):
    """The metric names an expression selects: identifiers outside matchers, ranges, strings
    and grouping clauses that start with luna_ (PromQL functions and keywords never do)."""
    stripped = NOT_METRICS.sub(" ", expr)
    return {name for name in IDENTIFIER.findall(stripped) if name.startswith("luna_")}


def family(name):
    """The metric family a series name belongs to (histogram suffixes removed)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and METRICS.get(base, ("",))[0] == "histogram":
            return base
    return name


def compose_services():
    return load_yaml(COMPOSE)["services"]


def ops_mounts():
    """(service, host path) for every bind mount whose source lies under ./ops."""
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith("./ops") or source.startswith("ops/"):
                yield name, source


# ---------------------------------------------------------------------------------------------
# The metric list itself


def exposition():
    """A sample of the exposition the services serve, one series per family."""
    lines = []
    for name, (kind, labels) in METRICS.items():
        lines.append(f"# TYPE {name} {kind}")
        label_text = ",".join(f'{label}="x"' for label in sorted(labels))
        if kind == "histogram":
            bucket_labels = ",".join(filter(None, [label_text, 'le="+Inf"']))
            lines.append(f"{name}_bucket{{{bucket_labels}}} 1")
            lines.append(f"{name}_sum{{{label_text}}} 0.5")
            lines.append(f"{name}_count{{{label_text}}} 1")
        else:
            lines.append(f"{name}{{{label_text}}} 1")
    return "\n".join(lines) + "\n"


def test_the_metric_list_is_valid_prometheus_exposition():
    families = {f.name: f for f in text_string_to_metric_families(exposition())}
    # The parser names counter families without _total.
    expected = {name.removesuffix("_total") if kind == "counter" else name
                for name, (kind, _) in METRICS.items()}
    assert set(families) == expected
    for name, (kind, labels) in METRICS.items():
        fam = families[name.removesuffix("_total") if kind == "counter" else name]
        assert fam.type == kind, name
        for sample in fam.samples:
            assert set(sample.labels) - {"le"} == labels, sample
    for name, (kind, _) in METRICS.items():
        assert name.startswith("luna_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def test_metric_names_are_found_in_expressions():
    expr = ('histogram_quantile(0.99, sum by (le, kind) '
            '(rate(luna_publish_duration_seconds_bucket{job=~"luna_x", source="a"}[5m])))'
            ' / on (instance) group_left luna_queue_depth')
    assert metric_names(expr) == {"luna_publish_duration_seconds_bucket", "luna_queue_depth"}
    assert family("luna_publish_duration_seconds_bucket") == "luna_publish_duration_seconds"
    assert family("luna_queue_depth_count") == "luna_queue_depth_count"


# ---------------------------------------------------------------------------------------------
# The dashboard


def test_dashboard_is_the_luna_saver_dashboard():
    dashboard = load_dashboard()
    assert dashboard["uid"] == "luna-saver"
    assert dashboard["title"] == "Luna Saver"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_dashboard_metric_is_one_the_services_serve():
    dashboard = load_dashboard()
    exprs = list(panel_exprs(dashboard))
    assert exprs, "the dashboard has no queries"
    unknown = {}
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title!r}: no luna_ metric in {expr!r}"
        for name in names:
            if family(name) not in METRICS:
                unknown.setdefault(name, []).append(title)
    assert not unknown, f"metrics no service serves: {unknown}"


def test_dashboard_queries_only_known_labels():
    dashboard = load_dashboard()
    for title, expr in panel_exprs(dashboard):
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in clause.split(",") if label.strip()}
            known = set().union(*(METRICS.get(family(n), ("", set()))[1]
                                  for n in metric_names(expr)))
            assert labels <= known | {"le", "instance", "job"}, (title, expr)


def test_dashboard_panels_use_the_datasource_variable():
    dashboard = load_dashboard()
    ids = []
    for panel in all_panels(dashboard):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("needed", [
    "luna_images_saved_total",
    "luna_images_rejected_total",
    "luna_images_failed_total",
    "luna_gateway_request_duration_seconds",
    "luna_publish_duration_seconds",
    "luna_encode_duration_seconds",
    "luna_write_duration_seconds",
    "luna_bytes_written_total",
    "luna_queue_depth",
    "luna_queue_parked",
    "luna_save_slots_active",
    "luna_save_slots_busy",
    "luna_save_slots_configured",
    "luna_ws_subscribers",
    "luna_tasks_published_total",
])
def test_dashboard_shows(needed):
    exprs = [expr for _, expr in panel_exprs(load_dashboard())]
    used = {family(name) for expr in exprs for name in metric_names(expr)}
    assert needed in used


# ---------------------------------------------------------------------------------------------
# Compose, Prometheus, collector, Grafana provisioning


@pytest.mark.parametrize("path", [COMPOSE, PROMETHEUS, COLLECTOR, DATASOURCES, DASHBOARD_PROVIDERS],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    assert isinstance(load_yaml(path), dict)


def test_compose_has_the_monitoring_services():
    services = compose_services()
    for name in ["rabbitmq", "gateway", "saver", "status",
                 "otel-collector", "jaeger", "prometheus", "grafana"]:
        assert name in services, name
    for name, repository in [("otel-collector", "otel/opentelemetry-collector-contrib"),
                             ("prometheus", "prom/prometheus"), ("grafana", "grafana/grafana")]:
        image = services[name]["image"]
        assert image.startswith(repository + ":"), image
        assert not image.endswith(":latest"), image
    assert re.match(r"jaegertracing/(all-in-one|jaeger):\d", services["jaeger"]["image"])


def test_compose_sends_every_luna_service_to_the_collector():
    services = compose_services()
    for name in ["gateway", "saver", "status"]:
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317", name
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc", name


def test_compose_publishes_the_uis_on_the_bind_address():
    services = compose_services()
    for name, port in [("grafana", 3000), ("jaeger", 16686), ("prometheus", 9090)]:
        assert f"${{LUNA_BIND:-127.0.0.1}}:{port}:{port}" in services[name]["ports"], name


def test_every_mount_from_ops_exists():
    mounts = list(ops_mounts())
    mounted = {(ROOT / source).resolve() for _, source in mounts}
    for path in [PROMETHEUS, COLLECTOR, DATASOURCES, DASHBOARD_PROVIDERS]:
        assert path.resolve() in mounted, path
    assert DASHBOARD.parent.resolve() in mounted
    for service, source in mounts:
        assert (ROOT / source).exists(), f"{service} mounts {source}, which does not exist"


def test_prometheus_scrapes_every_luna_port_and_the_collector():
    config = load_yaml(PROMETHEUS)
    ports = set()
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                targets.add(target)
                ports.add(int(target.rsplit(":", 1)[1]))
        for dns in job.get("dns_sd_configs", []):
            assert dns.get("type", "SRV") == "A" and "port" in dns, job["job_name"]
            for name in dns["names"]:
                targets.add(f"{name}:{dns['port']}")
            ports.add(int(dns["port"]))
    assert LUNA_PORTS <= ports
    assert {"gateway:19283", "status:19284", "saver:19285"} <= targets
    collector = yaml_collector_prometheus_endpoint()
    assert f"otel-collector:{collector}" in targets


def yaml_collector_prometheus_endpoint():
    exporters = load_yaml(COLLECTOR)["exporters"]
    prometheus = [v for k, v in exporters.items() if k.split("/")[0] == "prometheus"]
    assert len(prometheus) == 1, "the collector needs one prometheus exporter"
    return int(prometheus[0]["endpoint"].rsplit(":", 1)[1])


def test_collector_takes_otlp_in_for_traces_and_metrics():
    config = load_yaml(COLLECTOR)
    receivers = config["receivers"]
    otlp = [k for k in receivers if k.split("/")[0] == "otlp"]
    assert otlp, "no otlp receiver"
    protocols = receivers[otlp[0]]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")

    pipelines = config["service"]["pipelines"]
    kinds = {name.split("/")[0] for name in pipelines}
    assert {"traces", "metrics"} <= kinds
    exporters = config["exporters"]
    for name, pipeline in pipelines.items():
        assert set(pipeline["receivers"]) & set(otlp), name
        for component in pipeline["exporters"]:
            assert component in exporters, f"{name} uses undefined exporter {component}"
        for component in pipeline.get("processors", []):
            assert component in config.get("processors", {}), f"{name}: undefined {component}"
    traces = [p for n, p in pipelines.items() if n.split("/")[0] == "traces"]
    jaeger = [e for p in traces for e in p["exporters"] if e.split("/")[0].startswith("otlp")]
    assert jaeger and exporters[jaeger[0]]["endpoint"] == "jaeger:4317"
    metrics = [p for n, p in pipelines.items() if n.split("/")[0] == "metrics"]
    assert any(e.split("/")[0] == "prometheus" for p in metrics for e in p["exporters"])


def test_grafana_provisioning():
    datasources = load_yaml(DATASOURCES)["datasources"]
    by_type = {d["type"]: d for d in datasources}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["prometheus"].get("isDefault") is True
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"
    assert sum(1 for d in datasources if d.get("isDefault")) == 1

    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    paths = {p["options"]["path"] for p in providers}
    grafana_mounts = compose_services()["grafana"]["volumes"]
    dashboards_mount = [v for v in grafana_mounts if v.startswith("./ops/grafana/dashboards:")]
    assert len(dashboards_mount) == 1
    assert dashboards_mount[0].split(":")[1] in paths


# --- a live `luna up`, read by the official Prometheus parser ------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, content_type=None):
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if content_type:
        request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


@pytest.fixture
def luna_up(tmp_path):
    """A `luna up` of its own, so its counters start at zero and count only this test."""
    build = subprocess.run(["nice", "cargo", "build", "-q", "--bin", "luna"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"cargo build failed:\n{build.stderr[-4000:]}"
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = (target if target.is_absolute() else ROOT / target) / "debug" / "luna"
    gateway, status = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUNA_", "OTEL_"))}
    log = (tmp_path / "luna-up.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "up", "--gateway-listen", f"127.0.0.1:{gateway}",
         "--status-listen", f"127.0.0.1:{status}", "--output-root", str(tmp_path / "out")],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    urls = (f"http://127.0.0.1:{gateway}", f"http://127.0.0.1:{status}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "luna-up.log").read_text()
            try:
                if all(http(f"{u}/readyz")[0] == 200 for u in urls):
                    break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "luna up never became ready"
            time.sleep(0.1)
        yield urls
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def scrape(url):
    status, content_type, body = http(f"{url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    # The reference parser; it raises on anything that is not valid exposition text.
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def test_live_metrics_parse_and_count_exactly_the_images_saved(luna_up):
    gateway, status = luna_up
    images = [{"pixels": bytes((x * 7 + i * 31) % 256 for x in range(24 * 24 * 3)),
               "width": 24, "height": 24, "format": fmt}
              for i, fmt in enumerate(["png", "png", "webp"])]
    body = msgpack.packb({"save_path": "metrics", "images": images})
    code, _, answer = http(f"{gateway}/v1/jobs", body, "application/msgpack")
    assert code == 202
    job_id = json.loads(answer)["job_id"]
    deadline = time.monotonic() + 30
    while json.loads(http(f"{status}/v1/jobs/{job_id}")[2])["state"] != "completed":
        assert time.monotonic() < deadline, "the job never completed"
        time.sleep(0.05)

    families = scrape(gateway)
    for name, (kind, labels) in METRICS.items():
        if name in families:
            assert families[name].type == kind, name
            for sample in families[name].samples:
                assert set(sample.labels) - {"le"} <= labels, (name, sample.labels)

    def total(name, **labels):
        # prometheus_client names counter families without the _total suffix.
        family = families[name.removesuffix("_total")]
        return sum(s.value for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    assert total("luna_images_saved_total") == 3
    assert total("luna_images_saved_total", format="png") == 2
    assert total("luna_images_saved_total", format="webp") == 1
    assert total("luna_tasks_published_total") == 3
    assert total("luna_jobs_accepted_total") == 1
    assert total("luna_events_relayed_total", type="image_saved") == 3
    encode = families["luna_encode_duration_seconds"]
    assert sum(s.value for s in encode.samples if s.name.endswith("_count")) == 3
    # luna up serves one process-wide set of metrics on every port.
    assert total("luna_images_saved_total") == sum(
        s.value for s in scrape(status)["luna_images_saved"].samples
        if s.name == "luna_images_saved_total")
