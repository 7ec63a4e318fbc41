"""Run by test_vllm_layout in a subprocess: greedy tokens of a tiny checkpoint under vLLM.

usage: python vllm_greedy.py MODEL_DIR PROMPT_JSON COLOUR MAX_TOKENS
Prints one JSON line: the generated token ids.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __name__ == "__main__":
    from PIL import Image, ImageDraw
    from vllm import LLM, SamplingParams

    model_dir, prompt, colour, max_tokens = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    image = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(image).ellipse([4, 4, 52, 52], fill=colour)
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    # Text prompt with unexpanded placeholders: vLLM runs the processor itself.
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                       SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
    print("TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)))
