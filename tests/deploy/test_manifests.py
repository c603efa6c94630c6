"""deploy/: the Kubernetes manifests and compose.yaml validate against their schemas, and every
image, command, port and variable they name is what the code has."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from keel.cli.main import build_parser
from keel.config import SERVING_VARIABLES, VARIABLES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE_SCHEMA = Path(sys.prefix) / "share" / "keel" / "compose_spec.json"
# The Secret keel-secrets holds these variables (README: Deploying on Kubernetes); the manifests only name it.
SECRET_VARIABLES = {
    "KEEL_CATALOG_URI",
    "KEEL_REDIS_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "DAGSTER_PG_PASSWORD",
    "KEEL_SERVE_API_KEYS",
    "KEEL_ALERT_WEBHOOK",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEYS|WEBHOOK|ACCESS_KEY")


def resources() -> list[dict]:
    listed = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(f"kubernetes/{p.name}" for p in KUBERNETES.glob("*.yaml"))
    return [doc for path in listed for doc in yaml.safe_load_all((DEPLOY / path).read_text()) if doc]


def config_data() -> dict:
    (config,) = [r for r in resources() if r["kind"] == "ConfigMap" and r["metadata"]["name"] == "keel-config"]
    return config["data"]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def containers() -> list[dict]:
    return [c for r in resources() if r["kind"] == "Deployment" for c in r["spec"]["template"]["spec"]["containers"]]


def known_variables() -> set[str]:
    return {v.name for v in VARIABLES.values()} | {v.name for v in SERVING_VARIABLES.values()}


def dagster_variables() -> set[str]:
    return set(re.findall(r"env: (\w+)", (DEPLOY / "dagster" / "dagster.yaml").read_text()))


def aws_variables() -> set[str]:
    from keel.devservers.storage import S3Server

    return set(S3Server().environment()) | {"AWS_REGION"}


def test_the_kubernetes_manifests_validate_against_the_kubernetes_schemas():
    kinds = []
    for resource in resources():
        kinds.append(resource["kind"])
        if resource["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked below against what KEDA's kafka trigger needs
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject", "ConfigMap"} <= set(kinds)
    # No Secret is written in the manifests, and no literal value of a secret variable.
    assert "Secret" not in kinds
    for container in containers():
        for env in container.get("env", []):
            assert not (SECRET_NAME.search(env["name"]) and "value" in env), env


def test_a_broken_manifest_is_refused():
    (serving,) = [r for r in resources() if r["kind"] == "Deployment" and r["metadata"]["name"] == "keel-serve"]
    serving["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(serving, kubernetes_validate.latest_version(), strict=True)


def test_compose_validates_against_the_compose_specification():
    assert COMPOSE_SCHEMA.is_file(), f"{COMPOSE_SCHEMA} is missing: `make install` fetches it"
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [e.message for e in validator.iter_errors(compose())]
    assert not errors, errors
    broken = compose()
    broken["services"]["serve"]["ports"] = [{"target": "eight thousand"}]
    assert list(validator.iter_errors(broken))


def test_every_variable_named_is_one_the_code_reads():
    allowed = known_variables() | dagster_variables() | aws_variables() | {"DAGSTER_HOME"}
    named = set(config_data())
    for container in containers():
        named |= {env["name"] for env in container.get("env", [])}
    services = compose()["services"]
    keel_services = [s for s in services.values() if s.get("image", "").startswith("keel:")]
    for service in keel_services:
        # MLflow's own variables (its artifact store's endpoint, its server's backend store).
        named |= {k for k in service["environment"] if k not in ("MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BACKEND_STORE_URI")}
    named |= SECRET_VARIABLES
    assert not sorted(named - allowed), "variables the code does not read (renamed?)"
    # What the production profile needs is set in both.
    needed = {"KEEL_CATALOG_URI", "KEEL_WAREHOUSE", "KEEL_S3_ENDPOINT", "KEEL_REDIS_URL", "KEEL_KAFKA_BOOTSTRAP"}
    needed |= {"KEEL_MLFLOW_URI"} | dagster_variables()
    kubernetes_named = named - {k for s in keel_services for k in s["environment"]} | SECRET_VARIABLES
    kubernetes_named |= set(config_data())
    assert needed <= kubernetes_named
    for service in keel_services:
        assert needed - {"KEEL_SERVE_API_KEYS"} <= set(service["environment"]), service["command"]
    # Secrets in compose come from deploy/.env, never a literal.
    for service in services.values():
        for name, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(name) or name in SECRET_VARIABLES - {"KEEL_REDIS_URL"}:
                assert "${" in str(value), (name, value)


def test_a_variable_renamed_in_the_code_fails_the_check(monkeypatch):
    from keel.config import Variable

    renamed = dict(VARIABLES)
    renamed["warehouse"] = Variable("KEEL_WAREHOUSE_URI", renamed["warehouse"].help)
    monkeypatch.setitem(globals(), "VARIABLES", renamed)
    with pytest.raises(AssertionError, match="renamed"):
        test_every_variable_named_is_one_the_code_reads()


def commands() -> list[list[str]]:
    found = [c["command"] for c in containers()]
    found += [s["command"] for s in compose()["services"].values() if s.get("image", "").startswith("keel:")]
    unique = {tuple(shlex.split(c) if isinstance(c, str) else c): None for c in found}
    return [list(c) for c in unique]


def test_every_command_parses_with_the_installed_tools():
    parser = build_parser()
    bin_dir = Path(sys.executable).parent
    for command in commands():
        if command[0] == "keel":
            parser.parse_args(command[1:])  # an unknown option exits (SystemExit) and fails the test
            continue
        assert (bin_dir / command[0]).is_file(), command
        # The options the command gives must be in its --help (dagster, dagster-webserver, mlflow).
        words = [w for w in command[1:] if not w.startswith("-")][:2]
        subcommand = [w for w in words if re.fullmatch(r"[a-z][a-z-]+", w)]
        help_text = subprocess.run(
            [str(bin_dir / command[0]), *subcommand, "--help"], capture_output=True, text=True, timeout=120
        ).stdout
        for option in (w for w in command if w.startswith("-")):
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s,=]|$)", help_text, re.M), (command, option)


def test_images_ports_and_probes_agree_with_the_code():
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    image = f"keel:{version}"
    assert all(c["image"] == image for c in containers())
    for service in compose()["services"].values():
        if "build" in service:
            assert service["image"] == image and service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / "Dockerfile").is_file()

    routes = (ROOT / "serving" / "app.py").read_text()
    deployments = {r["metadata"]["name"]: r for r in resources() if r["kind"] == "Deployment"}
    services = {r["metadata"]["name"]: r for r in resources() if r["kind"] == "Service"}
    for name in ("keel-serve", "keel-stream", "dagster-webserver", "dagster-code"):
        template = deployments[name]["spec"]["template"]
        (container,) = template["spec"]["containers"]
        command = container["command"]
        port = next(int(command[i + 1]) for i, w in enumerate(command) if w in ("--port", "-p", "--metrics-port"))
        assert {p["containerPort"] for p in container["ports"]} == {port}, name
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == port, name
        if name in services:
            assert {p["targetPort"] for p in services[name]["spec"]["ports"]} == {port}, name
        for probe in ("readinessProbe", "livenessProbe"):
            get = container.get(probe, {}).get("httpGet")
            if get is not None:
                assert get["port"] == port, (name, probe)
                if name == "keel-serve":
                    assert f'@app.get("{get["path"]}"' in routes, (name, get["path"])
    # The autoscalers scale what exists, on a metric the server exports, within the partitions.
    (hpa,) = [r for r in resources() if r["kind"] == "HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    (pods,) = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert f'"{pods}"' in (ROOT / "serving" / "metrics.py").read_text()
    (scaled,) = [r for r in resources() if r["kind"] == "ScaledObject"]
    from keel.stream.producer import DEFAULT_PARTITIONS

    assert scaled["spec"]["scaleTargetRef"]["name"] in deployments
    assert scaled["spec"]["maxReplicaCount"] <= DEFAULT_PARTITIONS
    (trigger,) = scaled["spec"]["triggers"]
    stream_command = deployments["keel-stream"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert (
        trigger["type"] == "kafka"
        and trigger["metadata"]["consumerGroup"] == stream_command[stream_command.index("--group-id") + 1]
    )
    config = config_data()
    assert trigger["metadata"]["bootstrapServers"] == config["KEEL_KAFKA_BOOTSTRAP"]


def test_no_secret_is_on_a_command_line():
    # Every user of a machine sees its processes' command lines (ps): secrets go in the environment.
    assert commands()
    for command in commands():
        for word in command:
            assert not re.search(rf"\$\{{?\w*({SECRET_NAME.pattern})", word), command
            assert not re.search(r"://[^/\s:@]*:[^/\s@]+@", word), command  # user:password@host
