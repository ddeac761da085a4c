"""KubeRay manifests: what KubeRay and the project need in every pod, the RayJob's entrypoint and the
elastic worker range."""
from __future__ import annotations

import re

import pytest
import ray
import ray.autoscaler
import yaml
from support import REPO
from support.clusters import ENTRYPOINT, KUBERAY_DIR, PIPELINE_SPEC


def quantity_bytes(value) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


def pod_problems(where: str, template: dict, start_params: dict, gpus: int) -> list[str]:
    problems = []
    spec = template.get("spec", {})
    containers = spec.get("containers") or []
    if not containers or not containers[0].get("image"):
        return [f"{where}: template.spec.containers[0].image missing"]
    container = containers[0]
    if spec.get("serviceAccountName") != "dino-ray":
        problems.append(f"{where}: serviceAccountName must be dino-ray (object storage by role)")
    limits = container.get("resources", {}).get("limits", {})
    if gpus and str(limits.get("nvidia.com/gpu")) != str(gpus):
        problems.append(f"{where}: resources.limits nvidia.com/gpu must be {gpus}")
    env = {e["name"]: e for e in container.get("env", [])}
    if "secretKeyRef" not in env.get("MLFLOW_TRACKING_URI", {}).get("valueFrom", {}):
        problems.append(f"{where}: MLFLOW_TRACKING_URI must come from a Secret")
    if gpus and env.get("NCCL_SOCKET_IFNAME", {}).get("value") != "^lo,docker0":
        problems.append(f"{where}: NCCL_SOCKET_IFNAME not set")
    shm_volumes = {m["name"] for m in container.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"}
    volumes = {v["name"]: v for v in spec.get("volumes", []) if v["name"] in shm_volumes}
    if len(volumes) != 1 or list(volumes.values())[0].get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{where}: /dev/shm must be an emptyDir with medium Memory")
    else:
        shm = quantity_bytes(list(volumes.values())[0]["emptyDir"]["sizeLimit"])
        store = quantity_bytes(start_params.get("object-store-memory", "0"))
        if not 0 < store < shm:
            problems.append(f"{where}: object-store-memory must be set and below the /dev/shm sizeLimit")
    if not all(isinstance(v, str) for v in start_params.values()):
        problems.append(f"{where}: rayStartParams values must be strings")
    return problems


def kuberay_problems(doc: dict) -> list[str]:
    """What a RayCluster or RayJob manifest lacks for this project; empty when complete."""
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append("apiVersion must be ray.io/v1")
    if not doc.get("metadata", {}).get("name"):
        problems.append("metadata.name missing")
    kind = doc.get("kind")
    if kind == "RayJob":
        spec = doc.get("spec", {})
        if spec.get("entrypoint") != ENTRYPOINT:
            problems.append(f"spec.entrypoint must be {ENTRYPOINT!r}")
        cluster = spec.get("rayClusterSpec")
        if not cluster:
            return problems + ["spec.rayClusterSpec missing"]
    elif kind == "RayCluster":
        cluster = doc.get("spec", {})
    else:
        return problems + [f"kind must be RayCluster or RayJob, not {kind!r}"]
    if cluster.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion must be the pinned Ray, {ray.__version__}")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode must be token")
    head = cluster.get("headGroupSpec", {})
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec.rayStartParams missing")
    problems += pod_problems("headGroupSpec", head.get("template", {}), head.get("rayStartParams") or {}, gpus=0)
    groups = cluster.get("workerGroupSpecs") or []
    if not groups:
        problems.append("workerGroupSpecs missing")
    for i, group in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "template"):
            if key not in group:
                problems.append(f"{where}.{key} missing")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if all(isinstance(c, int) for c in counts) and not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{where}: need minReplicas <= replicas <= maxReplicas")
        problems += pod_problems(where, group.get("template", {}), group.get("rayStartParams") or {}, gpus=8)
    return problems


def test_rayjob_worker_group_spans_the_pipelines_elastic_training_range(monkeypatch):
    from dino_platform.pipeline import load_spec
    from dino_platform.pipeline.stages.train import train_config

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # the RayJob's secret, on a cluster
    spec = load_spec(REPO / PIPELINE_SPEC)
    scalings = [train_config(spec, name).scaling for name, stage in spec.stages.items() if stage.kind == "train"]
    elastic = [s for s in scalings if s.elastic]
    assert elastic, "the headline job trains elastically"
    low, high = min(s.min_workers for s in elastic), max(s.max_workers for s in elastic)
    assert all(s.max_workers <= low for s in scalings if not s.elastic)  # fixed stages fit the smallest group
    doc = yaml.safe_load((KUBERAY_DIR / "rayjob.yaml").read_text())
    [group] = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    [container] = group["template"]["spec"]["containers"]
    gpus_per_pod = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert group["minReplicas"] * gpus_per_pod == low  # the smallest group the job keeps training with
    assert group["maxReplicas"] * gpus_per_pod == high  # the largest it grows back to


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifest_has_what_kuberay_and_the_project_need(name):
    doc = yaml.safe_load((KUBERAY_DIR / f"{name}.yaml").read_text())
    assert kuberay_problems(doc) == []


def _drop_gpu_limit(cluster):
    del cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def _drop_group_name(cluster):
    del cluster["workerGroupSpecs"][0]["groupName"]


def _shm_on_disk(cluster):
    cluster["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"].pop("medium")


def _literal_tracking_uri(cluster):
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "MLFLOW_TRACKING_URI", "value": "https://mlflow.example.com"}
    ]


def _no_image(cluster):
    del cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("mutate", [_drop_gpu_limit, _drop_group_name, _shm_on_disk, _literal_tracking_uri, _no_image])
def test_a_broken_kuberay_manifest_is_reported(mutate):
    doc = yaml.safe_load((KUBERAY_DIR / "rayjob.yaml").read_text())
    mutate(doc["spec"]["rayClusterSpec"])
    assert kuberay_problems(doc)


def test_rayjob_without_cluster_or_with_another_entrypoint_is_reported():
    doc = yaml.safe_load((KUBERAY_DIR / "rayjob.yaml").read_text())
    doc["spec"]["entrypoint"] = "python pipelines/other.py"
    del doc["spec"]["rayClusterSpec"]
    assert len(kuberay_problems(doc)) == 2


def test_service_account_is_bound_to_cloud_roles():
    doc = yaml.safe_load((KUBERAY_DIR / "serviceaccount.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"], doc["metadata"]["name"]) == ("v1", "ServiceAccount", "dino-ray")
    annotations = doc["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"].endswith(":role/dino-ray-worker")
    assert annotations["iam.gke.io/gcp-service-account"].startswith("dino-ray-worker@")
