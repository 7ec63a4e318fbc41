"""Run by test_episodes in a subprocess (vLLM stays out of the pytest process): multi-turn
episodes with the zoom tool, greedy, on the vLLM engine and on the transformers engine.

usage: python episodes_check.py MODEL_DIR DATA_DIR
Prints RESULT {json}: per episode whether the engines' tokens agree, the largest log-prob
difference over the common tokens, and the episodes' turns and successful tool calls.
"""

import json
import pathlib
import sys


def main(model: str, data: str) -> dict:
    from actors.episodes import Episodes, run_episodes
    from actors.rollout import Sampling, TransformersEngine, VLLMEngine
    from vlrlhf.data.images import load_image
    from vlrlhf.tools import zoom

    rows = [json.loads(line) for line in (pathlib.Path(data) / "agent.jsonl").read_text().splitlines()][:3]
    requests = [{"messages": [{"role": "user", "content": row["prompt"]}],
                 "images": [load_image(row["images"][0], image_root=data)]} for row in rows]
    sampling = Sampling(n=1, temperature=0, max_tokens=96, seed=0)
    episodes = Episodes({"zoom": zoom}, max_turns=2, timeout_s=30)
    reference = run_episodes(TransformersEngine(model), requests, sampling, episodes)
    served = run_episodes(VLLMEngine(model, max_model_len=1024), requests, sampling, episodes)
    result = {"equal": [], "max_dlogp": 0.0, "turns": [], "tool_ok": [], "masks_equal": []}
    for ours, theirs in zip(served, reference, strict=True):
        result["equal"].append(ours.token_ids == theirs.token_ids)
        result["masks_equal"].append(ours.mask == theirs.mask)
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=False):
            result["max_dlogp"] = max(result["max_dlogp"], abs(a - b))
        result["turns"].append(ours.turns)
        result["tool_ok"].append(ours.tool_calls - ours.tool_errors)
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
