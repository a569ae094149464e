"""cluster/: the launcher YAMLs pass Ray's own validation, the KubeRay manifests fit the ray.io/v1 API, every preset
fits the node type docs/cluster.md gives it, and the clusters are closed the way docs/cluster.md says (SSH from
one CIDR, scoped IAM, service accounts, token auth, NetworkPolicies). All offline: no cloud or Kubernetes calls;
the setup scripts run against stub `aws` / `gcloud` commands."""

from __future__ import annotations

import ast
import copy
import json
import math
import os
import re
import shlex
import subprocess
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
DOCS = ROOT / "docs" / "cluster.md"
LAUNCHERS = ("aws.yaml", "gcp.yaml")
KUBERAY = ("raycluster.yaml", "rayjob.yaml")
NODE_TYPES = ("cpu", "gpu", "gpu8")  # the worker types of every cluster, by the same names
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
PLACEHOLDER = re.compile(r"YOUR-[A-Z0-9-]*[A-Z0-9]")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _launcher(name: str) -> dict:
    return prepare_config(_yaml(CLUSTER / name))


def _job_config() -> Config:
    """The config the RayJob's entrypoint runs: the one the cluster sizes are checked against."""
    args = shlex.split(_yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"])
    assert args[:2] == ["python", "/home/ray/braid-ray/launch/finetune.py"] and args[2] == "--config"
    preset = ROOT / Path(args[3]).relative_to("/home/ray/braid-ray")
    return load_config(preset, args[4:])


def _ray_cluster_spec(name: str) -> dict:
    manifest = _yaml(CLUSTER / "kuberay" / name)
    return manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


# ------------------------------------------------------------------------------------------------
# Cluster launcher (ray up)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_config_passes_rays_own_validation(name: str) -> None:
    """What `ray up` does before any cloud call: fill in the provider's defaults, then validate against
    ray/autoscaler/ray-schema.json and the node-type rules."""
    config = _launcher(name)
    validate_config(config)
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in nodes.items() if k != config["head_node_type"]}
    assert sorted(workers) == sorted(NODE_TYPES)
    assert all(w["min_workers"] == 0 for w in workers.values()), "every worker type autoscales from zero"
    assert workers["cpu"]["resources"].get("GPU", 0) == 0, "a CPU type for sequence stages and CPU sweeps"
    assert workers["gpu"]["resources"]["GPU"] == 1 and workers["gpu8"]["resources"]["GPU"] == 8
    assert config["max_workers"] >= sum(w["max_workers"] for w in workers.values()), "every type can scale out at once"
    assert config["docker"]["image"] == RAY_IMAGE
    # braid-ray's settings come from each job's config, not the nodes' environment: jobs pass ray.autoscaling=true.
    assert not any("BRAID_" in option for option in config["docker"]["run_options"])
    assert "ray.autoscaling=true" in (CLUSTER / name).read_text()
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


def _ray_aws_defaults() -> tuple[dict[str, str], str]:
    """Ray's own defaults for AWS nodes, read from its source (importing it needs boto3): the AMI per region that
    an empty ImageId means, and the SSH rule of the security group Ray creates when a node type names none."""
    source = (Path(ray.__file__).parent / "autoscaler/_private/aws/config.py").read_text()
    tree = ast.parse(source)
    amis = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "DEFAULT_AMI" for t in n.targets))
    ssh_rule = next(ast.get_source_segment(source, n) for n in tree.body
                    if isinstance(n, ast.FunctionDef) and n.name == "_create_default_ssh_inbound_rules")
    return amis, ssh_rule


def test_aws_nodes_boot_one_pinned_ubuntu_2204_ami_behind_a_restricted_security_group() -> None:
    config = _launcher("aws.yaml")
    text = (CLUSTER / "aws.yaml").read_text()
    nodes = config["available_node_types"]
    ray_amis, ray_ssh_rule = _ray_aws_defaults()

    amis = {key: n["node_config"].get("ImageId") for key, n in nodes.items()}
    assert len(set(amis.values())) == 1 and None not in amis.values(), f"one pinned AMI on every node type: {amis}"
    ami = amis["head"]
    assert ami == "YOUR-AMI-ID" or re.fullmatch(r"ami-[0-9a-f]{8,17}", ami), ami
    assert ami not in ray_amis.values(), "Ray's default AMI is an Ubuntu 18.04 Deep Learning AMI"
    assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in text, "the comment names the Ubuntu 22.04 DLAMI to pin"

    # A node type without SecurityGroupIds gets Ray's own group, whose SSH rule is open to the world.
    assert '"0.0.0.0/0"' in ray_ssh_rule, "Ray's default SSH rule changed: revisit the comment in aws.yaml"
    missing = [key for key, n in nodes.items() if not n["node_config"].get("SecurityGroupIds")]
    assert not missing, f"node types {missing} would get Ray's security group with SSH open to 0.0.0.0/0"
    assert "security_group" not in config["provider"]

    profiles = {key: n["node_config"]["IamInstanceProfile"]["Arn"] for key, n in nodes.items()}
    account = r"arn:aws:iam::(YOUR-ACCOUNT-ID|[0-9]{12}):instance-profile/"
    assert re.fullmatch(account + "braid-ray-head", profiles.pop(config["head_node_type"]))
    assert all(re.fullmatch(account + "braid-ray-worker", arn) for arn in profiles.values()), profiles


def test_aws_iam_policies_grant_the_run_bucket_and_nothing_wider() -> None:
    bucket = json.loads((CLUSTER / "aws-iam-policy.json").read_text())
    granted = set()
    for statement in bucket["Statement"]:
        resources, actions = _as_list(statement["Resource"]), _as_list(statement["Action"])
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        assert set(resources) <= {"arn:aws:s3:::YOUR-BUCKET", "arn:aws:s3:::YOUR-BUCKET/*"}, statement
        assert all(a.startswith("s3:") and "*" not in a for a in actions), statement
        granted |= {(a, r) for a in actions for r in resources}
    objects = "arn:aws:s3:::YOUR-BUCKET/*"
    assert {("s3:ListBucket", "arn:aws:s3:::YOUR-BUCKET"), ("s3:GetObject", objects), ("s3:PutObject", objects),
            ("s3:DeleteObject", objects)} <= granted

    head = json.loads((CLUSTER / "aws-iam-head-policy.json").read_text())
    region = _yaml(CLUSTER / "aws.yaml")["provider"]["region"]
    for statement in head["Statement"]:
        resources, actions = _as_list(statement["Resource"]), _as_list(statement["Action"])
        assert statement["Effect"] == "Allow" and all("*" not in a for a in actions), statement
        if resources == ["*"]:  # EC2 actions without resource-level scoping: this region only
            assert all(a.startswith("ec2:") for a in actions), statement
            assert statement["Condition"] == {"StringEquals": {"aws:RequestedRegion": region}}, statement
        else:
            assert actions == ["iam:PassRole"], statement
            assert resources == ["arn:aws:iam::YOUR-ACCOUNT-ID:role/braid-ray-worker"], statement
            assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


STORAGE_SCOPES = {f"https://www.googleapis.com/auth/{s}"
                  for s in ("devstorage.read_write", "devstorage.full_control", "cloud-platform")}


def test_gcp_nodes_have_a_service_account_with_a_storage_scope_and_a_closed_network() -> None:
    config = _launcher("gcp.yaml")
    for key, node in config["available_node_types"].items():
        node_config = node["node_config"]
        (account,) = node_config.get("serviceAccounts") or [None]
        assert account, f"{key}: a VM without a service account has no credentials for gs://"
        role = "head" if key == config["head_node_type"] else "worker"
        assert re.fullmatch(rf"braid-ray-{role}@(YOUR-PROJECT-ID|[a-z][-a-z0-9]{{4,28}}[a-z0-9])"
                            r"\.iam\.gserviceaccount\.com", account["email"]), account
        assert STORAGE_SCOPES & set(account["scopes"]), f"{key}: no storage scope in {account['scopes']}"
        if role == "worker":  # least privilege: the bucket, through the scope and the bucket's IAM binding
            assert account["scopes"] == ["https://www.googleapis.com/auth/devstorage.read_write"], key
        # Not the default network (its default-allow-ssh admits 0.0.0.0/0): the braid-ray subnetwork and tag,
        # which the firewall rules of gcp-setup.sh open to SSH_CIDR and to each other only.
        interfaces = node_config["networkInterfaces"]
        assert [i["subnetwork"].rsplit("/", 1)[-1] for i in interfaces] == ["braid-ray"], key
        assert not any("network" in i for i in interfaces), key
        assert node_config["tags"] == {"items": ["braid-ray"]}, key
        if node["resources"].get("GPU"):  # GPU VMs cannot live-migrate; `scheduling` is an object in the API
            assert node_config["scheduling"]["onHostMaintenance"] == "TERMINATE", key


def _run_setup(script: str, env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, list]:
    """Run a setup script with stub `aws` and `gcloud` that log their arguments (one JSON list per call)."""
    log = tmp_path / "calls.jsonl"
    for tool in ("aws", "gcloud"):
        stub = tmp_path / tool
        stub.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, sys\n"
                        f"open(sys.argv[1], \"a\").write(json.dumps(sys.argv[2:]) + \"\\n\")\n"
                        f"print(\"stub-id\")' {shlex.quote(str(log))} {tool} \"$@\"\n")
        stub.chmod(0o755)
    result = subprocess.run(["bash", str(CLUSTER / script)], capture_output=True, text=True, timeout=60,
                            env={"PATH": f"{tmp_path}:{os.environ['PATH']}", "HOME": str(tmp_path), **env})
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def _flag(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


@pytest.mark.parametrize("script", ["aws-setup.sh", "gcp-setup.sh"])
def test_setup_scripts_refuse_to_open_ssh_to_the_world(script: str, tmp_path: Path) -> None:
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)
    code = [line for line in (CLUSTER / script).read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any("0.0.0.0" in line for line in code)
    for cidr in ("0.0.0.0/0", "::/0"):
        result, calls = _run_setup(script, {"PROJECT": "p", "BUCKET": "b", "SSH_CIDR": cidr}, tmp_path)
        assert result.returncode == 1 and "whole internet" in result.stderr and calls == []


def test_aws_setup_opens_ssh_to_one_cidr_and_fills_in_the_policies(tmp_path: Path) -> None:
    result, calls = _run_setup("aws-setup.sh", {"BUCKET": "my-runs", "SSH_CIDR": "198.51.100.7/32"}, tmp_path)
    assert result.returncode == 0, result.stderr
    ingress = [c for c in calls if c[:3] == ["aws", "ec2", "authorize-security-group-ingress"]]
    assert len(ingress) == 2
    assert (_flag(ingress[0], "--port"), _flag(ingress[0], "--cidr")) == ("22", "198.51.100.7/32")
    assert "--cidr" not in ingress[1] and _flag(ingress[1], "--source-group") == _flag(ingress[1], "--group-id")
    policies = {(_flag(c, "--role-name"), _flag(c, "--policy-name")): json.loads(_flag(c, "--policy-document"))
                for c in calls if c[:3] == ["aws", "iam", "put-role-policy"]}
    assert sorted(policies) == [("braid-ray-head", "braid-ray-autoscaler"), ("braid-ray-head", "braid-ray-run-bucket"),
                                ("braid-ray-worker", "braid-ray-run-bucket")]
    text = json.dumps(list(policies.values()))
    assert "arn:aws:s3:::my-runs/*" in text and "YOUR-" not in text and "0.0.0.0" not in json.dumps(calls)
    assert "YOUR-AMI-ID" in result.stdout and "YOUR-SECURITY-GROUP-ID" in result.stdout


def test_gcp_setup_opens_ssh_to_one_cidr_and_grants_the_bucket(tmp_path: Path) -> None:
    env = {"PROJECT": "my-proj", "BUCKET": "my-runs", "SSH_CIDR": "198.51.100.7/32"}
    result, calls = _run_setup("gcp-setup.sh", env, tmp_path)
    assert result.returncode == 0, result.stderr
    rules = {c[4]: c for c in calls if c[1:4] == ["compute", "firewall-rules", "create"]}
    assert sorted(rules) == ["braid-ray-internal", "braid-ray-ssh"]
    ssh, internal = rules["braid-ray-ssh"], rules["braid-ray-internal"]
    assert (_flag(ssh, "--allow"), _flag(ssh, "--source-ranges"), _flag(ssh, "--target-tags")) == \
        ("tcp:22", "198.51.100.7/32", "braid-ray")
    assert "--source-ranges" not in internal and _flag(internal, "--source-tags") == "braid-ray"
    bucket_roles = {(_flag(c, "--member"), _flag(c, "--role")) for c in calls
                    if c[1:4] == ["storage", "buckets", "add-iam-policy-binding"] and c[4] == "gs://my-runs"}
    assert bucket_roles == {(f"serviceAccount:braid-ray-{r}@my-proj.iam.gserviceaccount.com",
                             "roles/storage.objectAdmin") for r in ("head", "worker")}
    assert not any(c[1:3] == ["projects", "add-iam-policy-binding"] and "storage" in _flag(c, "--role") for c in calls)
    assert "0.0.0.0" not in json.dumps(calls)


# ------------------------------------------------------------------------------------------------
# KubeRay manifests against the ray.io/v1 API.
#
# No CRD file is available offline, so the fields these manifests use are encoded below from KubeRay's Go
# types (ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go, KubeRay >= 1.6: authOptions.secretName)
# and the Kubernetes core/v1 and networking/v1 types: which keys are required (json tags without omitempty), which
# are allowed, and their types; the Pod template is checked on the subset of the PodSpec the manifests need.
# Unknown keys are errors: the API server would drop them silently.


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
VOLUME_MOUNT = _obj("name mountPath", name=str, mountPath=str, readOnly=bool)
VOLUME = _obj("name", name=str, emptyDir=_obj(medium=Enum(("", "Memory")), sizeLimit=QUANTITY))
CONTAINER = _obj("name image", name=str, image=str, imagePullPolicy=Enum(("Always", "IfNotPresent", "Never")),
                 command=[str], args=[str], env=[ENV_VAR], resources=RESOURCES, volumeMounts=[VOLUME_MOUNT],
                 ports=[_obj("containerPort", containerPort=int, name=str, protocol=str)])
TOLERATION = _obj(key=str, operator=Enum(("Exists", "Equal")), value=str,
                  effect=Enum(("NoSchedule", "PreferNoSchedule", "NoExecute")))
POD_TEMPLATE = _obj("spec", metadata=_obj(labels=Map(str), annotations=Map(str)),
                    spec=_obj("containers", containers=[CONTAINER], tolerations=[TOLERATION], nodeSelector=Map(str),
                              serviceAccountName=str, automountServiceAccountToken=bool, volumes=[VOLUME]))
RAY_START_PARAMS = Map(str)  # map[string]string: `num-cpus: 0` unquoted is an error
RAY_CLUSTER_SPEC = _obj(
    "headGroupSpec", rayVersion=str, enableInTreeAutoscaling=bool, suspend=bool, headServiceAnnotations=Map(str),
    authOptions=_obj(mode=Enum(("disabled", "token")), secretName=str, enableK8sTokenAuth=bool),
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
LABEL_SELECTOR = _obj(matchLabels=Map(str), matchExpressions=[_obj(
    "key operator", key=str, operator=Enum(("In", "NotIn", "Exists", "DoesNotExist")), values=[str])])
PEER = _obj(podSelector=LABEL_SELECTOR, namespaceSelector=LABEL_SELECTOR, ipBlock=_obj("cidr", cidr=str))
K8S = {  # (apiVersion, kind) of security.yaml's objects
    ("v1", "ServiceAccount"): _obj("apiVersion kind metadata", apiVersion=str, kind=str, metadata=METADATA,
                                   automountServiceAccountToken=bool),
    ("networking.k8s.io/v1", "NetworkPolicy"): _obj(
        "apiVersion kind metadata spec", apiVersion=str, kind=str, metadata=METADATA, spec=_obj(
            "podSelector", podSelector=LABEL_SELECTOR, policyTypes=[Enum(("Ingress", "Egress"))],
            ingress=[_obj(**{"from": [PEER]}, ports=[_obj(port=int, endPort=int, protocol=Enum(("TCP", "UDP")))])],
            egress=[_obj(to=[PEER], ports=[_obj(port=int, endPort=int, protocol=Enum(("TCP", "UDP")))])])),
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
    if spec.get("authOptions", {}).get("mode") == "token" and tuple(map(int, ray.__version__.split(".")[:2])) < (2, 52):
        errors.append(f"{where}.authOptions: token authentication needs Ray >= 2.52")
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
    if spec.get("activeDeadlineSeconds", 1) <= 0:
        errors.append("RayJob.spec.activeDeadlineSeconds: must be positive")
    return errors + cluster_spec_errors(spec.get("rayClusterSpec", {}), "RayJob.spec.rayClusterSpec")


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_fits_the_ray_io_v1_api(name: str) -> None:
    manifest = _yaml(CLUSTER / "kuberay" / name)
    assert manifest_errors(manifest) == []


def test_kuberay_check_rejects_broken_manifests() -> None:
    manifest = _yaml(CLUSTER / "kuberay" / "raycluster.yaml")
    typo, unquoted, bounds, auth = (copy.deepcopy(manifest) for _ in range(4))
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    unquoted["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    bounds["spec"]["workerGroupSpecs"][0]["replicas"] = 9
    auth["spec"]["authOptions"]["mode"] = "Token"
    assert manifest_errors(typo) == ["RayCluster.spec.workerGroupSpecs[0].maxReplica: not a field of ray.io/v1"]
    assert manifest_errors(unquoted) == ["RayCluster.spec.headGroupSpec.rayStartParams[num-cpus]: expected str, got 0"]
    assert manifest_errors(bounds) == ["RayCluster.spec.workerGroupSpecs[cpu]: needs minReplicas <= replicas <= "
                                       "maxReplicas"]
    assert manifest_errors(auth) == ["RayCluster.spec.authOptions.mode: 'Token' not one of ('disabled', 'token')"]


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
# KubeRay: token authentication, NetworkPolicies, service account, /dev/shm, a deadline


def _security() -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / "kuberay" / "security.yaml").read_text()))


def _ray_pods(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod template, the labels KubeRay's pods carry) for the head and every worker group."""
    head = spec["headGroupSpec"]["template"]
    pods = [("head", head, {**head.get("metadata", {}).get("labels", {}), "ray.io/node-type": "head"})]
    for group in spec["workerGroupSpecs"]:
        template = group["template"]
        labels = {**template.get("metadata", {}).get("labels", {}), "ray.io/node-type": "worker",
                  "ray.io/group": group["groupName"]}
        pods.append((group["groupName"], template, labels))
    return pods


def _selects(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels selectors are modelled here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_peers(policies: list[dict], labels: dict, port: int) -> list[dict] | None:
    """Who may connect to ``port`` of a pod with ``labels`` in its namespace: the peers of every ingress rule (of
    every NetworkPolicy selecting the pod) that covers the port; None: anyone (no policy isolates the pod, or a
    rule admits every source)."""
    isolating = [p for p in policies if _selects(p["spec"]["podSelector"], labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return None
    peers = []
    for policy in isolating:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and not any(p.get("port") == port for p in rule["ports"]):
                continue
            if not rule.get("from"):
                return None
            peers += rule["from"]
    return peers


OWN_PODS = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "braid-ray"}}}
KUBERAY_CLIENTS = [  # the operator (any namespace) and the RayJob submitter pods, both of KubeRay's own labels
    {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}},
    {"podSelector": {"matchLabels": {"ray.io/originated-from-crd": "RayJob",
                                     "app.kubernetes.io/created-by": "kuberay-operator"}}},
]
RAY_PORTS = (6379, 8265, 10001, 43210)  # GCS, dashboard / Jobs API, client, one of the ports Ray picks at start


def network_exposure_errors(policies: list[dict], spec: dict) -> list[str]:
    errors = []
    for group, template, labels in _ray_pods(spec):
        if not _selects(OWN_PODS["podSelector"], labels):
            errors.append(f"{group}: its pods lack the label the policies select on")
        for port in RAY_PORTS:
            peers = ingress_peers(policies, labels, port)
            allowed = [OWN_PODS] + (KUBERAY_CLIENTS if (group, port) == ("head", 8265) else [])
            if peers is None:
                errors.append(f"{group}:{port}: open to every pod")
            elif extra := [p for p in peers if p not in allowed]:
                errors.append(f"{group}:{port}: open to {extra}")
    return errors


def _bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(number) * scale[unit]


def test_kuberay_security_manifests_fit_their_apis() -> None:
    objects = _security()
    assert [(o["apiVersion"], o["kind"]) for o in objects] == [
        ("v1", "ServiceAccount"), ("networking.k8s.io/v1", "NetworkPolicy"), ("networking.k8s.io/v1", "NetworkPolicy")]
    for o in objects:
        assert schema_errors(o, K8S[(o["apiVersion"], o["kind"])], o["kind"]) == []


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_cluster_authenticates_and_admits_only_its_own_pods(name: str) -> None:
    spec = _ray_cluster_spec(name)
    objects = _security()
    (account,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]

    assert spec["authOptions"] == {"mode": "token", "secretName": "braid-ray-auth"}
    assert network_exposure_errors(policies, spec) == []
    for group, template, _ in _ray_pods(spec):
        pod = template["spec"]
        assert pod.get("serviceAccountName") == account, group
        assert pod.get("automountServiceAccountToken", True) is (group == "head"), \
            f"{group}: only the head (its autoscaler) needs a Kubernetes token"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            (shm,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            empty_dir = volumes[shm["name"]]["emptyDir"]
            assert empty_dir["medium"] == "Memory", group
            assert _bytes(empty_dir["sizeLimit"]) <= _bytes(container["resources"]["limits"]["memory"]), group
    if name == "rayjob.yaml":
        assert 0 < _yaml(CLUSTER / "kuberay" / name)["spec"]["activeDeadlineSeconds"] <= 24 * 3600


def test_network_exposure_check_has_teeth() -> None:
    spec = _ray_cluster_spec("raycluster.yaml")
    policies = [o for o in _security() if o["kind"] == "NetworkPolicy"]
    allow_all, wider = copy.deepcopy(policies), copy.deepcopy(policies)
    allow_all[1]["spec"]["ingress"].append({})
    wider[1]["spec"]["ingress"][0]["ports"].append({"port": 6379, "protocol": "TCP"})
    assert network_exposure_errors(allow_all, spec) == [f"head:{port}: open to every pod" for port in RAY_PORTS]
    assert network_exposure_errors(wider, spec) == [f"head:6379: open to {KUBERAY_CLIENTS}"]
    assert network_exposure_errors(policies[1:], spec) == [f"{group}:{port}: open to every pod"
                                                           for group in NODE_TYPES for port in RAY_PORTS]


# ------------------------------------------------------------------------------------------------
# Every preset fits the node type docs/cluster.md gives it, and every cluster can host the README's job


@dataclass
class WorkerGroup:
    cpus: float  # per node, as Ray advertises them
    gpus: int
    max_nodes: int


def _launcher_groups(name: str) -> dict[str, WorkerGroup]:
    config = _launcher(name)
    return {key: WorkerGroup(n["resources"].get("CPU", 0), n["resources"].get("GPU", 0),
                             min(n["max_workers"], config["max_workers"]))
            for key, n in config["available_node_types"].items() if key != config["head_node_type"]}


def _quantity(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_groups(spec: dict) -> dict[str, WorkerGroup]:
    groups = {}
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]  # what Ray advertises (CPU rounded up), unless rayStartParams say
        assert not {"num-cpus", "num-gpus"} & group["rayStartParams"].keys()
        groups[group["groupName"]] = WorkerGroup(math.ceil(_quantity(limits["cpu"])),
                                                 int(limits.get("nvidia.com/gpu", 0)), group["maxReplicas"])
    return groups


def cluster_groups() -> dict[str, dict[str, WorkerGroup]]:
    """Every cluster file's worker types, by name."""
    groups = {name: _launcher_groups(name) for name in LAUNCHERS}
    groups.update({name: _kuberay_groups(_ray_cluster_spec(name)) for name in KUBERAY})
    return groups


def workers_hosted(group: WorkerGroup, cfg: RayConfig, one_node: bool = False) -> int:
    """How many Ray Train workers (each cfg.cpus_per_worker CPUs, and one GPU with use_gpu) fit at full scale,
    on one node of the group or on all of them."""
    per_node = math.floor(group.cpus / cfg.cpus_per_worker + 1e-9) if cfg.cpus_per_worker > 0 else 10**6
    if cfg.use_gpu:
        per_node = min(per_node, group.gpus)
    return per_node * (1 if one_node else group.max_nodes)


def needs_one_node(cfg: Config) -> bool:
    """GPU image runs shard the UNet's training state with DeepSpeed ZeRO: all ranks on one NVLink node."""
    return cfg.domain == "image" and cfg.ray.use_gpu


def documented_node_types() -> dict[str, str]:
    """docs/cluster.md's table: preset file name -> node type."""
    rows = re.findall(r"^\|\s*`configs/([\w.-]+\.yaml)`\s*\|\s*`(\w+)`", DOCS.read_text(), flags=re.M)
    return dict(rows)


def test_docs_give_every_preset_a_node_type() -> None:
    documented = documented_node_types()
    assert sorted(documented) == PRESETS, "docs/cluster.md's preset table and configs/*.yaml differ"
    assert set(documented.values()) <= set(NODE_TYPES)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_fits_the_node_type_it_is_documented_for(preset: str) -> None:
    node_type = documented_node_types().get(preset)
    assert node_type, f"docs/cluster.md does not say which node type runs configs/{preset}"
    cfg = load_config(ROOT / "configs" / preset, [])
    r, one_node = cfg.ray, needs_one_node(cfg)
    footprint = f"{r.num_workers} x ({r.cpus_per_worker:g} CPU{' + 1 GPU' if r.use_gpu else ''})"
    for cluster_name, groups in cluster_groups().items():
        assert node_type in groups, f"{cluster_name} has no node type {node_type!r} (docs/cluster.md, {preset})"
        group = groups[node_type]
        size = f"{group.cpus:g} CPU, {group.gpus} GPU"
        where = (f"one {node_type!r} node of {cluster_name} ({size})" if one_node else
                 f"{group.max_nodes} {node_type!r} node(s) of {cluster_name} ({size} each)")
        if not r.use_gpu:
            assert group.gpus == 0, f"configs/{preset} needs no GPU but is documented on {where}"
        hosted = workers_hosted(group, r, one_node)
        assert hosted >= r.num_workers, (f"configs/{preset}: its Ray Train footprint {footprint} does not fit {where}: "
                                         f"room for {hosted} worker(s)")
        if cfg.domain == "image":  # the Ray Data actor pool of the offline stage: one GPU (or a worker's CPUs) each
            actors = RayConfig(num_workers=cfg.image.embed_actors, cpus_per_worker=r.cpus_per_worker,
                               use_gpu=r.use_gpu)
            assert workers_hosted(group, actors, one_node) >= actors.num_workers, \
                f"configs/{preset}: image.embed_actors={actors.num_workers} do not fit {where}"


def test_the_fit_check_has_teeth() -> None:
    sd = load_config(ROOT / "configs" / "sd15_aesthetic_braid.yaml", []).ray
    groups = _launcher_groups("aws.yaml")
    assert workers_hosted(groups["gpu8"], sd, one_node=True) == sd.num_workers == 8
    assert workers_hosted(groups["gpu"], sd, one_node=True) == 1, "1-GPU nodes cannot hold the ZeRO group"
    assert workers_hosted(WorkerGroup(96, 7, 1), sd, one_node=True) < sd.num_workers
    assert workers_hosted(WorkerGroup(31, 8, 1), sd, one_node=True) < sd.num_workers


def test_every_cluster_can_host_the_jobs_workers() -> None:
    cfg = _job_config().ray
    assert cfg.use_gpu and cfg.num_workers >= 2, "the cluster job is data-parallel on GPUs"
    assert cfg.autoscaling, "worker pods start at 0: the job leaves resource checks to the autoscaler"
    groups = {name: g["gpu"] for name, g in cluster_groups().items()}
    for name in KUBERAY:
        spec = _ray_cluster_spec(name)
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        env = [e["name"] for _, pod, _ in _ray_pods(spec) for c in pod["spec"]["containers"] for e in c.get("env", [])]
        assert not [e for e in env if e.startswith("BRAID_")], "settings come from the job's config"
        assert "ray.autoscaling=true" in (CLUSTER / "kuberay" / name).read_text()
    for name, group in groups.items():
        assert group.gpus >= 1, name
        assert workers_hosted(group, cfg) >= cfg.num_workers, f"{name}: {group} cannot host {cfg}"
    # ...and not trivially: one worker fewer CPU per node, or one node fewer, would not do.
    tight = groups["aws.yaml"]
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
# Docs: docs/cluster.md and README's commands use these files and the same job config


def test_docs_name_every_value_to_fill_in_and_what_was_not_run() -> None:
    text = DOCS.read_text()
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    placeholders = {m for p in files for m in PLACEHOLDER.findall(p.read_text())}
    expected = {"YOUR-BUCKET", "YOUR-AMI-ID", "YOUR-ACCOUNT-ID", "YOUR-SECURITY-GROUP-ID", "YOUR-PROJECT-ID"}
    assert expected <= placeholders
    assert sorted(p for p in placeholders if p not in text) == [], "docs/cluster.md must say what to fill in"
    assert "None of these files has been run against a real cloud or Kubernetes cluster" in text
    assert 60 <= len(text.splitlines()) <= 130
    commands = _commands(text)
    assert any(c.startswith("ray up -y cluster/aws.yaml") for c in commands)
    assert any(c.startswith("kubectl apply -f cluster/kuberay/security.yaml") for c in commands)
    submits = [c for c in commands if c.startswith("ray job submit")]
    assert submits and all("--runtime-env cluster/runtime_env.yaml -- python launch/finetune.py --config configs/"
                           in c for c in submits)
    mentioned = {m for m in re.findall(r"(cluster/[\w./-]+\.(?:yaml|json|sh))", text)}
    assert all((ROOT / m).is_file() for m in mentioned), mentioned


def _cluster_doc() -> str:
    return (ROOT / "docs" / "cluster.md").read_text()


def _commands(section: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_documented_commands_use_the_cluster_files_and_the_job_config() -> None:
    commands = _commands(_cluster_doc())
    job_args = shlex.split(_yaml(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]["entrypoint"])
    ray_overrides = [a for a in job_args if a.startswith("ray.")]
    submits = [c for c in commands if c.startswith("ray job submit")]
    assert submits
    for command in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in command
        assert "-- python launch/finetune.py" in command
        assert "ray.autoscaling=true" in command.split(), f"every cluster of cluster/ autoscales from 0: {command}"
        if "configs/tfbind8.yaml" in command:  # the job the RayJob runs: the same Ray Train footprint
            assert all(o in command.split() for o in ray_overrides), command
    mentioned = {m for c in commands for m in re.findall(r"(cluster/[\w./-]+\.yaml)", c)}
    assert {"cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/rayjob.yaml",
            "cluster/kuberay/raycluster.yaml", "cluster/runtime_env.yaml"} <= mentioned
    assert all((ROOT / m).is_file() for m in mentioned)
    assert any(c.startswith("ray up") for c in commands) and any(c.startswith("kubectl apply -f") for c in commands)
