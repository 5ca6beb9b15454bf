"""What ships under deploy/ for running the daemon as home labs do, checked by the tools that own each format:
the systemd unit by `systemd-analyze verify`, the Prometheus rules by `promtool check rules` and their own unit
tests (`promtool test rules`), the Grafana dashboard's queries by promtool's PromQL parser; and every metric they
name is one the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # .ci/run installs them; a missing tool fails here rather than skipping the check
        pytest.fail(f"{name} is missing: apt-get install {'prometheus' if name == 'promtool' else 'systemd'}")
    return path


def exported_metrics() -> set[str]:
    """Metric families the daemon exports: the counters and histograms of `Metrics`, the gauges and counters the
    service reads at scrape time (the names as written in the source; histograms add _bucket, _sum, _count)."""
    names: set[str] = set()
    for src in ("daemon/delivery/metrics.py", "daemon/service.py"):
        names |= set(re.findall(r'"(ltu_[a-z_]+)"', (REPO / src).read_text()))
    for h in [n for n in names if n.endswith(("_seconds", "_latency_seconds"))]:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return names


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(ltu_[a-z_]+)\b", expr))


def test_every_exported_metric_is_documented() -> None:
    doc = (REPO / "docs" / "integrations.md").read_text()
    families = {n for n in exported_metrics() if not n.endswith(("_bucket", "_sum", "_count"))}
    assert len(families) >= 20 and {n for n in families if f"`{n}`" not in doc} == set()


def test_the_service_unit_verifies_clean_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "ltu-daemon.service").read_text()
    keys = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert keys["DynamicUser"] == "yes" and keys["ProtectSystem"] == "strict" and keys["Restart"] == "on-failure"
    assert keys["StateDirectory"] == keys["CacheDirectory"] == keys["ConfigurationDirectory"] == "ltu-daemon"
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID" and keys["RestartPreventExitStatus"] == "2 3"
    # the daemon keeps its store in $XDG_DATA_HOME/ltu-daemon: that must be the StateDirectory
    env = " ".join(re.findall(r"^Environment=(.*)$", unit, re.M)).split()
    assert "XDG_DATA_HOME=/var/lib" in env and "XDG_CACHE_HOME=/var/cache" in env
    # verify checks that ExecStart exists: point it at this environment's entry point
    exe = Path(sys.executable).parent / "ltu-daemon"
    assert exe.exists()
    (tmp_path / "ltu-daemon.service").write_text(unit.replace("/opt/ltu-daemon/bin/ltu-daemon", str(exe)))
    r = subprocess.run(
        [tool("systemd-analyze"), "verify", str(tmp_path / "ltu-daemon.service")],
        capture_output=True,
        text=True,
        env={"SYSTEMD_LOG_LEVEL": "notice", "PATH": "/usr/bin:/bin"},
    )
    # verify exits 0 even for an unknown key or a bad value: it only warns. Any output is a finding.
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_the_prometheus_rules_check_and_fire_as_their_tests_say() -> None:
    promtool = tool("promtool")
    rules = DEPLOY / "prometheus" / "ltu-daemon.rules.yml"
    r = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(
        [promtool, "test", "rules", "ltu-daemon.rules.test.yml"], cwd=rules.parent, capture_output=True, text=True
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    used = metrics_in(rules.read_text())
    assert used and used <= exported_metrics(), used - exported_metrics()
    # every alert has a test in the test file
    alerts = set(re.findall(r"- alert: (\w+)", rules.read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (rules.parent / "ltu-daemon.rules.test.yml").read_text()))
    assert alerts == tested


def test_the_grafana_dashboard_queries_parse_and_name_exported_metrics(tmp_path: Path) -> None:
    dash = json.loads((DEPLOY / "grafana" / "ltu-daemon.json").read_text())
    assert dash["uid"] == "ltu-daemon" and {v["name"] for v in dash["templating"]["list"]} == {"datasource", "stream"}
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    used = set().union(*map(metrics_in, exprs))
    assert used <= exported_metrics(), used - exported_metrics()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # promtool parses PromQL in rule files: wrap each query (Grafana's variables filled in) as a recording rule
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, e in enumerate(exprs):
        e = e.replace("$__rate_interval", "5m").replace("$stream", ".*")
        lines += [f"      - record: dashboard:q{i}", f"        expr: {json.dumps(e)}"]
    (tmp_path / "dashboard.rules.yml").write_text("\n".join(lines) + "\n")
    r = subprocess.run(
        [tool("promtool"), "check", "rules", str(tmp_path / "dashboard.rules.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in r.stdout, r.stdout + r.stderr


def test_the_compose_file_matches_the_image() -> None:
    """The compose file cannot be brought up here (its mosquitto image needs a registry): its parts are checked
    against the Containerfile instead: the image's volumes, port, config folder and health check."""
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    containerfile = (DEPLOY / "container" / "Containerfile").read_text()
    daemon = compose["services"]["ltu-daemon"]
    assert set(compose["services"]) == {"ltu-daemon", "mosquitto"} and daemon["depends_on"] == ["mosquitto"]
    mounts = {v.split(":")[1] for v in daemon["volumes"]}
    volumes = set(json.loads(re.search(r"^VOLUME (\[.*\])$", containerfile, re.M).group(1)))  # type: ignore[union-attr]
    assert volumes | {"/etc/ltu-daemon"} == mounts
    entrypoint = (DEPLOY / "container" / "entrypoint.sh").read_text()
    assert daemon["volumes"][0].endswith(":/etc/ltu-daemon:ro") and "config=/etc/ltu-daemon/config.toml" in entrypoint
    assert daemon["ports"] == ["8765:8765"] and "EXPOSE 8765" in containerfile
    assert "/healthz" in " ".join(daemon["healthcheck"]["test"]) and "start-period=120s" in containerfile
    assert daemon["healthcheck"]["start_period"] == "120s" and daemon["stop_grace_period"] == "30s"
    named = {
        v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", []) if not v.startswith(".")
    }
    assert named == set(compose["volumes"])
