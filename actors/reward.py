"""The reward role: a reward model (a VLM with a scalar head) scoring completions.

    group = ActorGroup(RewardModelWorker, spec.resources.reward, name="reward", args=(path,))
    scores = group.get(group.broadcast("score", items))[0]   # one float per item

An item is the prompt chat, its images and a completion's text. The worker encodes
them with its own adapter, so a reward model of another family (or tokenizer) than
the policy works; the score is read at the last non-pad token (vlrlhf.models.value_head).
Online jobs call `score_rows` with the step's prompts by reference: the worker fetches
their records and loads their images itself. Rule-based rewards (exact match, numeric,
format...) are plain functions run by the driver on the completions' text and the
prompts' answers (vlrlhf.rewards); this role is for models.
"""

from __future__ import annotations

import math

import torch

from actors.group import WorkerBase
from actors.common import device
from vlrlhf.models.base import LoadOptions
from vlrlhf.models.value_head import has_head, last_token_scores, load_head


class RewardModelWorker(WorkerBase):
    def __init__(self, path: str, dtype: str = "float32", micro_batch_size: int = 8, trust_remote_code: bool = False):
        if not has_head(path):
            raise FileNotFoundError(f"reward model {path}: no value_head.safetensors; train one with "
                                    "algorithm.name=reward")
        from actors.generator import load_for_inference

        self.device = device()  # a full checkpoint, or LoRA adapters (algorithm.name=reward with model.lora) merged
        self.adapter, self.model = load_for_inference(path, options=LoadOptions(dtype=dtype,
                                                                                trust_remote_code=trust_remote_code))
        self.model = self.model.to(self.device)
        self.head = load_head(path).to(self.device).eval()
        self.micro_batch_size = micro_batch_size
        self.path = path

    def score_rows(self, share, settings) -> list[float]:
        """Scores of the rows of a RowsShare (vlrlhf.rows): each row's prompt chat and images (loaded
        here, from the sources in its record: `settings` gives image_root and max_pixels) and its
        completion's text. The reward model's own processor encodes them (it may be another family)."""
        from vlrlhf.data.images import load_image
        from vlrlhf.rows import step_prompts

        records = [item.record for item in step_prompts(share.prompts)]
        loaded = {}
        for row in share.rows:
            if row.request not in loaded:
                loaded[row.request] = [load_image(source, image_root=settings.image_root,
                                                  max_pixels=settings.max_pixels)
                                       for source in records[row.request].images]
        return self.score([{"messages": [m.model_dump() for m in records[row.request].prompt],
                            "images": loaded[row.request], "completion": row.text} for row in share.rows],
                          keys=[row.request for row in share.rows])

    @torch.no_grad()
    def score(self, items: list[dict], keys: list | None = None) -> list[float]:
        """items: {"messages": prompt chat, "images": [...], "completion": text} -> scores. `keys`:
        items with the same key share their prompt and images (a GRPO group): their micro-batch
        runs them as one packed row (the group forward), where the family packs."""
        from vlrlhf.models.groups import groups_of

        examples = []
        for index, item in enumerate(items):
            messages = list(item["messages"]) + [{"role": "assistant", "content": item["completion"]}]
            examples.append(self.adapter.encode(messages, item.get("images") or [], record=f"reward item {index}"))
        keys = list(range(len(items))) if keys is None else keys
        order = [i for group in groups_of(keys) for i in group]  # a group's items side by side
        scores: list = [None] * len(items)
        for start in range(0, len(order), self.micro_batch_size):
            chunk = order[start:start + self.micro_batch_size]
            batch = self.adapter.collate([examples[i] for i in chunk]).to(self.device)
            groups = groups_of([keys[i] for i in chunk])
            representatives = None
            if len(groups) < len(chunk):
                representatives = self.adapter.collate([examples[chunk[g[0]]] for g in groups]).to(self.device)
            values = last_token_scores(self.adapter, self.model, self.head, batch, groups, representatives).tolist()
            for index, value in zip(chunk, values, strict=True):
                scores[index] = value
        bad = [i for i, value in enumerate(scores) if not math.isfinite(value)]
        if bad:
            raise ValueError(f"reward model {self.path}: non-finite score for item(s) {bad[:5]}")
        return scores
