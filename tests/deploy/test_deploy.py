"""Checks of the deployment files in deploy/ against the code they deploy.

Nothing here builds an image or starts a container. The files are parsed and compared
with the worker's settings, its AMQP topology and the project's console scripts. The
broker definitions are also declared on the real local RabbitMQ under a unique prefix,
and then the worker's own declaration runs over them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml

from contracts import CREATE_JOB, GET_JOB
from worker.amqp.topology import Topology, TopologyMismatch, declare
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
SETTINGS_PREFIX = "TRANSFORM_"
#: The namespace that definitions.json is written for (Settings().amqp_namespace).
DEFAULT_NAMESPACE = "transform"


@pytest.fixture(autouse=True)
def _default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove TRANSFORM_* settings from the environment, so Settings() has its defaults."""
    for name in list(os.environ):
        if name.startswith(SETTINGS_PREFIX) and not name.startswith("TRANSFORM_TEST_"):
            monkeypatch.delenv(name)


# Helpers


def load_yaml(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as file:
        return [document for document in yaml.safe_load_all(file) if document is not None]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    """Return the manifest of one object from the files in deploy/k8s/."""
    for path in sorted(K8S.glob("*.yaml")):
        for document in load_yaml(path):
            metadata = document.get("metadata", {})
            if document.get("kind") == kind and metadata.get("name") == name:
                found: dict[str, Any] = document
                return found
    raise AssertionError(f"no {kind} named {name} in {K8S}")


def worker_container() -> dict[str, Any]:
    deployment = k8s_object("Deployment", "transform-worker")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Deployment should run one container"
    container: dict[str, Any] = containers[0]
    return container


def env_from_sources(container: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the ConfigMaps and Secrets that the container's envFrom names."""
    sources = []
    for entry in container.get("envFrom", []):
        if "configMapRef" in entry:
            sources.append(k8s_object("ConfigMap", entry["configMapRef"]["name"]))
        if "secretRef" in entry:
            sources.append(k8s_object("Secret", entry["secretRef"]["name"]))
    return sources


def k8s_environment() -> dict[str, str]:
    """Return every environment variable the Deployment gives the worker, by name."""
    container = worker_container()
    environment: dict[str, str] = {}
    for source in env_from_sources(container):
        environment.update(source.get("data", {}))
        environment.update(source.get("stringData", {}))
    for variable in container.get("env", []):
        environment[variable["name"]] = str(variable.get("value", ""))
    return environment


def unknown_settings(names: Iterable[str]) -> list[str]:
    """Return the names that are not TRANSFORM_ followed by a field of Settings."""
    fields = Settings.model_fields
    return [
        name
        for name in names
        if not name.startswith(SETTINGS_PREFIX)
        or name.removeprefix(SETTINGS_PREFIX).lower() not in fields
    ]


def settings_from_environment(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]
) -> Settings:
    """Build Settings the way the worker does, from these environment variables."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return Settings()


def compose() -> dict[str, Any]:
    (document,) = load_yaml(DEPLOY / "compose.yaml")
    found: dict[str, Any] = document
    return found


def compose_environment(service: str) -> dict[str, str]:
    """Return a service's environment with ${VAR}, ${VAR:?message} and the like filled in."""
    environment = compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), "write compose environments as mappings"
    interpolation = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}")
    return {
        name: interpolation.sub("placeholder", str(value)) for name, value in environment.items()
    }


def compose_seconds(duration: str | int | float) -> float:
    """Convert a compose duration such as 45s, 1m30s or 1500ms to seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, (
        f"unsupported compose duration {duration!r}"
    )
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """Parse a Dockerfile into stages, each a list of (INSTRUCTION, arguments)."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for raw_line in path.read_text(encoding="utf-8").splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        instruction, _, arguments = (pending + line).partition(" ")
        pending = ""
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages(DEPLOY / "Dockerfile")[-1]


def instruction_arguments(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [arguments for name, arguments in stage if name == instruction]


def definitions() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    return loaded


def default_topology() -> Topology:
    settings = Settings()
    assert settings.amqp_namespace == DEFAULT_NAMESPACE
    return Topology.from_settings(settings)


# YAML files


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]),
    ids=lambda path: str(path.relative_to(DEPLOY)),
)
def test_yaml_file_parses(path: Path) -> None:
    documents = load_yaml(path)

    assert documents, f"{path} contains no YAML document"
    for document in documents:
        assert isinstance(document, dict), f"{path} contains a document that is not a mapping"


# Broker definitions


def test_definitions_exchanges_match_topology() -> None:
    topology = default_topology()
    expected = {
        topology.commands: "direct",
        topology.unrouted: "fanout",
        topology.events: "topic",
        topology.dead: "fanout",
    }
    arguments = {topology.commands: topology.commands_arguments()}

    exchanges = {exchange["name"]: exchange for exchange in definitions()["exchanges"]}

    assert set(exchanges) == set(expected)
    for name, kind in expected.items():
        exchange = exchanges[name]
        assert exchange["vhost"] == "/"
        assert exchange["type"] == kind, name
        assert exchange["durable"] is True, name
        assert exchange["auto_delete"] is False, name
        assert exchange["internal"] is False, name
        assert exchange["arguments"] == arguments.get(name, {}), name


def test_definitions_queues_match_topology() -> None:
    topology = default_topology()

    queues = {queue["name"]: queue for queue in definitions()["queues"]}

    assert set(queues) == {topology.jobs, topology.dead}
    jobs = queues[topology.jobs]
    assert jobs["vhost"] == "/"
    assert jobs["durable"] is True
    assert jobs["auto_delete"] is False
    assert jobs["arguments"] == topology.jobs_arguments()
    dead = queues[topology.dead]
    assert dead["vhost"] == "/"
    assert dead["durable"] is True
    assert dead["auto_delete"] is False
    # The worker declares the dead-letter queue without arguments, which makes it classic.
    assert dead["arguments"] == {}


def test_definitions_bindings_match_topology() -> None:
    topology = default_topology()
    expected = {
        (topology.commands, topology.jobs, CREATE_JOB),
        (topology.commands, topology.jobs, GET_JOB),
        # aio-pika binds with the queue's name when no routing key is given, as the
        # worker does for the queues it binds to fanout exchanges.
        (topology.unrouted, topology.jobs, topology.jobs),
        # aio-pika binds with the queue's name when no routing key is given, as the
        # worker does for the dead-letter queue.
        (topology.dead, topology.dead, topology.dead),
    }

    bindings = definitions()["bindings"]

    assert {(b["source"], b["destination"], b["routing_key"]) for b in bindings} == expected
    assert len(bindings) == len(expected), "a binding is listed twice"
    for binding in bindings:
        assert binding["vhost"] == "/"
        assert binding["destination_type"] == "queue"
        assert binding["arguments"] == {}


def test_definitions_declare_default_vhost() -> None:
    assert definitions()["vhosts"] == [{"name": "/"}]


def test_definitions_hold_no_credentials() -> None:
    content = definitions()

    assert "users" not in content
    assert "permissions" not in content
    assert "password" not in DEFINITIONS.read_text(encoding="utf-8")


def test_rabbitmq_conf_loads_mounted_definitions() -> None:
    conf: dict[str, str] = {}
    for line in (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    mounts = dict(
        volume.rsplit(":", 2)[:2] for volume in compose()["services"]["rabbitmq"]["volumes"]
    )

    assert conf["load_definitions"] == mounts["./rabbitmq/definitions.json"]
    assert mounts["./rabbitmq/rabbitmq.conf"].startswith("/etc/rabbitmq/conf.d/")
    assert int(conf["consumer_timeout"]) > 0


# Kubernetes manifests


def test_deployment_env_names_are_settings() -> None:
    assert unknown_settings(k8s_environment()) == []


def test_deployment_env_values_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(monkeypatch, k8s_environment())

    assert settings.store_url.startswith("mongodb://")
    assert str(settings.data_dir) == "/var/lib/transform-worker"


def test_deployment_outlasts_shutdown_grace() -> None:
    pod = k8s_object("Deployment", "transform-worker")["spec"]["template"]["spec"]
    shutdown_grace_s = float(
        k8s_object("ConfigMap", "transform-worker")["data"]["TRANSFORM_SHUTDOWN_GRACE_S"]
    )
    pre_stop = worker_container()["lifecycle"]["preStop"]["exec"]["command"]

    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > shutdown_grace_s + float(pre_stop[1])


def test_deployment_probes_use_port_9100() -> None:
    container = worker_container()

    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9100}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9100}


def test_deployment_runs_hardened() -> None:
    deployment = k8s_object("Deployment", "transform-worker")
    pod = deployment["spec"]["template"]["spec"]
    container = worker_container()
    data_dir = k8s_environment()["TRANSFORM_DATA_DIR"]
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}

    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "emptyDir" in volumes[mounts[data_dir]]
    assert set(container["resources"]) == {"requests", "limits"}


def test_deployment_mounts_signing_key() -> None:
    pod = k8s_object("Deployment", "transform-worker")["spec"]["template"]["spec"]
    key_file = Path(k8s_environment()["TRANSFORM_SIGNING_KEY_FILE"])
    mounts = {mount["mountPath"]: mount["name"] for mount in worker_container()["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}

    secret_name = volumes[mounts[str(key_file.parent)]]["secret"]["secretName"]
    assert key_file.name in k8s_object("Secret", secret_name)["stringData"]


def test_keda_trigger_names_jobs_queue() -> None:
    scaled_object = k8s_object("ScaledObject", "transform-worker")
    namespace = k8s_environment()["TRANSFORM_AMQP_NAMESPACE"]
    jobs_queue = Topology.from_settings(Settings(amqp_namespace=namespace)).jobs

    (trigger,) = scaled_object["spec"]["triggers"]

    assert scaled_object["spec"]["scaleTargetRef"]["name"] == "transform-worker"
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == jobs_queue
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert all(isinstance(value, str) for value in trigger["metadata"].values())


def test_keda_authentication_reads_amqp_url() -> None:
    (trigger,) = k8s_object("ScaledObject", "transform-worker")["spec"]["triggers"]
    authentication = k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])

    (reference,) = authentication["spec"]["secretTargetRef"]

    assert reference["parameter"] == "host"
    assert reference["key"] in k8s_object("Secret", reference["name"])["stringData"]


def test_kustomization_lists_manifests() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")

    resources = kustomization["resources"]

    assert sorted(resources) == ["configmap.yaml", "deployment.yaml", "keda-scaledobject.yaml"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource


# Container image


def test_dockerfile_entrypoint_is_console_script() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (entrypoint,) = instruction_arguments(final_stage(), "ENTRYPOINT")
    (command,) = instruction_arguments(final_stage(), "CMD")

    assert json.loads(entrypoint)[0] in pyproject["project"]["scripts"]
    assert json.loads(command) == ["run"]


def test_run_command_exists() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr


def test_dockerfile_has_healthcheck() -> None:
    (healthcheck,) = instruction_arguments(final_stage(), "HEALTHCHECK")

    assert " CMD " in f" {healthcheck} "
    assert "/healthz" in healthcheck
    assert "9100" in healthcheck


def test_dockerfile_final_stage_settings() -> None:
    stage = final_stage()
    environment = " ".join(instruction_arguments(stage, "ENV"))

    assert instruction_arguments(stage, "STOPSIGNAL") == ["SIGTERM"]
    (user,) = instruction_arguments(stage, "USER")
    assert user.split(":")[0] not in {"root", "0"}
    assert "TRANSFORM_DATA_DIR=/var/lib/transform-worker" in environment.split()
    assert any("fonts-dejavu-core" in run for run in instruction_arguments(stage, "RUN"))


def test_dockerfile_copies_allowed_sources() -> None:
    ignore_lines = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line.removeprefix("!").rstrip("/") for line in ignore_lines if line.startswith("!")}
    (build_stage, *_) = dockerfile_stages(DEPLOY / "Dockerfile")

    sources: list[str] = []
    for arguments in instruction_arguments(build_stage, "COPY"):
        *paths, _destination = [word for word in arguments.split() if not word.startswith("--")]
        sources.extend(path.removeprefix("./").rstrip("/") for path in paths)

    assert sources, "the build stage copies nothing"
    for source in sources:
        assert (REPO / source).exists(), source
        assert source in allowed, f"{source} is excluded by Dockerfile.dockerignore"


# Compose stack


def test_compose_outlasts_shutdown_grace() -> None:
    worker = compose()["services"]["worker"]
    shutdown_grace_s = float(compose_environment("worker")["TRANSFORM_SHUTDOWN_GRACE_S"])

    assert compose_seconds(worker["stop_grace_period"]) > shutdown_grace_s


def test_compose_env_names_are_settings() -> None:
    assert unknown_settings(compose_environment("worker")) == []


def test_compose_env_values_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from_environment(monkeypatch, compose_environment("worker"))

    assert settings.store_url == "mongodb://mongo:27017/transform?replicaSet=rs0"
    assert settings.amqp_url.get_secret_value().startswith("amqp://transform-worker:")
    assert "@rabbitmq:5672/" in settings.amqp_url.get_secret_value()


def test_compose_waits_for_healthy_services() -> None:
    services = compose()["services"]

    depends_on = services["worker"]["depends_on"]

    assert set(depends_on) == {"rabbitmq", "mongo"}
    for name, condition in depends_on.items():
        assert condition == {"condition": "service_healthy"}, name
        assert services[name]["healthcheck"]["test"], name


def test_compose_mongo_is_replica_set() -> None:
    mongo = compose()["services"]["mongo"]

    assert mongo["command"][mongo["command"].index("--replSet") + 1] == "rs0"
    assert "rs.initiate(" in " ".join(mongo["healthcheck"]["test"])


def test_compose_mounts_example_workflows() -> None:
    worker = compose()["services"]["worker"]
    workflows_dir = compose_environment("worker")["TRANSFORM_WORKFLOWS_DIR"]

    sources = [
        volume.split(":")[0]
        for volume in worker["volumes"]
        if volume.split(":")[1] == workflows_dir
    ]

    assert sources == ["../examples/workflows"]
    assert (DEPLOY / sources[0]).is_dir()


# Against the local RabbitMQ


def rename_namespace(value: Any, namespace: str) -> Any:
    """Return a copy of value with every "transform." string prefix changed to namespace."""
    if isinstance(value, str) and value.startswith(f"{DEFAULT_NAMESPACE}."):
        return namespace + value.removeprefix(DEFAULT_NAMESPACE)
    if isinstance(value, dict):
        return {key: rename_namespace(item, namespace) for key, item in value.items()}
    if isinstance(value, list):
        return [rename_namespace(item, namespace) for item in value]
    return value


async def declare_definitions(
    channel: aio_pika.abc.AbstractChannel, content: dict[str, Any]
) -> None:
    """Declare the exchanges, queues and bindings of a definitions file over AMQP."""
    for exchange in content["exchanges"]:
        await channel.declare_exchange(
            exchange["name"],
            aio_pika.ExchangeType(exchange["type"]),
            durable=exchange["durable"],
            auto_delete=exchange["auto_delete"],
            internal=exchange["internal"],
            arguments=exchange["arguments"] or None,
        )
    for queue in content["queues"]:
        await channel.declare_queue(
            queue["name"],
            durable=queue["durable"],
            auto_delete=queue["auto_delete"],
            arguments=queue["arguments"] or None,
        )
    for binding in content["bindings"]:
        queue = await channel.get_queue(binding["destination"], ensure=False)
        await queue.bind(
            binding["source"], binding["routing_key"], arguments=binding["arguments"] or None
        )


@pytest.fixture
async def declared_namespace(
    broker: str,
) -> AsyncIterator[tuple[str, aio_pika.abc.AbstractConnection]]:
    """Declare definitions.json under a unique namespace; delete it all afterwards."""
    namespace = f"tdeploy{uuid.uuid4().hex}"
    content = rename_namespace(definitions(), namespace)
    connection = await aio_pika.connect(broker)
    async with connection:
        try:
            await declare_definitions(await connection.channel(), content)
            yield namespace, connection
        finally:
            channel = await connection.channel()
            for queue in content["queues"]:
                await channel.queue_delete(queue["name"])
            for exchange in content["exchanges"]:
                await channel.exchange_delete(exchange["name"])


async def test_worker_accepts_definitions(
    declared_namespace: tuple[str, aio_pika.abc.AbstractConnection],
) -> None:
    namespace, connection = declared_namespace
    topology = Topology.from_settings(Settings(amqp_namespace=namespace))

    declared = await declare(await connection.channel(), topology)

    assert declared.jobs.name == f"{namespace}.jobs"


async def test_worker_rejects_other_delivery_limit(
    declared_namespace: tuple[str, aio_pika.abc.AbstractConnection],
) -> None:
    """The check above can fail: a queue argument that differs is refused by the broker."""
    namespace, connection = declared_namespace
    jobs_queue = next(queue for queue in definitions()["queues"] if queue["name"].endswith(".jobs"))
    limit = jobs_queue["arguments"]["x-delivery-limit"] + 1
    topology = Topology.from_settings(Settings(amqp_namespace=namespace, delivery_limit=limit))

    with pytest.raises(TopologyMismatch):
        await declare(await connection.channel(), topology)
