"""The Helm chart, rendered by Helm's own engine (helm-python-sdk): lint, Kubernetes schema
validation of every built-in kind, structure of the Prometheus Operator objects, and the
config.toml it renders loading through syncd's own config loader."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes_validate import utils as kube

from syncd import config as syncd_config
from syncd import source

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "syncd"
PRODUCTION = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
KUBE_VERSION = kube.latest_version()  # the newest Kubernetes kubernetes-validate knows
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Keys of config.toml the chart writes itself: secrets as files, the store URL.
CHART_OWNED = {
    "amazon": {"client_secret", "refresh_token"},
    "kafka": {"sasl_password"},
    "store": {"url"},
}
VALUE_SETS = {"default": {}, "production": PRODUCTION}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = chart.render(values, name="rel", namespace="syncd", is_install=True)
    return [
        doc
        for path, text in sorted(manifests.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [
        d for d in docs if d["kind"] == kind and not d["metadata"]["name"].endswith("-dashboard")
    ]
    return doc


def config_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(only(docs, "ConfigMap")["data"]["config.toml"])


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert report["messages"] == []


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_pass_strict_kubernetes_validation(
    chart: helm.Chart, values: dict[str, Any]
) -> None:
    docs = render(chart, values)
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kube.validate(doc, KUBE_VERSION, strict=True)  # raises on the first violation
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds


def test_production_values_render_every_optional_object(chart: helm.Chart) -> None:
    docs = render(chart, PRODUCTION)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )  # no Secret: the production values name an existing one
    deployment = only(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    monitor = only(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    service = only(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]

    rule = only(docs, "PrometheusRule")
    shipped = yaml.safe_load((CHART / "files" / "syncd-rules.yml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == shipped
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    policy = only(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 443, 5432, 9093} <= egress_ports


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_pod_is_locked_down_and_probed(chart: helm.Chart, values: dict[str, Any]) -> None:
    docs = render(chart, values)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["requests"]["memory"]
    [syncd] = pod["containers"]
    assert syncd["command"] == ["syncd", "run", "--config", "/etc/syncd/config.toml"]
    assert syncd["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert syncd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert syncd["ports"] == [{"name": "metrics", "containerPort": 9108, "protocol": "TCP"}]
    drain = config_toml(docs)["shutdown"]["drain_seconds"]
    # after the drain: the final commit and leaving the group, each bounded (source/consumer.py)
    exit_s = source.COMMIT_TIMEOUT_S + source.STOP_TIMEOUT_S
    assert pod["terminationGracePeriodSeconds"] == math.ceil(drain) + 20
    assert pod["terminationGracePeriodSeconds"] >= drain + exit_s
    account = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert all(a["automountServiceAccountToken"] is False for a in account)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_config_loads_in_syncd(
    chart: helm.Chart, values: dict[str, Any], tmp_path: Path
) -> None:
    """The ConfigMap is a config syncd accepts once the secret files (and the Kafka TLS files,
    from volumes the pod mounts) exist where it points."""
    docs = render(chart, values)
    raw = config_toml(docs)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    [secret_mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "secrets"]
    contents = {
        "client-secret": "lwa-secret",
        "refresh-token": "Atzr|token",
        "store-url": "postgresql+asyncpg://syncd:pw@db:5432/syncd?ssl=verify-full",
        "kafka-sasl-password": "sasl-pw",
    }
    for section in raw.values():
        for key, path in list(section.items()) if isinstance(section, dict) else []:
            if key.endswith("_file"):
                assert path.startswith(secret_mount["mountPath"] + "/")
                local = tmp_path / Path(path).name
                local.write_text(contents[local.name])
                section[key] = str(local)
    mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):  # syncd reads them at load
        if path := raw.get("kafka", {}).get(key):
            assert any(path.startswith(m + "/") for m in mounts), path
            local = tmp_path / key
            local.write_text("-----BEGIN CERTIFICATE-----\n")
            raw["kafka"][key] = str(local)
    cfg = syncd_config.from_mapping(raw, environ={})
    assert cfg.amazon.client_secret == "lwa-secret"
    assert cfg.amazon.refresh_token == "Atzr|token"
    assert cfg.http.address[1] == pod["containers"][0]["ports"][0]["containerPort"]
    if values is PRODUCTION:
        assert cfg.store.url == contents["store-url"]
        assert cfg.kafka.sasl_password == "sasl-pw"
        assert [d.audience_id for d in cfg.destinations] == [
            347891234567890123,
            347891234567890124,
        ]
    else:
        assert cfg.store.url == "sqlite+aiosqlite:////var/lib/syncd/syncd.db"


@pytest.mark.parametrize("mechanism", ["", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
def test_the_sasl_password_file_follows_the_security_protocol(
    chart: helm.Chart, protocol: str, mechanism: str, tmp_path: Path
) -> None:
    """syncd authenticates under SASL_* whatever the mechanism ("" = PLAIN): the password file
    is configured exactly then (it was only with a mechanism, so an empty one dropped it)."""
    kafka = {"security_protocol": protocol, "sasl_mechanism": mechanism, "sasl_username": "u"}
    raw = config_toml(render(chart, {"config": {"kafka": kafka}}))
    sasl = protocol.startswith("SASL_")
    assert ("sasl_password_file" in raw["kafka"]) == sasl
    if sasl:
        assert raw["kafka"]["sasl_password_file"].endswith("/kafka-sasl-password")
        password = tmp_path / "kafka-sasl-password"
        password.write_text("sasl-pw")
        raw["kafka"]["sasl_password_file"] = str(password)
        raw["amazon"] = {}  # its secret files are not the point here
        assert syncd_config.from_mapping(raw, environ={}).kafka.sasl_password == "sasl-pw"


@pytest.mark.parametrize("seconds", [1e19, 9.3e18, 2.0**53 + 2, 604800.0, 0.5, 1e-7])
def test_a_number_renders_as_the_same_number(chart: helm.Chart, seconds: float) -> None:
    """An integral float past int64 was rendered through int64: 1e19 became
    -9223372036854775808."""
    raw = config_toml(render(chart, {"config": {"poll": {"max_interval_s": seconds}}}))
    assert raw["poll"]["max_interval_s"] == seconds


def test_values_cover_every_config_key_with_syncd_defaults(chart: helm.Chart) -> None:
    """values.yaml's config mirrors syncd.config: same keys (plus the chart-owned ones), same
    defaults, so the chart cannot drift from the daemon."""
    assert chart.schema is not None
    schema_config = chart.schema["properties"]["config"]["properties"]
    defaults = chart.values["config"]
    for field in dataclasses.fields(syncd_config.Config):
        if field.name == "destinations":
            continue
        section = getattr(syncd_config.Config(), field.name)
        keys = {f.name for f in dataclasses.fields(section)}
        owned = CHART_OWNED.get(field.name, set())
        assert set(schema_config[field.name]["properties"]) == keys - owned, field.name
        assert schema_config[field.name]["additionalProperties"] is False
        expected = {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(section).items()
            if k not in owned
        }
        if field.name == "kafka":  # the chart points at an in-cluster broker by default
            expected["bootstrap_servers"] = "kafka:9092"
        assert defaults[field.name] == expected, field.name
    assert set(schema_config) == {f.name for f in dataclasses.fields(syncd_config.Config)}


def schema_values(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every value the schema describes: properties, array items and map values (the branches
    of an anyOf are alternatives of one value, described by it)."""
    for name, sub in node.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from schema_values(sub, f"{path}.{name}")
    for key, suffix in (("items", "[]"), ("additionalProperties", ".*")):
        if isinstance(node.get(key), dict):
            yield path + suffix, node[key]
            yield from schema_values(node[key], path + suffix)
    for branch in node.get("anyOf", []):
        yield from schema_values(branch, path)


def test_every_value_in_the_schema_has_a_description(chart: helm.Chart) -> None:
    assert chart.schema is not None
    values = dict(schema_values(chart.schema))
    assert ".resources.requests" in values
    assert ".networkPolicy.egress.extra[].ports[].protocol" in values
    assert [path for path, sub in values.items() if not sub.get("description")] == []


def test_secrets_come_from_an_existing_secret_or_one_the_chart_creates(
    chart: helm.Chart,
) -> None:
    created = render(
        chart,
        {
            "secrets": {
                "clientSecret": "s3",
                "refreshToken": "rt",
                "storeUrl": "postgresql+asyncpg://u:p@db/x",
            },
            "store": {"engine": "postgresql"},
        },
    )
    secret = only(created, "Secret")
    assert secret["stringData"] == {
        "client-secret": "s3",
        "refresh-token": "rt",
        "store-url": "postgresql+asyncpg://u:p@db/x",
    }
    volumes = only(created, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "secrets",
        "secret": {"secretName": "rel-syncd", "defaultMode": 0o440},
    } in volumes
    assert "s3" not in only(created, "ConfigMap")["data"]["config.toml"]

    existing = render(chart, PRODUCTION)
    assert not [d for d in existing if d["kind"] == "Secret"]
    volumes = only(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    [secret_volume] = [v for v in volumes if v["name"] == "secrets"]
    assert secret_volume["secret"]["secretName"] == "syncd-credentials"


def test_config_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = only(render(chart, values), "Deployment")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"log": {"level": "debug"}}})


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar(chart: helm.Chart) -> None:
    [dashboard] = [d for d in render(chart, {}) if d["metadata"]["name"] == "rel-syncd-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (CHART / "files" / "syncd.json").read_text()
    assert dashboard["data"]["syncd.json"] == shipped.rstrip("\n")


@settings(max_examples=25)
@given(
    drain=st.floats(min_value=0, max_value=3600, allow_nan=False),
    margin=st.integers(min_value=0, max_value=120),
    port=st.integers(min_value=1, max_value=65535),
)
def test_grace_period_and_port_follow_the_config(
    chart: helm.Chart, drain: float, margin: int, port: int
) -> None:
    values = {
        "terminationGracePeriodMarginSeconds": margin,
        "config": {"shutdown": {"drain_seconds": drain}, "http": {"listen": f"0.0.0.0:{port}"}},
    }
    docs = render(chart, values)
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == math.ceil(drain) + margin
    assert pod["terminationGracePeriodSeconds"] >= drain
    assert pod["containers"][0]["ports"][0]["containerPort"] == port
    assert only(docs, "Service")["spec"]["ports"][0]["port"] == port


@pytest.mark.parametrize(
    ("values", "error", "message"),
    [
        ({"replicaCount": 3}, helm.HelmRenderError, "needs store.engine=postgresql"),
        (
            {"replicaCount": 2, "store": {"engine": "sqlite", "sqlite": {"existingClaim": "pvc"}}},
            helm.HelmRenderError,
            "needs store.engine=postgresql",
        ),
        ({"replicaCount": "three"}, helm.HelmValuesError, "/replicaCount"),
        ({"config": {"batch": {"max_records": "6000"}}}, helm.HelmValuesError, "max_records"),
        ({"config": {"batch": {"max_records": 6001}}}, helm.HelmValuesError, "max_records"),
        ({"config": {"amazon": {"client_secret": "x"}}}, helm.HelmValuesError, "client_secret"),
        ({"config": {"kafka": {"topics": "t"}}}, helm.HelmValuesError, "topics"),
        (
            {
                "config": {
                    "destinations": [{"audience": "a", "connection_id": "c", "audience_id": 5}]
                }
            },
            helm.HelmValuesError,
            "audience_id",
        ),
        ({"store": {"engine": "postgresql"}}, helm.HelmRenderError, "secrets.storeUrl"),
        (
            {"secrets": {"storeUrl": "postgresql+asyncpg://u:p@h/d"}},
            helm.HelmRenderError,
            "storeUrl",
        ),
        ({"replicas": 1}, helm.HelmValuesError, "replicas"),
        (
            {"store": {"sqlite": {"volume": "emptyDir", "existingClaim": "pvc"}}},
            helm.HelmRenderError,
            "store.sqlite.existingClaim",
        ),
        (
            {**PRODUCTION, "store": {"engine": "postgresql", "sqlite": {"existingClaim": "pvc"}}},
            helm.HelmRenderError,
            "store.sqlite.existingClaim",
        ),
        (
            {"store": {"postgresql": {"caSecret": "ca"}}},
            helm.HelmRenderError,
            "store.postgresql.caSecret",
        ),
        ({"store": {"sqlite": {"volume": "hostPath"}}}, helm.HelmValuesError, "volume"),
        (
            {"networkPolicy": {"egress": {"extra": [{"to": []}]}}},
            helm.HelmValuesError,
            "ports",
        ),
    ],
    ids=[
        "sqlite-3-replicas",
        "sqlite-pvc-2-replicas",
        "replicas-string",
        "number-as-string",
        "over-post-limit",
        "secret-in-configmap",
        "list-as-string",
        "audience-id-number",
        "postgresql-without-url",
        "url-without-postgresql",
        "unknown-key",
        "claim-on-an-emptydir",
        "claim-with-postgresql",
        "postgresql-ca-with-sqlite",
        "unknown-volume",
        "egress-rule-without-ports",
    ],
)
def test_bad_values_are_refused(
    chart: helm.Chart, values: dict[str, Any], error: type[helm.HelmError], message: str
) -> None:
    with pytest.raises(error, match=message.replace(".", r"\.")):
        chart.render(values, name="rel", namespace="syncd")


def test_production_values_scale_out_with_postgresql(chart: helm.Chart) -> None:
    """The rule that refuses SQLite replicas lets PostgreSQL ones through."""
    docs = render(chart, {**PRODUCTION, "replicaCount": 12})
    assert only(docs, "Deployment")["spec"]["replicas"] == 12
    assert config_toml(docs)["store"] == {
        "auto_upgrade": False,
        "statement_timeout_s": 60.0,
        "url_file": "/var/run/secrets/syncd/store-url",
    }


def test_sqlite_store_lives_on_a_persistent_volume_claim_by_default(chart: helm.Chart) -> None:
    """A replaced pod keeps the budget window and the tracked jobs: the SQLite file is on a
    ReadWriteOnce claim, written by one pod at a time (one replica, Recreate)."""
    docs = render(chart, {})
    [claim] = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    deployment = only(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in (
        pod["volumes"]
    )
    for container in pod["containers"] + pod["initContainers"]:
        assert {"name": "data", "mountPath": "/var/lib/syncd"} in container["volumeMounts"]
    assert config_toml(docs)["store"]["url"] == "sqlite+aiosqlite:////var/lib/syncd/syncd.db"

    sized = render(chart, {"store": {"sqlite": {"size": "5Gi", "storageClassName": "ssd"}}})
    [claim] = [d for d in sized if d["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "ssd"

    existing = render(chart, {"store": {"sqlite": {"existingClaim": "syncd-data"}}})
    assert not [d for d in existing if d["kind"] == "PersistentVolumeClaim"]
    volumes = only(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "syncd-data"}} in volumes


def test_an_empty_dir_store_only_when_asked_for(chart: helm.Chart) -> None:
    docs = render(chart, {"store": {"sqlite": {"volume": "emptyDir"}}})
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    volumes = only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}} in volumes
    notes = chart.render(
        {"store": {"sqlite": {"volume": "emptyDir"}}}, name="rel", namespace="syncd"
    )
    assert "WARNING: the SQLite store lives in an emptyDir" in notes["syncd/templates/NOTES.txt"]
    assert (
        "emptyDir"
        not in chart.render({}, name="rel", namespace="syncd")["syncd/templates/NOTES.txt"]
    )
    production = render(chart, PRODUCTION)  # PostgreSQL: nothing to keep in the pod
    assert not [d for d in production if d["kind"] == "PersistentVolumeClaim"]


def egress_ports(policy: dict[str, Any]) -> set[tuple[int, str]]:
    rules = policy["spec"]["egress"]
    assert all(rule.get("ports") for rule in rules)  # a rule without ports opens every port
    return {(p["port"], p["protocol"]) for rule in rules for p in rule["ports"]}


DNS = {(53, "UDP"), (53, "TCP")}


@pytest.mark.parametrize(
    ("values", "ports"),
    [
        ({}, DNS | {(9092, "TCP"), (443, "TCP")}),
        (
            {"config": {"kafka": {"bootstrap_servers": "k-0:9093, k-1:9094,k-2:9093,k-3"}}},
            DNS | {(9093, "TCP"), (9094, "TCP"), (9092, "TCP"), (443, "TCP")},
        ),
        (
            {"networkPolicy": {"egress": {"kafka": {"ports": [19092]}}}},
            DNS | {(19092, "TCP"), (443, "TCP")},
        ),
        (
            {
                "store": {"engine": "postgresql"},
                "secrets": {"storeUrl": "postgresql+asyncpg://u:p@db/syncd"},
                "networkPolicy": {"egress": {"store": {"ports": [6432]}}},
            },
            DNS | {(9092, "TCP"), (6432, "TCP"), (443, "TCP")},
        ),
        (PRODUCTION, DNS | {(9093, "TCP"), (5432, "TCP"), (443, "TCP")}),
    ],
    ids=["default", "bootstrap-ports", "kafka-ports", "postgresql", "production"],
)
def test_network_policy_is_on_and_egress_goes_to_dns_broker_store_and_https_only(
    chart: helm.Chart, values: dict[str, Any], ports: set[tuple[int, str]]
) -> None:
    docs = render(chart, values)
    policy = only(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert egress_ports(policy) == ports
    [ingress] = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_production_egress_names_its_peers(chart: helm.Chart) -> None:
    rules = only(render(chart, PRODUCTION), "NetworkPolicy")["spec"]["egress"]
    assert all(rule.get("to") for rule in rules)
    [https] = [r for r in rules if r["ports"] == [{"port": 443, "protocol": "TCP"}]]
    assert https["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert "10.0.0.0/8" in https["to"][0]["ipBlock"]["except"]
    extra = render(
        chart,
        {
            "networkPolicy": {
                "egress": {
                    "extra": [
                        {
                            "to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}],
                            "ports": [{"port": 3128, "protocol": "TCP"}],
                        }
                    ]
                }
            }
        },
    )
    policy = only(extra, "NetworkPolicy")
    assert (3128, "TCP") in egress_ports(policy)
    assert policy["spec"]["egress"][-1]["to"] == [{"ipBlock": {"cidr": "10.1.2.3/32"}}]


def test_production_verifies_postgresql_tls_with_a_mounted_ca(chart: helm.Chart) -> None:
    """The production example connects to PostgreSQL with sslmode verify-full against the CA
    in the postgres-ca Secret, in the migration container too."""
    pod = only(render(chart, PRODUCTION), "Deployment")["spec"]["template"]["spec"]
    [ca] = [v for v in pod["volumes"] if v["name"] == "postgresql-ca"]
    assert ca["secret"]["secretName"] == PRODUCTION["store"]["postgresql"]["caSecret"]
    assert ca["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    for container in pod["containers"] + pod["initContainers"]:
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PGSSLMODE"] == "verify-full"
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "postgresql-ca"]
        assert mount["readOnly"] is True
        assert env["PGSSLROOTCERT"] == f"{mount['mountPath']}/ca.crt"
    comment = (CHART / "ci" / "production-values.yaml").read_text()
    assert "?ssl=verify-full" in comment  # the store URL the Secret holds
    default = only(render(chart, {}), "Deployment")["spec"]["template"]["spec"]
    assert "env" not in default["containers"][0]


def test_extra_env_reaches_both_containers(chart: helm.Chart) -> None:
    env = [{"name": "SYNCD_LOG__LEVEL", "value": "debug"}]
    pod = only(render(chart, {"extraEnv": env}), "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["env"] == env
    assert pod["initContainers"][0]["env"] == env
