"""cluster/: the launcher YAMLs pass Ray's own validation, the KubeRay manifests fit the ray.io/v1 API, and every
cluster can host the resources the documented job asks for (offline: no cloud or Kubernetes calls)."""

from __future__ import annotations

import copy
import math
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from braid_ray.config import Config, RayConfig, load_config
from braid_ray.distributed import cluster
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
LAUNCHERS = ("aws.yaml", "gcp.yaml")
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _job_config() -> Config:
    """The config the RayJob's entrypoint runs: the one the cluster sizes are checked against."""
    args = shlex.split(_yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"])
    assert args[:2] == ["python", "/home/ray/braid-ray/launch/finetune.py"] and args[2] == "--config"
    preset = ROOT / Path(args[3]).relative_to("/home/ray/braid-ray")
    return load_config(preset, args[4:])


# ------------------------------------------------------------------------------------------------
# Cluster launcher (ray up)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_own_validation(name: str) -> None:
    """What `ray up` does before any cloud call: fill in the provider's defaults, then validate against
    ray/autoscaler/ray-schema.json and the node-type rules."""
    config = prepare_config(_yaml(CLUSTER / name))
    validate_config(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0, "one GPU group that autoscales from zero"
    assert config["docker"]["image"] == RAY_IMAGE
    assert "--env BRAID_AUTOSCALING=1" in config["docker"]["run_options"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    assert config["file_mounts"] == {"/home/ray/braid-ray": "."}
    assert "pip install --quiet -e /home/ray/braid-ray" in config["worker_setup_commands"]


def test_launcher_validation_rejects_a_broken_config() -> None:
    """The validation above has teeth: a misspelt node-type field and a fractional resource are refused."""
    broken = _yaml(CLUSTER / "aws.yaml")
    broken["available_node_types"]["gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))
    fractional = _yaml(CLUSTER / "gcp.yaml")
    fractional["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))


# ------------------------------------------------------------------------------------------------
# KubeRay manifests against the ray.io/v1 API.
#
# No CRD file is available offline, so the fields these manifests use are encoded below from KubeRay's Go
# types (ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go, KubeRay >= 1.2): which keys are
# required (json tags without omitempty), which are allowed, and their types; the Pod template is checked on
# the subset of the Kubernetes PodSpec the manifests need. Unknown keys are errors: the API server would drop
# them silently.


@dataclass
class Obj:
    fields: dict[str, Any]
    required: frozenset[str] = frozenset()


@dataclass
class Map:
    value: Any


@dataclass
class Enum:
    values: tuple[str, ...]


QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _obj(required: str = "", **fields: Any) -> Obj:
    return Obj(fields, frozenset(required.split()))


ENV_VAR = _obj("name", name=str, value=str)
RESOURCES = _obj(limits=Map(QUANTITY), requests=Map(QUANTITY))
CONTAINER = _obj("name image", name=str, image=str, imagePullPolicy=Enum(("Always", "IfNotPresent", "Never")),
                 command=[str], args=[str], env=[ENV_VAR], resources=RESOURCES,
                 ports=[_obj("containerPort", containerPort=int, name=str, protocol=str)])
TOLERATION = _obj(key=str, operator=Enum(("Exists", "Equal")), value=str,
                  effect=Enum(("NoSchedule", "PreferNoSchedule", "NoExecute")))
POD_TEMPLATE = _obj("spec", metadata=_obj(labels=Map(str), annotations=Map(str)),
                    spec=_obj("containers", containers=[CONTAINER], tolerations=[TOLERATION], nodeSelector=Map(str),
                              serviceAccountName=str))
RAY_START_PARAMS = Map(str)  # map[string]string: `num-cpus: 0` unquoted is an error
RAY_CLUSTER_SPEC = _obj(
    "headGroupSpec", rayVersion=str, enableInTreeAutoscaling=bool, suspend=bool, headServiceAnnotations=Map(str),
    autoscalerOptions=_obj(upscalingMode=Enum(("Default", "Aggressive", "Conservative")), idleTimeoutSeconds=int,
                           image=str, imagePullPolicy=Enum(("Always", "IfNotPresent", "Never")), env=[ENV_VAR],
                           resources=RESOURCES),
    headGroupSpec=_obj("rayStartParams template", rayStartParams=RAY_START_PARAMS, template=POD_TEMPLATE,
                       serviceType=Enum(("ClusterIP", "NodePort", "LoadBalancer")), enableIngress=bool),
    workerGroupSpecs=[_obj("groupName minReplicas maxReplicas rayStartParams template", groupName=str, replicas=int,
                           minReplicas=int, maxReplicas=int, numOfHosts=int, rayStartParams=RAY_START_PARAMS,
                           template=POD_TEMPLATE)])
METADATA = _obj("name", name=DNS_1123, namespace=str, labels=Map(str), annotations=Map(str))
RAY_V1 = {
    "RayCluster": _obj("apiVersion kind metadata spec", apiVersion=str, kind=str, metadata=METADATA,
                       spec=RAY_CLUSTER_SPEC),
    "RayJob": _obj("apiVersion kind metadata spec", apiVersion=str, kind=str, metadata=METADATA, spec=_obj(
        "entrypoint", entrypoint=str, runtimeEnvYAML=str, rayClusterSpec=RAY_CLUSTER_SPEC, clusterSelector=Map(str),
        submissionMode=Enum(("K8sJobMode", "HTTPMode", "InteractiveMode")), backoffLimit=int,
        activeDeadlineSeconds=int, shutdownAfterJobFinishes=bool, ttlSecondsAfterFinished=int, suspend=bool,
        jobId=str, metadata=Map(str), entrypointNumCpus=float, entrypointNumGpus=float,
        entrypointResources=str, submitterConfig=_obj(backoffLimit=int))),
}


def schema_errors(value: Any, schema: Any, where: str = "") -> list[str]:
    """Every place where ``value`` does not fit ``schema`` (empty: it fits)."""
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        errors = [f"{where}.{k}: required" for k in sorted(schema.required - value.keys())]
        errors += [f"{where}.{k}: not a field of ray.io/v1" for k in sorted(value.keys() - schema.fields.keys())]
        for k in value.keys() & schema.fields.keys():
            errors += schema_errors(value[k], schema.fields[k], f"{where}.{k}")
        return errors
    if isinstance(schema, Map):
        if not isinstance(value, dict):
            return [f"{where}: expected a map, got {value!r}"]
        return [e for k, v in value.items() for e in schema_errors(v, schema.value, f"{where}[{k}]")]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        return [e for i, v in enumerate(value) for e in schema_errors(v, schema[0], f"{where}[{i}]")]
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{where}: {value!r} not one of {schema.values}"]
    if isinstance(schema, re.Pattern):
        ok = isinstance(value, (str, int)) and not isinstance(value, bool) and schema.match(str(value))
        return [] if ok else [f"{where}: {value!r} does not match {schema.pattern}"]
    if schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = type(value) is schema  # bool is not an int here, as in the API server
    return [] if ok else [f"{where}: expected {schema.__name__}, got {value!r}"]


def cluster_spec_errors(spec: dict, where: str) -> list[str]:
    """The RayCluster rules beyond types (KubeRay's validation): replica bounds, unique groups, ray version."""
    errors = []
    groups = spec.get("workerGroupSpecs", [])
    names = [g["groupName"] for g in groups]
    if len(set(names)) != len(names):
        errors.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    for g in groups:
        if not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
            errors.append(f"{where}.workerGroupSpecs[{g['groupName']}]: needs minReplicas <= replicas <= maxReplicas")
    if spec.get("rayVersion") != ray.__version__:
        errors.append(f"{where}.rayVersion: {spec.get('rayVersion')!r}, the project runs Ray {ray.__version__}")
    return errors


def manifest_errors(manifest: dict) -> list[str]:
    kind = manifest.get("kind")
    if manifest.get("apiVersion") != "ray.io/v1" or kind not in RAY_V1:
        return [f"apiVersion/kind: expected ray.io/v1 RayCluster or RayJob, got {manifest.get('apiVersion')} {kind}"]
    errors = schema_errors(manifest, RAY_V1[kind], kind)
    if errors:
        return errors
    spec = manifest["spec"]
    if kind == "RayCluster":
        return cluster_spec_errors(spec, "RayCluster.spec")
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        errors.append("RayJob.spec: exactly one of rayClusterSpec and clusterSelector")
    if spec.get("shutdownAfterJobFinishes") and "rayClusterSpec" not in spec:
        errors.append("RayJob.spec.shutdownAfterJobFinishes: needs rayClusterSpec")
    if not isinstance(yaml.safe_load(spec.get("runtimeEnvYAML", "{}")), dict):
        errors.append("RayJob.spec.runtimeEnvYAML: not a YAML mapping")
    return errors + cluster_spec_errors(spec.get("rayClusterSpec", {}), "RayJob.spec.rayClusterSpec")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifest_fits_the_ray_io_v1_api(name: str) -> None:
    manifest = _yaml(CLUSTER / "kuberay" / name)
    assert manifest_errors(manifest) == []


def test_kuberay_check_rejects_broken_manifests() -> None:
    manifest = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    typo, unquoted, bounds = copy.deepcopy(manifest), copy.deepcopy(manifest), copy.deepcopy(manifest)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    unquoted["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    bounds["spec"]["workerGroupSpecs"][0]["replicas"] = 9
    assert manifest_errors(typo) == ["RayCluster.spec.workerGroupSpecs[0].maxReplica: not a field of ray.io/v1"]
    assert manifest_errors(unquoted) == ["RayCluster.spec.headGroupSpec.rayStartParams[num-cpus]: expected str, got 0"]
    assert manifest_errors(bounds) == ["RayCluster.spec.workerGroupSpecs[gpu]: needs minReplicas <= replicas <= "
                                       "maxReplicas"]


def test_rayjob_runs_on_the_raycluster_spec() -> None:
    """One cluster definition: the RayJob's own cluster is the long-lived RayCluster's spec."""
    job, raycluster = _yaml(CLUSTER / "kuberay" / "rayjob.yaml"), _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    assert job["spec"]["rayClusterSpec"] == raycluster["spec"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for group in [raycluster["spec"]["headGroupSpec"], *raycluster["spec"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {f"braid-ray:{version}"}
    assert f"FROM {RAY_IMAGE}\n" in (CLUSTER / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------------
# Every cluster can host the job's config


@dataclass
class WorkerGroup:
    cpus: float  # per node, as Ray advertises them
    gpus: int
    max_nodes: int


def _launcher_group(name: str) -> tuple[WorkerGroup, dict]:
    config = prepare_config(_yaml(CLUSTER / name))
    (gpu,) = [n for n in config["available_node_types"].values() if n["resources"].get("GPU", 0) >= 1]
    max_nodes = min(gpu["max_workers"], config["max_workers"])
    return WorkerGroup(gpu["resources"]["CPU"], gpu["resources"]["GPU"], max_nodes), config


def _quantity(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_group(spec: dict) -> WorkerGroup:
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]  # what Ray advertises (CPU rounded up), unless rayStartParams say
    assert not {"num-cpus", "num-gpus"} & group["rayStartParams"].keys()
    return WorkerGroup(math.ceil(_quantity(limits["cpu"])), int(limits.get("nvidia.com/gpu", 0)), group["maxReplicas"])


def workers_hosted(group: WorkerGroup, cfg: RayConfig) -> int:
    """How many Ray Train workers (each cfg.cpus_per_worker CPUs, and one GPU with use_gpu) fit at full scale."""
    per_node = math.floor(group.cpus / cfg.cpus_per_worker)
    if cfg.use_gpu:
        per_node = min(per_node, group.gpus)
    return per_node * group.max_nodes


def test_every_cluster_can_host_the_jobs_workers() -> None:
    cfg = _job_config().ray
    assert cfg.use_gpu and cfg.num_workers >= 2, "the cluster job is data-parallel on GPUs"
    groups = {name: _launcher_group(name)[0] for name in LAUNCHERS}
    for name in ("raycluster.yaml", "rayjob.yaml"):
        manifest = _yaml(CLUSTER / "kuberay" / name)
        spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
        groups[name] = _kuberay_group(spec)
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert {"name": "BRAID_AUTOSCALING", "value": "1"} in head["template"]["spec"]["containers"][0]["env"]
    for name, group in groups.items():
        assert group.gpus >= 1, name
        assert workers_hosted(group, cfg) >= cfg.num_workers, f"{name}: {group} cannot host {cfg}"
    # ...and not trivially: one worker fewer CPU per node, or one node fewer, would not do.
    tight = _launcher_group("aws.yaml")[0]
    assert workers_hosted(WorkerGroup(tight.cpus, tight.gpus, tight.max_nodes - 1), cfg) < cfg.num_workers
    assert workers_hosted(WorkerGroup(cfg.cpus_per_worker - 1, 1, 99), cfg) == 0


def test_runtime_env_agrees_with_the_workers_and_the_rayjob() -> None:
    env = _yaml(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "." and {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    # The same variables as ray.init passes to workers when run without a runtime env, with the same values.
    assert env["env_vars"] == cluster.WORKER_ENV
    cfg = _job_config().ray
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert 1 <= int(env["env_vars"][key]) <= max(1, cfg.cpus_per_worker)
    job = _yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"env_vars": env["env_vars"]}  # code comes with the image


def test_a_submitted_job_keeps_its_own_runtime_env_vars(monkeypatch) -> None:
    """Ray refuses a driver's ray.init(runtime_env) that repeats an env var of the job's runtime env."""
    monkeypatch.setenv(cluster.JOB_CONFIG_VAR, '{"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}')
    assert cluster.worker_env() == {k: v for k, v in cluster.WORKER_ENV.items() if k != "OMP_NUM_THREADS"}
    monkeypatch.delenv(cluster.JOB_CONFIG_VAR)
    assert cluster.worker_env() == cluster.WORKER_ENV


def test_a_dashboard_url_is_not_a_cluster_to_join(monkeypatch) -> None:
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ValueError, match="ray job submit"):
        cluster.init(RayConfig())


# ------------------------------------------------------------------------------------------------
# README: the commands use these files and the same job config


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    assert "\n## Run on a cluster\n" in text
    return text.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]


def _commands(section: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_use_the_cluster_files_and_the_job_config() -> None:
    commands = _commands(_readme_section())
    job_args = shlex.split(_yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"])
    ray_overrides = [a for a in job_args if a.startswith("ray.")]
    submits = [c for c in commands if c.startswith("ray job submit")]
    assert submits
    for command in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in command
        assert "-- python launch/finetune.py" in command
        assert all(o in command.split() for o in ray_overrides), command
    mentioned = {m for c in commands for m in re.findall(r"(cluster/[\w./-]+\.yaml)", c)}
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/kuberay/raycluster.yaml", "cluster/runtime_env.yaml"} <= mentioned
    assert all((ROOT / m).is_file() for m in mentioned)
    assert any(c.startswith("ray up") for c in commands) and any(c.startswith("kubectl apply -f") for c in commands)
