"""The judge role: a VLM checkpoint, served by its own actor group, grades completions.

    online:
      judge: {path: /ckpt/Qwen2.5-VL-7B-Instruct, engine: vllm, scoring: generate, weight: 1.0}
    resources:
      judge: {num_workers: 1, gpus: 1}

Each row (a completion of one of the step's prompts) becomes one user turn: the prompt's
images, then the rubric filled with the question, the reference answer and the completion
(the same request the HTTP judge sends, vlrlhf.rewards.judge). The worker fetches the
step's prompts by reference and loads their images itself, like the reward model.

Two ways to read a score:
- `generate`: a greedy reply of up to max_tokens, read for 'Score: N' (else the last number
  in [min_score, max_score]); a reply without one is a failure (the fallback score, counted).
  Either engine (transformers, vllm).
- `expected`: the reply is started with "Score:" and the score is the probability-weighted
  mean of the integer scores' tokens at the next position (G-Eval's form): one forward per
  request, a continuous value, never unparseable. Every score min..max must be one token
  after "Score:" in the judge's tokenizer (most split numbers above 9 in two: use 0..9 or 1..5).
Scores are scaled to [0, 1] as the HTTP judge's are.
"""

from __future__ import annotations

import torch

from actors.generator import user_turn
from actors.group import WorkerBase
from actors.rollout import Sampling, make_engine, with_completion
from vlrlhf.rewards.judge import judge_inputs, parse_score

PREFIX = "Score:"


def score_tokens(tokenizer, low: int, high: int) -> tuple[list[int], list[int]]:
    """(the ids of "Score:", the id of each score low..high after it). Raises when a score is
    not a single token there, or two share one."""
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    ids, bad = [], []
    for value in range(low, high + 1):
        full = tokenizer.encode(f"{PREFIX} {value}", add_special_tokens=False)
        if full[:len(prefix)] != prefix or len(full) != len(prefix) + 1:
            bad.append(value)
        else:
            ids.append(full[-1])
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"online.judge.scoring=expected: score(s) {bad or 'ids'} are not one distinct token each "
                         f"after {PREFIX!r} in this tokenizer; narrow min_score..max_score (e.g. 0..9) or use "
                         "scoring=generate")
    return prefix, ids


class JudgeWorker(WorkerBase):
    def __init__(self, spec: dict, dtype: str = "float32", trust_remote_code: bool = False):
        self.spec = spec
        options = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if spec["engine"] == "vllm":
            options |= {"max_model_len": spec["max_model_len"], "sleep_mode": False, "tensor_parallel_size": 1,
                        "gpu_memory_utilization": spec["gpu_memory_utilization"]}
        self.engine = make_engine(spec["engine"], spec["path"], **options)
        self.low, self.high = spec["min_score"], spec["max_score"]
        if spec["scoring"] == "expected":
            self.prefix, self.candidates = score_tokens(self.engine.adapter.tokenizer, int(self.low), int(self.high))

    def judge_rows(self, share, settings) -> list[float | None]:
        """Scores in [0, 1] (None: no score in the reply) of a RowsShare's rows."""
        requests = [{"messages": user_turn(text, len(images)), "images": images}
                    for images, text in judge_inputs(share, settings, self.spec)]
        if not requests:
            return []
        if self.spec["scoring"] == "expected":
            return self.expected(requests)
        samples = self.engine.generate(requests, Sampling(n=1, temperature=0.0, max_tokens=self.spec["max_tokens"]))
        return [parse_score(sample.text, self.low, self.high) for sample in samples]

    @torch.no_grad()
    def expected(self, requests: list[dict]) -> list[float]:
        """sum_s p(s) * s / sum_s p(s) over the score tokens after "Score:", scaled to [0, 1]."""
        engine, size = self.engine, self.spec["micro_batch_size"]
        adapter, values = engine.adapter, torch.arange(int(self.low), int(self.high) + 1, dtype=torch.float64)
        out = []
        for start in range(0, len(requests), size):
            prompts = [with_completion(p, self.prefix) for p in engine.encode(requests[start:start + size])]
            batch = adapter.collate(prompts, padding_side="left").to(engine.device)
            logits = engine.model(**adapter.model_inputs(batch)).logits[:, -1].double()
            probs = torch.softmax(logits[:, self.candidates], dim=-1).cpu()
            mean = probs @ values
            out += ((mean - self.low) / (self.high - self.low)).tolist()
        return out
