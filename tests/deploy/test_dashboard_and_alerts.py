"""The Grafana dashboard and the Prometheus alert rules: every PromQL expression parses and
names only metrics and labels a running syncd exports (a `syncd run` process against the broker
and the sandbox, scraped over HTTP), the rules pass `promtool check rules` and their `promtool
test rules` unit tests, and the dashboard follows Grafana practice."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import promql_parser
import pytest
import pytest_asyncio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from syncd import synth
from syncd.localstack import (
    DESTINATIONS,
    DaemonProcess,
    daemon_config,
    produce,
    running_sandbox,
    wait_for,
)
from syncd.sandbox.state import SandboxSettings
from tests.fixtures.kafka import KafkaCluster

ROOT = Path(__file__).resolve().parents[2]
CHART_FILES = ROOT / "helm" / "syncd" / "files"
RULES = ROOT / "deploy" / "alerts" / "syncd-rules.yml"
RULE_TESTS = ROOT / "deploy" / "alerts" / "syncd-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "syncd.json"
PROMTOOL = ROOT / ".tools" / "bin" / "promtool"  # installed by .ci/tools.sh

# Grafana variables stand in for values when an expression is parsed. The rate interval gets an
# odd duration so that a hard-coded range cannot pass for it.
RATE_INTERVAL = timedelta(minutes=4, seconds=33)
GRAFANA_VARIABLES = {"$__rate_interval": "4m33s", "$job": ".+", "$connection": ".*"}
ALERTS = {
    "SyncdConsumerLagGrowing",
    "SyncdBudgetExhausted",
    "SyncdConnectionBlocked",
    "SyncdJobsFailing",
    "SyncdJobsStuckPending",
    "SyncdTokenRefreshFailing",
    "SyncdDeadLetterRateHigh",
    "SyncdNoEventsConsumed",
    "SyncdDown",
    "SyncdMembersAtRisk",
    "SyncdAudienceTtlZero",
    "SyncdAudienceMembersHigh",
    "SyncdStoreLarge",
    "SyncdStoreGrowingFast",
    "SyncdAudienceTooSmall",
    "SyncdAudienceMatchRatioDropped",
    "SyncdAudienceJobsFailing",
    "SyncdMemberDeadLettersWaiting",
}
# Labels Prometheus attaches to every scraped series (the target's), not syncd.
TARGET_LABELS = {"job", "instance"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def label_values_queries() -> list[tuple[str, str]]:
    """(metric, label) of each query variable: `label_values(metric, label)`."""
    out: list[tuple[str, str]] = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["query"]["query"])
            assert query, var["query"]
            out.append((query[1], query[2]))
    return out


def dashboard_expressions() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    return exprs + [metric for metric, _ in label_values_queries()]  # a metric name each


def parse(expr: str) -> promql_parser.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return promql_parser.parse(expr)


def selected(expr: promql_parser.Expr, kind: type[Any]) -> list[Any]:
    found: list[Any] = []
    promql_parser.walk(expr, lambda node: found.append(node) if isinstance(node, kind) else None)
    return found


def exported_names(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of this exposition can produce, sampled or not: a
    labelled metric has no sample until its first labelled child exists, but its # TYPE line
    is there from the start."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            base = family.removesuffix("_total") if kind == "counter" else family
            names.update(base + suffix for suffix in suffixes[kind])
    return names


def sampled_labels(exposition: str) -> dict[str, set[str]]:
    """Series name -> label names of its samples (histogram buckets carry `le`), for the series
    that have at least one sample."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def selectors(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = selected(expr, promql_parser.VectorSelector)
    return found


def labels_used(expr: promql_parser.Expr) -> list[tuple[set[str], set[str]]]:
    """(label names, series names that must all carry them): each selector's matchers, each
    aggregation's `by`/`without` labels and each binary operation's `on`/`ignoring` labels,
    the target labels left out."""
    used: list[tuple[set[str], set[str]]] = []
    for vs in selectors(expr):
        matched = {m.name for m in vs.matchers.matchers} - TARGET_LABELS - {"__name__"}
        if matched:
            used.append((matched, {vs.name}))
    for agg in selected(expr, promql_parser.AggregateExpr):
        if agg.modifier is not None and agg.modifier.labels:
            used.append((set(agg.modifier.labels) - TARGET_LABELS, names_in(agg.expr)))
    for binary in selected(expr, promql_parser.BinaryExpr):
        matching = binary.modifier.matching if binary.modifier is not None else None
        if matching is not None and matching.labels:
            sides = names_in(binary.lhs) | names_in(binary.rhs)
            used.append((set(matching.labels) - TARGET_LABELS, sides))
    return [(labels, names) for labels, names in used if labels]


def names_in(expr: promql_parser.Expr) -> set[str]:
    return {vs.name for vs in selectors(expr)}


def all_expressions() -> list[str]:
    return dashboard_expressions() + [r["expr"] for r in rules()]


def labelled_series() -> set[str]:
    """Series whose labels some expression relies on: the scrape must hold samples of them."""
    used = [series for expr in all_expressions() for _, series in labels_used(parse(expr))]
    names = set().union(*used)
    return names | {metric for metric, _ in label_values_queries()}


# Every labelled series the dashboard and the alerts use gets samples: deliveries to both
# connections, dead letters, filtered audiences, dropped identifier values, a default country,
# budget waits (a tiny rolling window), 429s and retries (a throttle), PARTIALLYSUCCEEDED jobs
# with invalid records.
def extra_events() -> list[tuple[bytes, bytes]]:
    def event(profile_id: str, **fields: Any) -> tuple[bytes, bytes]:
        return profile_id.encode(), orjson.dumps({"profile_id": profile_id, **fields})

    return [
        event("d-1", identifiers={"email": "d1@example.com"}, audiences={"add": ["vip", "nope"]}),
        event(
            "d-2",
            identifiers={"email": "d2@example.com", "phone": "not a phone"},
            audiences={"remove": ["newsletter"]},
        ),
        (b"d-3", b"{not json"),
    ]


def audience_body(destination: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"syncd deploy test {destination['audience']}",
        "countryCode": destination["country_code"],
        "targetResource": {"connectionId": destination["connection_id"]},
        "metadata": {"ttl": 604800},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def exposition(kafka: KafkaCluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a `syncd run` process that has delivered events, scraped once all the
    labelled series the dashboard and the alerts use have samples."""
    tmp = tmp_path_factory.mktemp("scraped-syncd")
    topic, dlq = f"deploy-{tmp.name}", f"deploy-dlq-{tmp.name}"
    await kafka.create_topic(topic, partitions=2)
    await kafka.create_topic(dlq, partitions=1)
    settings = SandboxSettings(
        job_delay_s=0.2,
        rate_per_s=1000,
        burst=1000,
        partial_rate=0.5,
        invalid_record_rate=0.3,
        seed=7,
    )
    async with running_sandbox(settings) as sandbox:
        # audiences created in the sandbox: their metadata (ttl, audienceSize) can be read
        destinations = [
            {**d, "audience_id": sandbox.state.create_audience(audience_body(d))["audienceId"]}
            for d in DESTINATIONS
        ]
        raw = daemon_config(
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq=dlq,
            sandbox_url=sandbox.url,
            token_url=sandbox.token_url,
            store_url=f"sqlite+aiosqlite:///{tmp / 'syncd.db'}",
            batch={"max_records": 10, "linger_ms": 100},
            budget={"records_per_hour": 20, "window_seconds": 2},
            shutdown={"drain_seconds": 1.0},
            destinations=destinations,
        )
        daemon = DaemonProcess(tmp, raw).start()
        try:
            await daemon.wait_ready()
            sandbox.state.set_faults({"throttle_for_s": 1.5})
            synthetic = list(synth.events(60, seed=11, audiences=("vip", "newsletter")))
            await produce(kafka.bootstrap, topic, [*synthetic, *extra_events()])
            wanted = labelled_series()

            async def every_labelled_series_sampled() -> bool:
                daemon.check_alive()
                _, text = await daemon.get("/metrics")
                return wanted <= set(sampled_labels(text))

            try:
                await wait_for(every_labelled_series_sampled, 120, "samples of " + str(wanted))
            except AssertionError:
                _, text = await daemon.get("/metrics")
                missing = wanted - set(sampled_labels(text))
                raise AssertionError(f"no samples of {sorted(missing)}") from None
            status, text = await daemon.get("/metrics")
            assert status == 200
            return text
        finally:
            await daemon.terminate()


@pytest.mark.integration
@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_expression_names_only_exported_metrics_and_labels(
    source: str, exposition: str
) -> None:
    exported = exported_names(exposition)
    labels = sampled_labels(exposition)
    assert {"syncd_records_sent_total", "syncd_job_completion_seconds_bucket"} <= exported
    exprs = dashboard_expressions() if source == "dashboard" else [r["expr"] for r in rules()]
    assert exprs
    for expr in exprs:
        tree = parse(expr)
        names = names_in(tree)
        assert names, f"{expr} selects no metric by name"
        assert names <= exported, f"{expr} names metrics syncd does not export"
        for used, series in labels_used(tree):
            for name in series:
                assert used <= labels[name], f"{expr}: {name} has no label {used - labels[name]}"
    if source == "dashboard":
        for metric, label in label_values_queries():
            assert label in labels[metric] | TARGET_LABELS, f"label_values({metric}, {label})"


@pytest.mark.integration
def test_a_ready_syncd_exports_syncd_ready_1(exposition: str) -> None:
    assert sampled_labels(exposition)["syncd_ready"] == set()
    assert "syncd_ready 1.0" in exposition.splitlines()


def test_dashboard_takes_its_datasource_from_a_variable() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == ref
    for panel in panels():
        assert panel["datasource"] == ref, panel["title"]
        assert all(t["datasource"] == ref for t in panel["targets"]), panel["title"]


def test_every_panel_has_a_unit_and_ranges_use_the_rate_interval() -> None:
    for panel in panels():
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["description"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            ranges = [
                m.range for m in selected(parse(target["expr"]), promql_parser.MatrixSelector)
            ]
            assert all(r == RATE_INTERVAL for r in ranges), target["expr"]
            if "histogram_quantile" in target["expr"] or "rate(" in target["expr"]:
                assert ranges, target["expr"]


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    titles = {p["title"] for p in panels()}
    assert {
        "Throughput by action",
        "Budget used vs remaining",
        "Consumer lag",
        "Jobs by state",
        "Job completion time",
        "Request latency",
        "429s and retries",
        "Dead letters by reason",
        "Match outcome: processed rate",
        "Invalid records",
        "Blocked connections",
        "Audience size (Amazon)",
        "Audience ttl",
        "Members by state",
        "TTL refreshes",
        "Members at risk of expiring",
        "Match ratio",
        "Failed jobs in a row",
    } <= titles
    [blocked] = [p for p in panels() if p["title"] == "Blocked connections"]
    assert [names_in(parse(t["expr"])) for t in blocked["targets"]] == [
        {"syncd_connection_blocked"}
    ]
    assert "{{cause}}" in blocked["targets"][0]["legendFormat"]
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
    assert dashboard()["uid"] == "syncd"


@pytest.mark.parametrize("source", [RULES, DASHBOARD], ids=lambda p: p.name)
def test_the_chart_ships_the_deploy_files_unchanged(source: Path) -> None:
    """deploy/ is the source; a chart reads only its own files, so it carries a copy."""
    copy = CHART_FILES / source.name
    assert copy.read_bytes() == source.read_bytes(), f"{copy} is stale: run `make chart-files`"


def test_the_alerts_the_issue_names_exist_with_severity_and_annotations() -> None:
    assert {r["alert"] for r in rules()} == ALERTS
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert rule["for"]


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fired == ALERTS
    assert silent == ALERTS


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL.is_file(), f"{PROMTOOL} is missing: run .ci/tools.sh"
    return subprocess.run(
        [str(PROMTOOL), *args],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
