"""The Helm chart, rendered by the real Helm engine (helm-python-sdk) and validated against the Kubernetes schemas.

No cluster runs here: the chart is linted and rendered for realistic value sets, every manifest is validated
(kubernetes-validate), properties a security-sensitive deployment needs are asserted on the rendered objects, and
the exact command the Deployment gives the container is run against a directory laid out like the mounted Secret.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

import tang_server
from tang_server.keys import keyfiles
from tang_server.settings import Settings

from .support import BIN, SecretVolume, free_port, require_tools, running

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "tang-server"
KUBERNETES = "1.30.0"
KEY_FILES = {keyfiles.key_file_name(key): json.dumps(key) for key in keyfiles.generate_pair()}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "existing-secret": {"keys": {"existingSecret": "tang-keys"}},
    "chart-secret": {"keys": {"files": KEY_FILES}},
    "metrics": {
        "keys": {"existingSecret": "k"},
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "dashboard": {"enabled": True},
        },
    },
    "network-policy": {
        "keys": {"existingSecret": "k"},
        "networkPolicy": {
            "enabled": True,
            "allowedClients": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
            "allowedScrapers": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
    },
    "network-policy-nobody": {"keys": {"existingSecret": "k"}, "networkPolicy": {"enabled": True}},
    "rotation-job": {"keys": {"existingSecret": "k"}, "rotation": {"enabled": True}},
    "rotation-cron": {"keys": {"existingSecret": "k"}, "rotation": {"enabled": True, "schedule": "0 3 1 */3 *"}},
    "one-replica": {"replicaCount": 1, "keys": {"existingSecret": "k"}},
    "autoscaling": {"keys": {"existingSecret": "k"}, "autoscaling": {"enabled": True}},
    "prefix-and-proxies": {"keys": {"existingSecret": "k"}, "pathPrefix": "tang", "trustedProxies": ["10.0.0.0/8"]},
    "no-cpu-limit": {"keys": {"existingSecret": "k"}, "resources": {"limits": {"cpu": None}}},
    "workers-given": {"keys": {"existingSecret": "k"}, "workers": 3},
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    manifests = helm.Chart.load(str(CHART)).render(values, name="nbde", namespace="tang")
    documents = []
    for path, text in manifests.items():
        if path.endswith(".txt"):
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def test_chart_version_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    assert chart["version"] == chart["appVersion"] == cargo == tang_server.__version__


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lints_renders_and_validates(name: str) -> None:
    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    documents = render(values)
    assert of_kind(documents, "Deployment")
    for document in documents:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: not in the Kubernetes schemas; checked below
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_deployment_is_locked_down() -> None:
    deployment = of_kind(render({}), "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0 and pod["securityContext"]["runAsGroup"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    keys = next(volume for volume in pod["volumes"] if volume["name"] == "keys")
    assert keys["secret"]["defaultMode"] == 0o440
    assert all("subPath" not in mount for mount in container["volumeMounts"])
    assert next(m for m in container["volumeMounts"] if m["name"] == "keys")["readOnly"] is True
    assert "--fleet" in container["args"]  # never generate keys in a serving pod
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = {constraint["topologyKey"] for constraint in pod["topologySpreadConstraints"]}
    assert spread == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}


def test_probe_paths_are_the_servers() -> None:
    container = of_kind(render({}), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    defaults = Settings(keys_dir=Path("."))
    assert container["livenessProbe"]["httpGet"]["path"] == defaults.health_path
    assert container["startupProbe"]["httpGet"]["path"] == defaults.health_path
    assert container["readinessProbe"]["httpGet"]["path"] == defaults.ready_path


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, None),  # the default CPU limit: the server counts it from its cgroup's CPU quota
        ({"resources": {"limits": {"cpu": "1500m"}}}, None),
        ({"workers": 3}, "3"),
        ({"resources": {"limits": {"cpu": None}}}, "1"),  # no limit: the default request, 1 CPU
        ({"resources": {"requests": {"cpu": "1500m"}, "limits": {"cpu": None}}}, "2"),
        ({"resources": {"requests": {"cpu": 0.5}, "limits": {"cpu": None}}}, "1"),
        ({"resources": {"requests": {"cpu": "2.5"}, "limits": {"cpu": None}}}, "3"),
        ({"resources": {"requests": {"cpu": 4}, "limits": {"cpu": None}}}, "4"),
        ({"resources": {"requests": {"cpu": None}, "limits": {"cpu": None}}}, "1"),
    ],
)
def test_workers_follow_the_pods_cpu(values: dict[str, Any], expected: str | None) -> None:
    """Without `workers`, one per CPU of the limit (found by the server in its cgroup, where Kubernetes puts the
    limit), or of the request rounded up when there is no limit (the cgroup then has no quota)."""
    container = of_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    given = [arg.removeprefix("--workers=") for arg in container["args"] if arg.startswith("--workers")]
    assert given == ([] if expected is None else [expected])
    if expected is None:
        assert container["resources"]["limits"]["cpu"]


@pytest.mark.parametrize(("replicas", "expected"), [(1, 0), (2, 1), (3, 1)])
def test_pdb_only_with_several_replicas(replicas: int, expected: int) -> None:
    assert len(of_kind(render({"replicaCount": replicas}), "PodDisruptionBudget")) == expected


def test_rotation_role_is_scoped_to_the_one_secret() -> None:
    documents = render(VALUE_SETS["rotation-job"])
    (role,) = of_kind(documents, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["k"], "verbs": ["get", "update"]}
    ]
    (job,) = of_kind(documents, "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["kubernetes", "rotate"] and "--secret=k" in args
    assert of_kind(render(VALUE_SETS["rotation-cron"]), "CronJob")


def test_chart_made_secret_holds_the_files_and_is_kept() -> None:
    (secret,) = of_kind(render(VALUE_SETS["chart-secret"]), "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(secret["data"]) == set(KEY_FILES)
    assert of_kind(render(VALUE_SETS["existing-secret"]), "Secret") == []


def test_network_policy_never_opens_to_everybody() -> None:
    for name in ("network-policy", "network-policy-nobody"):
        (policy,) = of_kind(render(VALUE_SETS[name]), "NetworkPolicy")
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "an empty 'from' would allow every source"


def test_monitoring_objects_carry_the_shipped_rules_and_dashboard() -> None:
    documents = render(VALUE_SETS["metrics"])
    (rule,) = of_kind(documents, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "tang-alerts.yml").read_text())
    (monitor,) = of_kind(documents, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    dashboard = next(doc for doc in of_kind(documents, "ConfigMap") if doc["metadata"]["name"].endswith("dashboard"))
    assert json.loads(dashboard["data"]["tang-dashboard.json"])["uid"] == "tang-server"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 0}, "replicaCount"),
        ({"workers": "two"}, "workers"),
        ({"keys": {"files": {"notakey.txt": "{}"}}}, "notakey.txt"),
        ({"accessLog": {"format": "xml"}}, "format"),
        ({"typo": 1}, "typo"),
    ],
)
def test_schema_rejects_wrong_values_clearly(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        helm.Chart.load(str(CHART)).validate_schema(values)


def test_deployment_command_starts_our_server(tmp_path: Path) -> None:
    """The container's exact command and environment, run here against a directory laid out like the Secret."""
    require_tools("clevis")
    port = free_port()
    values = {"keys": {"existingSecret": "k"}, "port": port, "workers": 2}
    container = of_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    volume = SecretVolume(tmp_path / "volume")
    volume.publish({name: content.encode() for name, content in KEY_FILES.items()})
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "keys")
    args = [arg.replace(mount, str(volume.path)).replace("/tmp/metrics", str(tmp_path / "metrics"))
            for arg in container["args"]]  # fmt: skip
    env = {item["name"]: item["value"] for item in container["env"]}
    command = [str(BIN / container["command"][0]), *args]
    with running(command, port, tmp_path / "log", env={**env, "PATH": str(BIN)}):
        pin = json.dumps({"url": f"http://127.0.0.1:{port}"})
        jwe = subprocess.run(["clevis", "encrypt", "tang", pin, "-y"], input=b"helm", capture_output=True,
                             check=True, timeout=60).stdout  # fmt: skip
        decrypted = subprocess.run(["clevis", "decrypt"], input=jwe, capture_output=True, timeout=60)
    assert decrypted.stdout == b"helm"


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([str(BIN / "hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    ignores = re.findall(r"# hadolint ignore=(\S+)", (ROOT / "Dockerfile").read_text())
    text = (ROOT / "Dockerfile").read_text().splitlines()
    for index, line in enumerate(text):
        if "hadolint ignore" in line:
            assert text[index - 1].startswith("#") and "hadolint" not in text[index - 1], "ignore without a reason"
    assert len(ignores) <= 2


def _leaves(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Every value's dotted path, descending as far as the schema describes properties (maps are leaves)."""
    paths = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        assert key in schema.get("properties", {}), f"{path} is not in values.schema.json"
        node = schema["properties"][key]
        if isinstance(value, dict) and "properties" in node:
            paths |= _leaves(value, node, f"{path}.")
        else:
            paths.add(path)
    return paths


def test_schema_and_readme_cover_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    readme = (CHART / "README.md").read_text()
    leaves = _leaves(values, schema)
    assert len(leaves) > 40
    for path in leaves:
        assert f"`{path}" in readme, f"{path} missing from the values table"
