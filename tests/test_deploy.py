"""The deployment files: the Grafana dashboard only queries metrics the server exports, configs parse."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from proctor.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "proctor.json"

# Words in a PromQL expression that are not metric names.
_PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "count_over_time", "day_of_month", "day_of_week", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2", "log10",
    "max_over_time", "min_over_time", "minute", "month", "predict_linear", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time",
    "sum_over_time", "time", "timestamp", "vector", "year", "last_over_time", "present_over_time",
    "label_values", "query_result", "label_names", "metrics",  # Grafana template functions
}
_PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                        "bottomk", "topk", "quantile"}
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                    "unless", "offset", "inf", "nan", "atan2"}
# Labels Prometheus adds at scrape time, and the histogram bucket label.
_SCRAPE_LABELS = {"job", "instance", "le", "service"}


def exported_names(metrics: Metrics) -> set[str]:
    """Every sample name a scrape can show, with the suffixes prometheus_client adds (_total, _bucket, ...)."""
    names = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.add(sample.name)
        # A labelled metric with no child yet has no sample; its names still exist once it is used.
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                    "summary": ("_sum", "_count", "")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def exported_labels(metrics: Metrics) -> set[str]:
    labels = set(_SCRAPE_LABELS)
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.update(sample.labels)
    for name, metric in vars(metrics).items():
        labels.update(getattr(metric, "_labelnames", ()))
    return labels


def _strip(expr: str) -> str:
    """Remove what can hold identifiers that are not metric names: strings, matchers, ranges, variables."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "1", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return expr


def promql_parts(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression refers to."""
    labels: set[str] = set()
    # Grafana's label_values(selector, label): the second argument is a label name.
    grafana = re.fullmatch(r"\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*", expr, re.S)
    if grafana:
        expr = grafana.group(1)
        labels.add(grafana.group(2))
    stripped = _strip(expr)
    # Label lists of by/without/on/ignoring/group_left/group_right clauses.
    for match in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", stripped):
        labels.update(x.strip() for x in match.group(1).split(",") if x.strip())
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", stripped)
    # Label names inside selectors {a="x", b=~"y"}.
    for match in re.finditer(r"\{([^}]*)\}", stripped):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", match.group(1)))
    stripped = re.sub(r"\{[^}]*\}", " ", stripped)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", stripped):
        word, call = match.group(1), match.group(2)
        if word in _PROMQL_KEYWORDS:
            continue
        if call and (word in _PROMQL_FUNCTIONS or word in _PROMQL_AGGREGATIONS):
            continue
        if word in _PROMQL_AGGREGATIONS and re.match(r"\s*(by|without)\b", stripped[match.end():]):
            continue
        if re.fullmatch(r"\d*e\d+", word):
            continue
        names.add(word)
    return names, labels


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expression) for every panel target and every template variable query."""
    out = []

    def panels(items: list) -> None:
        for panel in items:
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((f"panel {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
            panels(panel.get("panels", []))

    panels(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and query:
            out.append((f"variable {var['name']}", query))
    return out


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_parser_finds_metrics_and_skips_functions_keywords_and_labels() -> None:
    names, labels = promql_parts(
        'histogram_quantile(0.99, sum by (le, instance) (rate(proctor_frame_latency_seconds_bucket'
        '{job="$job", instance=~"$instance"}[$__rate_interval]))) / on (instance) group_left '
        'sum without (reason) (proctor_queue_depth offset 5m) * 1e3 and max(up)')
    assert names == {"proctor_frame_latency_seconds_bucket", "proctor_queue_depth", "up"}
    assert labels == {"le", "instance", "job", "reason"}


def test_parser_reads_grafana_label_values() -> None:
    assert promql_parts('label_values(proctor_active_streams{job="$job"}, instance)') == (
        {"proctor_active_streams"}, {"job", "instance"})


def test_parser_catches_a_misspelt_metric(metrics: Metrics) -> None:
    names, _ = promql_parts('sum(rate(proctor_frames_recieved_total[5m]))')
    assert names - exported_names(metrics) == {"proctor_frames_recieved_total"}


def test_exported_names_include_suffixes_and_process_metrics(metrics: Metrics) -> None:
    names = exported_names(metrics)
    for name in ("proctor_frames_received_total", "proctor_frame_latency_seconds_bucket",
                 "proctor_batch_size_count", "proctor_queue_depth", "proctor_websocket_errors_total",
                 "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert name in names
    assert "proctor_frames_received" not in names  # counters are exported with _total only


def test_dashboard_is_importable(dashboard: dict) -> None:
    assert dashboard["title"] and dashboard["uid"]
    assert any(i["pluginId"] == "prometheus" for i in dashboard["__inputs"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        # Import asks for the data source once; every panel and query must point at that input.
        for source in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if panel["type"] != "row":
                assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_every_dashboard_query_names_only_exported_metrics(dashboard: dict, metrics: Metrics) -> None:
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 15
    known, known_labels = exported_names(metrics), exported_labels(metrics)
    used = set()
    for where, expr in queries:
        names, labels = promql_parts(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert names <= known, f"{where}: {sorted(names - known)} not exported by the server ({expr!r})"
        assert labels <= known_labels, f"{where}: labels {sorted(labels - known_labels)} do not exist"
        used |= names
    # The panels: frames in/dropped, latency percentiles, batch size, queue depth, streams, alerts.
    for name in ("proctor_frames_received_total", "proctor_frames_dropped_total",
                 "proctor_frame_latency_seconds_bucket", "proctor_batch_size_sum", "proctor_queue_depth",
                 "proctor_active_streams", "proctor_alerts_total"):
        assert name in used, f"the dashboard has no panel over {name}"


def test_prometheus_config_scrapes_metrics_path() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["proctor"]  # the dashboard's $job default
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert len(targets) >= 2 and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)
    assert job["authorization"]["type"] == "Bearer"


def test_nginx_config_upgrades_websockets() -> None:
    text = (DEPLOY / "nginx" / "proctor.conf").read_text()
    ws_block = text[text.index("location /ws/"):]
    ws_block = ws_block[:ws_block.index("}")]
    for line in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                 "proxy_set_header Connection $connection_upgrade;"):
        assert line in ws_block
    assert "map $http_upgrade $connection_upgrade" in text
    assert re.search(r"listen 443 ssl", text) and "ssl_certificate " in text
    assert len(re.findall(r"^\s*server \d", text, re.M)) >= 2, "the upstream should list several nodes"


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx, openssl = shutil.which("nginx") or (Path("/usr/sbin/nginx") if Path("/usr/sbin/nginx").exists()
                                                else None), shutil.which("openssl")
    if nginx is None or openssl is None:
        pytest.skip(f"nginx -t not run: {'nginx' if nginx is None else 'openssl'} is not installed "
                    "(apt-get install nginx-light openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    site = (DEPLOY / "nginx" / "proctor.conf").read_text()
    site = site.replace("/etc/ssl/proctor/fullchain.pem", str(cert)).replace("/etc/ssl/proctor/privkey.pem", str(key))
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "temp"
    temp.mkdir()
    temps = "".join(f"  {kind}_temp_path {temp};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n{temps}  include {tmp_path}/site.conf;\n}}\n")
    done = subprocess.run([str(nginx), "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                           "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (apt-get install prometheus): PromQL and config not checked by Prometheus")
    return path


def test_promtool_accepts_the_scrape_config(tmp_path: Path) -> None:
    promtool = _promtool()
    token = tmp_path / "token"
    token.write_text("secret\n")
    config = (DEPLOY / "prometheus.yml").read_text().replace("/etc/prometheus/proctor_metrics_token", str(token))
    (tmp_path / "prometheus.yml").write_text(config)
    done = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _as_promql(expr: str) -> str:
    """A dashboard expression as Prometheus itself would get it from Grafana."""
    grafana = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", expr, re.S)
    if grafana:
        expr = grafana.group(1)
    return (expr.replace("$__rate_interval", "1m").replace("$job", "proctor").replace("$instance", ".*"))


def test_promtool_parses_every_dashboard_query(tmp_path: Path, dashboard: dict) -> None:
    promtool = _promtool()
    queries = dashboard_queries(dashboard)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": _as_promql(expr)} for i, (_, expr) in enumerate(queries)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(queries)} rules found" in done.stdout
