"""Colocated roles share the policy's bundles; a spec that cannot colocate is refused."""

from __future__ import annotations

import pytest

from actors.group import ActorGroup, WorkerBase
from vlrlhf.config import GroupSpec


def test_a_colocated_group_joins_the_owners_bundles(ray_cluster):
    import ray

    policy = ActorGroup(WorkerBase, GroupSpec(num_workers=2, cpus=0.25), name="owner", reserve={"CPU": 0.25})
    free_before = ray.available_resources().get("CPU", 0.0)
    reference = ActorGroup(WorkerBase, GroupSpec(num_workers=2, cpus=0.25, colocate="policy"), name="guest",
                           share=policy)
    try:
        owners = policy.get(policy.broadcast("placement"))
        guests = reference.get(reference.broadcast("placement"))
        pg = policy.placement_group.id.hex()
        assert all(w["placement_group"] == pg and w["resources"] == {"CPU": 0.25} for w in owners + guests)
        (table,) = [t for t in ray.util.placement_group_table().values() if t["placement_group_id"] == pg]
        assert all(bundle == {"CPU": 0.5} for bundle in table["bundles"].values())  # room for both roles
        # the guests live on the reserved bundles: the cluster's free CPUs did not shrink
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(free_before)
    finally:
        reference.shutdown()
        policy.shutdown()
    with pytest.raises(ValueError, match="colocating needs 3 worker"):
        owner = ActorGroup(WorkerBase, GroupSpec(num_workers=1, cpus=0.25), name="small")
        try:
            ActorGroup(WorkerBase, GroupSpec(num_workers=3, cpus=0.1, colocate="policy"), name="big", share=owner)
        finally:
            owner.shutdown()


def test_colocation_spec_checks():
    from vlrlhf.config import SpecError, load_spec
    import pathlib

    spec = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo_dpo.yaml"
    loaded = load_spec(spec, ["resources.reference={num_workers: 1, cpus: 0.5, colocate: policy}"])
    assert loaded.resources.reference.colocate == "policy"
    with pytest.raises(SpecError, match="colocate=policy needs num_workers equal"):
        load_spec(spec, ["resources.rollout={num_workers: 0, colocate: policy}"])
    with pytest.raises(SpecError, match="policy owns the bundles"):
        load_spec(spec, ["resources.policy.colocate=policy"])
