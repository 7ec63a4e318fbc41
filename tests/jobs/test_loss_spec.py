"""Loss options in the job spec: what the chosen objective would not use fails at validation,
before Ray starts, with a message naming the option (algorithm.* and KTO's batch rules)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from vlrlhf.config import AlgorithmSpec, JobSpec, SpecError, load_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]


def spec_file(tmp_path, algorithm: dict, **sections) -> pathlib.Path:
    data = {"model": {"path": str(tmp_path / "model")},  # validation only: nothing is loaded
            "data": {"format": "kto" if algorithm["name"] == "kto" else "plain_dpo",
                     "train": str(ROOT / "data/shapes/preference.json")},
            "algorithm": algorithm, **sections}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("algorithm, message", [
    ({"loss_type": "hinge", "label_smoothing": 0.1},
     "algorithm.label_smoothing=0.1 is not used by loss_type hinge; it applies to sigmoid, robust"),
    ({"loss_type": ["ipo", "nca_pair"], "label_smoothing": 0.2}, "label_smoothing=0.2 is not used by loss_type ipo"),
    ({"loss_type": "sigmoid", "gamma": 1.0}, "algorithm.gamma=1.0 (SimPO's target margin) is not used by loss_type "
                                             "sigmoid; it applies to simpo"),
    ({"loss_type": "exo_pair"}, "algorithm.label_smoothing=0.0 must lie in (0, 1) for loss_type 'exo_pair'"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "must be < 0.5 for loss_type 'robust'"),
    ({"loss_type": {"sigmoid": 1.0, "bco_pair": 0.2}, "mdpo": {"image_weight": 1.0}},
     "algorithm.mdpo does not combine with the batch-level loss_type 'bco_pair'"),
])
def test_dpo_options_the_loss_types_do_not_use_fail_at_validation(tmp_path, algorithm, message):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file(tmp_path, {"name": "dpo", **algorithm}))
    assert message in str(info.value)


@pytest.mark.parametrize("name, option, message", [
    ("kto", {"label_smoothing": 0.1}, "algorithm.label_smoothing is an option of algorithm.name=dpo, not kto"),
    ("kto", {"loss_type": "ipo"}, "algorithm.loss_type is an option of algorithm.name=dpo, not kto"),
    ("sft", {"gamma": 2.0}, "algorithm.gamma is an option of algorithm.name=dpo, not sft"),
    ("dpo", {"desirable_weight": 1.5}, "algorithm.desirable_weight is an option of algorithm.name=kto, not dpo"),
    ("reward", {"undesirable_weight": 2.0}, "algorithm.undesirable_weight is an option of algorithm.name=kto"),
])
def test_options_of_another_objective_are_refused(name, option, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmSpec(name=name, **option)


def test_options_the_types_use_are_accepted():
    AlgorithmSpec(name="dpo", loss_type="cpo", label_smoothing=0.1)  # cDPO smoothing, as TRL's CPOTrainer
    AlgorithmSpec(name="dpo", loss_type="simpo", gamma=1.0, label_smoothing=0.1)
    AlgorithmSpec(name="dpo", loss_type={"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, label_smoothing=0.1)
    AlgorithmSpec(name="kto", desirable_weight=1.33)


def test_aot_pair_is_stored_as_aot_unpaired_with_a_warning():
    for given, stored in (("aot_pair", "aot_unpaired"), (["aot_pair", "sft"], ["aot_unpaired", "sft"]),
                          ({"aot_pair": 0.5}, {"aot_unpaired": 0.5})):
        with pytest.warns(FutureWarning, match="'aot_pair' is deprecated"):
            assert AlgorithmSpec(name="dpo", loss_type=given).loss_type == stored


@pytest.mark.parametrize("batch_size, micro_batch_size, workers", [(8, 1, 1), (7, 2, 1), (2, 1, 2), (8, 3, 2)])
def test_kto_takes_any_micro_batch_size(tmp_path, batch_size, micro_batch_size, workers):
    """KTO's reference point is a mean over the whole step, so micro-batches of 1 (or an
    uneven last one) are fine; configs/demo_kto.yaml with 8/1 and 7/2 validates."""
    overrides = [f"trainer.batch_size={batch_size}", f"trainer.micro_batch_size={micro_batch_size}",
                 f"resources.policy.num_workers={workers}"]
    spec = load_spec(ROOT / "configs" / "demo_kto.yaml", overrides)
    assert spec.trainer.micro_batch_size == micro_batch_size
    assert JobSpec.model_validate(spec.model_dump()).algorithm.name == "kto"  # a dumped spec loads back
    with pytest.raises(SpecError, match="kto needs trainer.batch_size >= 2"):
        load_spec(spec_file(tmp_path, {"name": "kto"}), ["trainer.batch_size=1"])
