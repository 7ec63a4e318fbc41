"""Placement waits as long as the spec says and says what it waits for; collectives time out."""

from __future__ import annotations

import time

import pytest

from actors.group import ActorGroup, PlacementTimeout, WorkerBase, cluster_settings
from vlrlhf.config import GroupSpec, TrainerSpec


class Idle(WorkerBase):
    def lonely_all_reduce(self) -> None:
        """An all-reduce that only this rank joins: its peer is gone."""
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))


def test_placement_reports_what_it_waits_for_and_gives_up(ray_cluster, capfd):
    trainer = TrainerSpec(placement_timeout_s=3, placement_report_s=1)
    started = time.monotonic()
    with cluster_settings(trainer), pytest.raises(PlacementTimeout, match="placement_timeout_s=3"):
        ActorGroup(Idle, GroupSpec(num_workers=2, cpus=0.5, gpus=4), name="policy")
    assert time.monotonic() - started < 30
    out = capfd.readouterr().out
    assert "resources.policy: waiting" in out and "2 bundle(s) of {CPU: 0.5, GPU: 4} (PACK)" in out
    assert "short of GPU 8 (free 0 of 0)" in out
    pending = [t for t in ray_cluster.util.placement_group_table().values()
               if t["name"] == "vlrlhf-policy" and t["state"] != "REMOVED"]
    assert not pending  # a pending group would grab the resources later


def test_a_lost_peer_fails_a_collective_after_the_timeout(ray_cluster):
    with cluster_settings(TrainerSpec(collective_timeout_s=3)):
        group = ActorGroup(Idle, GroupSpec(num_workers=2, cpus=0.25), name="lonely")
    try:
        started = time.monotonic()
        with pytest.raises(Exception, match="(?i)timed? ?out"):
            group.get([group.call(0, "lonely_all_reduce")])  # rank 1 never joins
        assert time.monotonic() - started < 60
    finally:
        group.shutdown()
