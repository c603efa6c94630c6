"""deploy/: the Kubernetes manifests and compose.yaml validate against their schemas, and every
image, command, port and variable they name is what the code has."""

import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from keel.cli.main import build_parser
from keel.config import SERVING_VARIABLES, VARIABLES, Settings

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
# The Dask cluster (kubernetes/compute.yaml, and the compose services of the same names).
DASK_SCHEDULER, DASK_WORKER = "dask-scheduler", "dask-worker"
# Where the Dagster runs execute (the daemon launches them into the code server), sending their shards.
RUN_DEPLOYMENT = "dagster-code"
# A worker reads the lakehouse as the run that sent it a shard: with these, valued as the run's.
LAKEHOUSE_VARIABLES = {
    "KEEL_CATALOG_URI",
    "KEEL_WAREHOUSE",
    "KEEL_S3_ENDPOINT",
    "KEEL_PROJECT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
}
# A worker process's memory beside its shard's (the interpreter, pyarrow, DuckDB, the project), and its nanny's.
WORKER_PROCESS_BYTES = 1 << 30
NANNY_BYTES = 256 << 20


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


def deployments(everything: list[dict]) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in everything if r["kind"] == "Deployment"}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def pod_environment(deployment: dict, everything: list[dict]) -> dict[str, str]:
    """The variables a Deployment's container gets: its ConfigMaps' values, the Secret's variables
    (valued by the Secret's name) and its own env."""
    config_maps = {r["metadata"]["name"]: r["data"] for r in everything if r["kind"] == "ConfigMap"}
    out = {}
    for source in container(deployment).get("envFrom", []):
        if "configMapRef" in source:
            out |= config_maps[source["configMapRef"]["name"]]
        else:
            assert source["secretRef"]["name"] == "keel-secrets", source
            out |= dict.fromkeys(SECRET_VARIABLES, "secret keel-secrets")
    for env in container(deployment).get("env", []):
        out[env["name"]] = env.get("value", json.dumps(env.get("valueFrom")))
    return out


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels and matchExpressions, or a Service's map) picks these labels."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        matched = {
            "In": value in expression.get("values", []),
            "NotIn": value not in expression.get("values", []),
            "Exists": value is not None,
            "DoesNotExist": value is None,
        }[expression["operator"]]
        if not matched:
            return False
    return True


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def dashboard_port(command: list[str]) -> int:
    return int(option(command, "--dashboard-address").rpartition(":")[2])


def scheduler_address(everything: list[dict]) -> str:
    """tcp://<Service>:<port>: the Service in front of the Dask scheduler's --port."""
    scheduler = deployments(everything)[DASK_SCHEDULER]
    port = int(option(container(scheduler)["command"], "--port"))
    (service,) = [
        r for r in everything if r["kind"] == "Service" and selects(r["spec"]["selector"], pod_labels(scheduler))
    ]
    (exposed,) = [p["port"] for p in service["spec"]["ports"] if p["targetPort"] == port]
    return f"tcp://{service['metadata']['name']}:{exposed}"


def kubernetes_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity)).groups()
    scale = {f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGT")}
    scale |= {p: 1000 ** (i + 1) for i, p in enumerate("kMGT")}
    return int(float(number) * scale.get(unit, 1))


def docker_bytes(size: str) -> int:
    """Compose's memory sizes: Docker reads every unit as a power of 1024 (7g, 7G, 7GiB, 7gb)."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?) ?([kmgt]?)i?b?", str(size).lower()).groups()
    return int(float(number) * 1024 ** " kmgt".index(unit or " "))


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
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject", "ConfigMap", "NetworkPolicy"}
    assert expected <= set(kinds)
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
        environment = service.get("environment") or {}
        named |= {k for k in environment if k not in ("MLFLOW_S3_ENDPOINT_URL", "MLFLOW_BACKEND_STORE_URI")}
    named |= SECRET_VARIABLES
    assert not sorted(named - allowed), "variables the code does not read (renamed?)"
    # What the production profile needs is set in both.
    needed = {"KEEL_CATALOG_URI", "KEEL_WAREHOUSE", "KEEL_S3_ENDPOINT", "KEEL_REDIS_URL", "KEEL_KAFKA_BOOTSTRAP"}
    needed |= {"KEEL_MLFLOW_URI"} | dagster_variables()
    kubernetes_named = named - {k for s in keel_services for k in s.get("environment") or {}} | SECRET_VARIABLES
    kubernetes_named |= set(config_data())
    assert needed <= kubernetes_named
    for name, service in services.items():
        if name == DASK_SCHEDULER:
            # It hands out tasks and reads no table: no settings, no credential.
            assert not set(service.get("environment") or {}) & (SECRET_VARIABLES | LAKEHOUSE_VARIABLES), name
        elif service in keel_services:
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
    tools = [c for c in commands() if c[0] not in ("keel", "dask")]
    for command in tools:
        assert (bin_dir / command[0]).is_file(), command

    def help_text(command: list[str]) -> str:
        words = [w for w in command[1:] if not w.startswith("-")][:2]
        subcommand = [w for w in words if re.fullmatch(r"[a-z][a-z-]+", w)]
        return subprocess.run(
            [str(bin_dir / command[0]), *subcommand, "--help"], capture_output=True, text=True, timeout=120
        ).stdout

    # Each tool takes seconds to start: all asked at once, while the others are parsed here.
    with ThreadPoolExecutor(max_workers=max(1, len(tools))) as pool:
        helps = pool.map(help_text, tools)
        for command in commands():
            if command[0] == "keel":
                parser.parse_args(command[1:])  # an unknown option exits (SystemExit) and fails the test
            elif command[0] == "dask":
                # `dask scheduler` and `dask worker` are distributed's click commands (the dask CLI's
                # entry points): parsed here, not run; an unknown option or a bad value raises.
                assert (bin_dir / "dask").is_file(), command
                (entry,) = entry_points(group="dask_cli", name=command[1])
                entry.load().make_context(shlex.join(command[:2]), command[2:])
        # The options the other commands give must be in their --help (dagster, dagster-webserver, mlflow).
        for command, text in zip(tools, helps, strict=True):
            for flag in (w for w in command if w.startswith("-")):
                assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", text, re.M), (command, flag)


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


def test_every_service_selects_the_pods_of_one_deployment():
    everything = resources()
    for name, deployment in deployments(everything).items():
        assert selects(deployment["spec"]["selector"], pod_labels(deployment)), name
    for service in (r for r in everything if r["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert service["spec"]["selector"], name
        selected = [d for d in deployments(everything).values() if selects(service["spec"]["selector"], pod_labels(d))]
        assert len(selected) == 1, (name, [d["metadata"]["name"] for d in selected])
        ports = [p for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in {p["containerPort"] for p in ports} | {p["name"] for p in ports}, (name, port)


def probe_targets(container: dict) -> dict[str, tuple]:
    """readinessProbe and livenessProbe, each as ("tcp", port) or ("http", port, path)."""
    out = {}
    for probe in ("readinessProbe", "livenessProbe"):
        spec = container.get(probe, {})
        if "tcpSocket" in spec:
            out[probe] = ("tcp", spec["tcpSocket"]["port"])
        elif "httpGet" in spec:
            out[probe] = ("http", spec["httpGet"]["port"], spec["httpGet"]["path"])
    return out


def test_the_runs_send_their_shards_to_the_dask_cluster():
    import dask
    from distributed.http import health

    everything = resources()
    found = deployments(everything)
    scheduler, worker, run = found[DASK_SCHEDULER], found[DASK_WORKER], found[RUN_DEPLOYMENT]
    # The scheduler: one, behind a Service on Dask's port, 8786 (the one KEEL_COMPUTE's help names).
    command = container(scheduler)["command"]
    assert command[:2] == ["dask", "scheduler"] and scheduler["spec"]["replicas"] == 1
    port, dashboard = int(option(command, "--port")), dashboard_port(command)
    assert {p["containerPort"] for p in container(scheduler)["ports"]} == {port, dashboard}
    address = scheduler_address(everything)
    assert address == f"tcp://{DASK_SCHEDULER}:8786"
    assert Settings.from_env({"KEEL_COMPUTE": address, "KEEL_CODE_VERSION": "-"}).compute == address
    # It reads no table: no credential.
    assert not [s for s in container(scheduler).get("envFrom", []) if "secretRef" in s]
    # The workers: two at least, one thread in one process each, registering with that scheduler.
    command = container(worker)["command"]
    assert worker["spec"]["replicas"] >= 2
    assert command[:3] == ["dask", "worker", address]
    assert option(command, "--nthreads") == "1" and option(command, "--nworkers") == "1"
    worker_dashboard = dashboard_port(command)
    ports = {worker_dashboard, int(option(command, "--worker-port")), int(option(command, "--nanny-port"))}
    assert {p["containerPort"] for p in container(worker)["ports"]} == ports
    # Probes: the scheduler's port, or /health on the dashboards, which the installed distributed serves.
    assert "/health" in [route for route, *_ in health.routes]
    for kind in ("scheduler", "worker"):
        assert "distributed.http.health" in dask.config.get(f"distributed.{kind}.http.routes"), kind
    probes = probe_targets(container(scheduler))
    assert set(probes) == {"readinessProbe", "livenessProbe"}
    assert set(probes.values()) <= {("tcp", port), ("http", dashboard, "/health")}, probes
    probes = probe_targets(container(worker))
    assert set(probes) == {"readinessProbe", "livenessProbe"}
    assert set(probes.values()) == {("http", worker_dashboard, "/health")}, probes
    # Every pod told of a cluster is told of this one; the runs are.
    for name, deployment in found.items():
        env = pod_environment(deployment, everything)
        if "KEEL_COMPUTE" in env:
            assert env["KEEL_COMPUTE"] == address, f"KEEL_COMPUTE of {name}: {env['KEEL_COMPUTE']}"
    assert "KEEL_COMPUTE" in pod_environment(run, everything)
    # The workers read the lakehouse with the runs' settings and secrets.
    assert container(worker)["envFrom"] == container(run)["envFrom"]
    worker_env, run_env = pod_environment(worker, everything), pod_environment(run, everything)
    assert set(worker_env) >= LAKEHOUSE_VARIABLES
    assert {k: worker_env[k] for k in LAKEHOUSE_VARIABLES} == {k: run_env[k] for k in LAKEHOUSE_VARIABLES}
    # Anyone reaching a scheduler or a worker runs code there: only Keel's pods may.
    policies = [r for r in everything if r["kind"] == "NetworkPolicy"]
    for deployment in (scheduler, worker):
        applying = [p for p in policies if selects(p["spec"]["podSelector"], pod_labels(deployment))]
        assert applying and all("Ingress" in p["spec"]["policyTypes"] for p in applying), deployment["metadata"]
        for rule in (rule for p in applying for rule in p["spec"].get("ingress", [])):
            assert rule.get("from"), rule  # no `from` admits every source
            for peer in rule["from"]:
                assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "keel"}}}, peer


def test_a_pod_sent_to_another_scheduler_fails_the_check(monkeypatch):
    everything = resources()
    (config,) = [r for r in everything if r["kind"] == "ConfigMap" and r["metadata"]["name"] == "keel-config"]
    config["data"]["KEEL_COMPUTE"] = f"tcp://{DASK_SCHEDULER}:8787"  # the dashboard's port
    monkeypatch.setitem(globals(), "resources", lambda: everything)
    with pytest.raises(AssertionError, match="KEEL_COMPUTE of"):
        test_the_runs_send_their_shards_to_the_dask_cluster()


def test_a_worker_has_the_memory_of_a_shard_and_more():
    import dask
    from dask.utils import parse_bytes

    # The nanny restarts a worker whose process passes this fraction of its --memory-limit.
    terminate = dask.config.get("distributed.worker.memory.terminate")
    everything = resources()
    worker = deployments(everything)[DASK_WORKER]
    resources_ = container(worker)["resources"]
    limit = kubernetes_bytes(resources_["limits"]["memory"])
    # The pod is placed where its memory is: requested as much as it may take.
    assert kubernetes_bytes(resources_["requests"]["memory"]) == limit
    service = compose()["services"][DASK_WORKER]
    cases = [
        (container(worker)["command"], pod_environment(worker, everything), limit),
        (service["command"], service["environment"], docker_bytes(service["deploy"]["resources"]["limits"]["memory"])),
    ]
    for command, env, container_limit in cases:
        shard = Settings.from_env({"KEEL_MAX_MEMORY": env["KEEL_MAX_MEMORY"], "KEEL_CODE_VERSION": "-"}).max_memory
        memory_limit = parse_bytes(option(command, "--memory-limit"))
        assert shard + WORKER_PROCESS_BYTES <= memory_limit * terminate, (env["KEEL_MAX_MEMORY"], memory_limit)
        assert memory_limit + NANNY_BYTES <= container_limit, (memory_limit, container_limit)


def test_compose_runs_the_same_dask_cluster():
    services = compose()["services"]
    scheduler, worker, run = services[DASK_SCHEDULER], services[DASK_WORKER], services[RUN_DEPLOYMENT]
    found = deployments(resources())
    # The same commands as on Kubernetes: the scheduler's service name is the same on both.
    assert scheduler["command"] == container(found[DASK_SCHEDULER])["command"]
    assert worker["command"] == container(found[DASK_WORKER])["command"]
    address = f"tcp://{DASK_SCHEDULER}:{option(scheduler['command'], '--port')}"
    assert worker["command"][:3] == ["dask", "worker", address]
    assert worker.get("deploy", {}).get("replicas", worker.get("scale", 1)) >= 2
    for name, service in services.items():
        value = (service.get("environment") or {}).get("KEEL_COMPUTE")
        assert value in (None, address), f"KEEL_COMPUTE of {name}: {value}"
    assert run["environment"].get("KEEL_COMPUTE") == address, RUN_DEPLOYMENT
    assert set(worker["environment"]) >= LAKEHOUSE_VARIABLES
    assert {k: worker["environment"][k] for k in LAKEHOUSE_VARIABLES} == {
        k: run["environment"][k] for k in LAKEHOUSE_VARIABLES
    }
    # Started in order, each once the one before answers on its dashboard's /health: a run's
    # shards would wait forever on a scheduler without workers.
    assert worker["depends_on"][DASK_SCHEDULER]["condition"] == "service_healthy"
    assert run["depends_on"][DASK_WORKER]["condition"] == "service_healthy"
    for service in (scheduler, worker):
        assert f"127.0.0.1:{dashboard_port(service['command'])}/health" in " ".join(service["healthcheck"]["test"])
    # The scheduler's port is never published: whoever reaches it runs code on the workers.
    for service in (scheduler, worker):
        published = [str(p).split(":")[-1].split("/")[0] for p in service.get("ports", [])]
        assert option(scheduler["command"], "--port") not in published
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), service["ports"]
