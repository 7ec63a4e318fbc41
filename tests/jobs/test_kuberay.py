"""configs/kuberay manifests validate against the KubeRay CRD schemas (shared/kuberay), and
what they run is planned against the cluster they create."""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay"
KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
RAY_MANIFESTS = sorted(p for p in (ROOT / "configs" / "kuberay").glob("*.yaml")
                       if next(yaml.safe_load_all(p.read_text()))["apiVersion"].startswith("ray.io/"))
needs_crds = pytest.mark.skipif(not CRDS.is_dir(), reason="the KubeRay CRDs live in ../shared/kuberay")


def schema_for(kind: str, version: str) -> dict:
    crd = yaml.safe_load((CRDS / KINDS[kind]).read_text())
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)


def pods(manifest: dict) -> list[dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_there_are_manifests_for_offline_dpo_online_grpo_and_a_cluster():
    names = {p.name for p in RAY_MANIFESTS}
    assert {"rayjob-dpo.yaml", "rayjob-grpo.yaml", "raycluster.yaml"} <= names


@needs_crds
@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_crd_schema_and_runs_what_a_cluster_needs(path):
    import jsonschema

    manifest = yaml.safe_load(path.read_text())
    group, version = manifest["apiVersion"].split("/")
    jsonschema.validate(manifest, schema_for(manifest["kind"], version))
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec["authOptions"]["mode"] == "token"  # auth stays on
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the driver only on the head
    for pod in pods(manifest):
        container = pod["containers"][0]
        assert container["image"].endswith("-gpu")
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/shared", "/data", "/models"}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"vlrlhf-shared", "vlrlhf-data", "vlrlhf-models"}
        assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"vlrlhf-s3", "vlrlhf-wandb"}
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]  # Prometheus
    for worker in pods(manifest)[1:]:
        assert any(t["key"] == "nvidia.com/gpu" for t in worker["tolerations"]) and worker["nodeSelector"]
        assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


@needs_crds
@pytest.mark.parametrize("path", [p for p in RAY_MANIFESTS if p.name.startswith("rayjob")], ids=lambda p: p.name)
def test_a_rayjob_runs_a_shipped_spec_that_fits_its_cluster_and_resumes(path):
    from jobs.plan import nodes_from_manifest, plan_spec
    from vlrlhf.config import load_spec

    manifest = yaml.safe_load(path.read_text())
    command = manifest["spec"]["entrypoint"].split()
    assert command[:2] == ["vlrlhf", "run"]
    # the spec is mounted from the vlrlhf-specs ConfigMap, made from configs/ (see the header)
    spec_file = ROOT / "configs" / pathlib.Path(command[2]).name
    assert command[2].startswith("/specs/") and spec_file.is_file()
    assert f"--from-file=configs/{spec_file.name}" in path.read_text()
    overrides = [word for word in command[3:] if "=" in word and not word.startswith("--")]
    assert "checkpoint.resume=auto" in overrides and manifest["spec"]["backoffLimit"] >= 1  # a retry resumes
    assert command[command.index("--run-dir") + 1].startswith("/shared/")  # run folders outlive the head
    spec = load_spec(spec_file, overrides)
    assert spec.checkpoint.dir.startswith(("/shared/", "s3://", "gs://"))  # every node sees it
    plan = plan_spec(spec, nodes_from_manifest(manifest))
    assert plan.fits, plan.problems


def test_volumes_are_shared_by_every_node():
    claims = list(yaml.safe_load_all((ROOT / "configs" / "kuberay" / "storage.yaml").read_text()))
    assert {c["metadata"]["name"] for c in claims} == {"vlrlhf-shared", "vlrlhf-data", "vlrlhf-models"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims)


@needs_crds
def test_a_wrong_manifest_is_caught():
    import jsonschema

    manifest = yaml.safe_load((ROOT / "configs" / "kuberay" / "rayjob-dpo.yaml").read_text())
    manifest["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, schema_for(manifest["kind"], "v1"))


def quantity_bytes(text) -> float:
    """A Kubernetes quantity (16Gi, 512Mi, 8G, 8589934592) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    text = str(text)
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * units[unit]
    return float(text)


def test_quantities_parse():
    assert quantity_bytes("9Gi") == 9 * 2**30 and quantity_bytes("500M") == 5e8
    assert quantity_bytes("8589934592") == 2**33


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=lambda p: p.name)
def test_every_ray_container_has_a_memory_backed_dev_shm_that_holds_its_object_store(path):
    """Ray puts its object store in /dev/shm (a container's default is 64 MB: Ray warns and
    falls back to disk); the volume counts against the pod's memory, so the limit must hold
    it plus what the pod runs (on the head: the driver, the dashboard, GCS)."""
    manifest = yaml.safe_load(path.read_text())
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group, pod in zip(groups, pods(manifest), strict=True):
        container = pod["containers"][0]
        mount, = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        volume, = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        shm = quantity_bytes(volume["emptyDir"]["sizeLimit"])
        store = quantity_bytes(group["rayStartParams"]["object-store-memory"])
        assert store <= shm, (container["name"], store, shm)
        limit = quantity_bytes(container["resources"]["limits"]["memory"])
        assert limit - shm >= 8 * 2**30, (container["name"], "too little memory beside /dev/shm")
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
