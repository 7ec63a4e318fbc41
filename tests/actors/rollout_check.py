"""Run by test_rollout in a subprocess (vLLM stays out of the pytest process).

Engines may disagree in length when they disagree at all: comparisons zip over the
common prefix (strict=False) and the token-equality flags report the difference.

usage: python rollout_check.py MODEL_DIR [MODEL_DIR ...]
Prints one line per model: RESULT {json}, the measurements the test asserts on.
"""

import json
import sys

import torch


def circle(colour):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(image).ellipse([4, 4, 52, 52], fill=colour)
    return image


def request(colour):
    return {"messages": [{"role": "user", "content": "<image>\nWhat colour is the circle?"}],
            "images": [circle(colour)]}


def recomputed_logprobs(engine, req, token_ids):
    """Teacher-forced log-probs of `token_ids` after the prompt, by the transformers model."""
    from vlrlhf.models.batch import EncodedExample

    prompt = engine.adapter.encode_prompt(req["messages"], req["images"])
    fill = engine.adapter.completion_token_arrays
    arrays = {k: v + [fill.get(k, 0)] * len(token_ids) for k, v in prompt.token_arrays.items()}
    example = EncodedExample(prompt.input_ids + token_ids, [-100] * len(prompt.input_ids) + token_ids, arrays,
                             prompt.extras)
    batch = engine.adapter.collate([example])
    with torch.no_grad():
        logps = engine.adapter.rollout_logprobs(engine.model, batch)[0]
    return logps[len(prompt.input_ids):].tolist()


def max_gap(a, b) -> float:
    """Largest |log-prob difference| over the common prefix of paired samples."""
    return max(abs(p - q) for x, y in zip(a, b, strict=True)
               for p, q in zip(x.logprobs, y.logprobs, strict=False))


def check(model_dir):
    from actors.rollout import Sampling, TransformersEngine, VLLMEngine

    oracle = TransformersEngine(model_dir)
    vllm = VLLMEngine(model_dir, max_model_len=512)
    greedy = Sampling(n=1, temperature=0.0, max_tokens=8)
    requests = [request("red"), request("blue")]
    a, b = oracle.generate(requests, greedy), vllm.generate(requests, greedy)
    result = {"greedy_equal": [x.token_ids == y.token_ids for x, y in zip(a, b, strict=False)],
              "greedy_max_dlogp": max_gap(a, b),
              "image_changes_logprobs": a[0].logprobs != a[1].logprobs and b[0].logprobs != b[1].logprobs}
    # sampled rollouts: the engine's behaviour log-probs against the policy's recomputed ones
    sampled = vllm.generate(requests, Sampling(n=2, temperature=1.0, max_tokens=8, seed=3))
    ratios = []
    for sample in sampled:
        policy = recomputed_logprobs(oracle, requests[sample.request], sample.token_ids)
        ratios += [abs(p - q) for p, q in zip(policy, sample.logprobs, strict=False)]
    result["samples"] = len(sampled)
    result["sampled_max_dlogp"] = max(ratios)
    # weight sync: perturb the policy, push every tensor to the engine, compare greedy again
    torch.manual_seed(1)
    state = {name: p.detach() + 0.05 * torch.randn_like(p) for name, p in oracle.model.named_parameters()}
    oracle.load_weights(state)
    result["loaded"] = vllm.load_weights(state)
    for round_ in range(2):  # the second multimodal request after the sync must work too
        a, b = oracle.generate(requests, greedy), vllm.generate(requests, greedy)
        result[f"synced_equal_{round_}"] = [x.token_ids == y.token_ids for x, y in zip(a, b, strict=False)]
        result[f"synced_max_dlogp_{round_}"] = max_gap(a, b)
    return result


if __name__ == "__main__":
    for model_dir in sys.argv[1:]:
        print("RESULT " + json.dumps(check(model_dir)), flush=True)
