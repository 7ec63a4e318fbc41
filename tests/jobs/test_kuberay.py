"""configs/kuberay manifests validate against the KubeRay CRD schemas (shared/kuberay)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay"
KINDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
MANIFESTS = sorted((ROOT / "configs" / "kuberay").glob("*.yaml"))


def schema_for(kind: str, version: str) -> dict:
    crd = yaml.safe_load((CRDS / KINDS[kind]).read_text())
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)


@pytest.mark.skipif(not CRDS.is_dir(), reason="the KubeRay CRDs live in ../shared/kuberay beside the checkout")
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_crd_schema(path):
    import jsonschema

    manifest = yaml.safe_load(path.read_text())
    group, version = manifest["apiVersion"].split("/")
    assert group == "ray.io"
    jsonschema.validate(manifest, schema_for(manifest["kind"], version))
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec["authOptions"]["mode"] == "token"  # auth stays on
    if manifest["kind"] == "RayJob":
        entry = manifest["spec"]["entrypoint"]
        spec_file = entry.split("vlrlhf run ")[1].split()[0]
        assert (ROOT / spec_file).is_file()  # the entrypoint runs a spec that ships


@pytest.mark.skipif(not CRDS.is_dir(), reason="the KubeRay CRDs live in ../shared/kuberay beside the checkout")
def test_a_wrong_manifest_is_caught():
    import jsonschema

    manifest = yaml.safe_load((ROOT / "configs" / "kuberay" / "rayjob-dpo.yaml").read_text())
    manifest["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, schema_for(manifest["kind"], "v1"))
