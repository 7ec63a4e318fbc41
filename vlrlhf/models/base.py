"""The model adapter: everything that differs between VLM families lives behind it.

A conversation is a list of messages `{"role": "system"|"user"|"assistant",
"content": str}` whose text carries one `<image>` placeholder per image, plus the
list of images in placeholder order. An adapter turns it into token ids and labels
(assistant tokens only), collates encoded examples into a `ModelBatch`, and
computes per-token log-probs. Jobs and actors never branch on the model type.

Encoding renders the chat template once per assistant turn boundary and lets the
processor expand image placeholders, so the expansion is always the model's own.
The label span of assistant turn i is [len(tokens(prefix_i)), len(tokens(through_i)))
where prefix_i is the rendering of the turns before it with the generation prompt
and through_i the rendering up to and including it; token prefixes are verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Any, ClassVar

import torch

from vlrlhf.data.records import IMAGE_PLACEHOLDER  # noqa: F401 - defined with the records, light to import
from vlrlhf.errors import ReasonError
from vlrlhf.models.batch import EncodedExample, ModelBatch, collate_examples
from vlrlhf.models.groups import pack_groups
from vlrlhf.models.logprobs import chunked_token_logprobs
from vlrlhf.models.pairs import PairStates, additive_mask, identity_index, pack_pairs

IGNORE_INDEX = -100


class EncodeError(ReasonError):
    """A record that cannot be encoded (too long, image count mismatch, ...)."""


@dataclasses.dataclass
class LoadOptions:
    """How to load a checkpoint (the `model` section of a job spec maps onto this)."""

    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    trust_remote_code: bool = False
    # keyword arguments for the processor's from_pretrained: image resolution per family,
    # e.g. Qwen2/2.5-VL {"min_pixels": .., "max_pixels": ..} (images are resized into that range)
    processor: tuple[tuple[str, object], ...] = ()
    packing: bool = True  # False: pairs and groups run as separate rows even where the family packs


def split_placeholders(text: str) -> list[dict[str, str]]:
    """'<image>\\nWhat?' -> [{'type': 'image'}, {'type': 'text', 'text': '\\nWhat?'}]."""
    parts: list[dict[str, str]] = []
    for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index > 0:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def count_placeholders(messages: list[dict]) -> int:
    return sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)


def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


PLACEHOLDER_KEYS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id")


class Adapter:
    """Base adapter for families whose processor has a chat template.

    Subclasses set `model_types` (values of `config.model_type` they serve) and the
    class flags below, and override the hooks where their family differs.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    supports_multi_image: ClassVar[bool] = True
    # Why vLLM rollouts are refused for this family (its engine does not follow a weight
    # sync), or None; actors.rollout checks it before starting an engine.
    vllm_sync_broken: ClassVar[str | None] = None
    supports_text_only: ClassVar[bool] = True
    # False where only the last assistant turn can carry labels (template-less families).
    scores_every_turn: ClassVar[bool] = True
    # Collation rule per model extra (see batch.collate_examples).
    extra_rules: ClassVar[dict[str, str]] = {"pixel_values": "concat"}
    # Per-token arrays returned by the processor, padded like input_ids.
    token_arrays: ClassVar[tuple[str, ...]] = ()
    # The preference forward (pair_states): "packed" runs a pair's images and prompt once
    # (models/pairs.py; the family's forward must honour a 4D mask and position_ids),
    # "separate" scores chosen and rejected as two batches. Built-in families pack; an
    # adapter of your own opts in once tests/models/test_pair_forward.py passes for it.
    pair_forward: ClassVar[str] = "separate"
    # The value a sampled completion's tokens take in each of token_arrays (default 0):
    # PaliGemma's token_type_ids mark the causal suffix with 1.
    completion_token_arrays: ClassVar[dict[str, int]] = {}
    # True where the image processor rescales and normalises last (after resizing and
    # cropping): encoded pixels then stay uint8 and model_inputs applies the processor's
    # own rescale_and_normalize, so the model gets the same floats from a quarter of the
    # bytes in the object store, the driver and the host-to-device copy.
    raw_pixels: ClassVar[bool] = False
    # The transformers rollout engine prefills a prompt once for its n samples and repeats the
    # KV cache (actors.group_prefill); False where greedy tokens then differ from n prefills.
    shared_prefill: ClassVar[bool] = True

    def __init__(self, processor, config=None, path: str | None = None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = config
        self.path = path
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no pad token; set one in tokenizer_config.json")
        images = getattr(processor, "image_processor", None)
        self.pixel_normaliser = images if (
            self.raw_pixels and callable(getattr(images, "rescale_and_normalize", None))
            and (getattr(images, "do_rescale", False) or getattr(images, "do_normalize", False))) else None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, options: LoadOptions | None = None) -> Adapter:
        from transformers import AutoConfig

        options = options or LoadOptions()
        config = AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        adapter = cls(cls.load_processor(path, options), config=config, path=str(path))
        if not options.packing:
            adapter.pair_forward = "separate"
        return adapter

    @classmethod
    def load_processor(cls, path, options: LoadOptions):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=options.trust_remote_code,
                                             **dict(options.processor))

    def load_model(self, options: LoadOptions | None = None):
        from transformers import AutoModelForImageTextToText

        options = options or LoadOptions()
        model = AutoModelForImageTextToText.from_pretrained(
            self.path, dtype=getattr(torch, options.dtype),
            attn_implementation=options.attn_implementation,
            trust_remote_code=options.trust_remote_code)
        return model

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        structured = [{"role": m["role"], "content": split_placeholders(m["content"])} for m in messages]
        return self.processor.apply_chat_template(
            structured, tokenize=False, add_generation_prompt=add_generation_prompt)

    @contextlib.contextmanager
    def images_once(self):
        """Inside the block the image processor runs once per list of images: the prefix
        tokenizations of `encode` and a pair's chosen and rejected answers reuse its output,
        so their pixel tensors are the same objects (a pickled pair carries one copy)."""
        inner = getattr(self.processor, "image_processor", None)
        if inner is None or isinstance(inner, _ImagesOnce):
            yield
            return
        self.processor.image_processor = _ImagesOnce(inner)
        try:
            yield
        finally:
            self.processor.image_processor = inner

    def tokenize(self, text: str, images: list) -> dict[str, Any]:
        """Processor call on one text: {'input_ids': list[int], per-token arrays, extras}."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        out = self.processor(text=[text], images=[images] if images else None,
                             add_special_tokens=add_special, return_tensors="pt", **self.pixel_kwargs(images))
        return self._unbatch(out)

    def pixel_kwargs(self, images: list) -> dict[str, bool]:
        """Processor keywords that leave the pixels uint8 (raw_pixels), for a call with `images`."""
        return {"do_rescale": False, "do_normalize": False} if images and self.pixel_normaliser else {}

    def normalise_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (raw_pixels) -> the float pixels the processor would have returned."""
        images = self.pixel_normaliser
        if images is None:
            raise ValueError(f"{self.path}: uint8 pixel_values reached {type(self).__name__}, whose image "
                             "processor has no rescale_and_normalize; encode with this adapter")
        def hashable(value):  # the processor caches its fused constants by these arguments
            return tuple(value) if isinstance(value, list) else value

        return images.rescale_and_normalize(pixels, images.do_rescale, images.rescale_factor, images.do_normalize,
                                            hashable(images.image_mean), hashable(images.image_std))

    def _unbatch(self, out) -> dict[str, Any]:
        pixels = out.get("pixel_values") if hasattr(out, "get") else None
        if self.pixel_normaliser is not None and pixels is not None and pixels.dtype != torch.uint8:
            raise ValueError(f"{self.path}: asked for uint8 pixels (do_rescale=False, do_normalize=False), its "
                             f"processor returned {pixels.dtype}; set raw_pixels = False on {type(self).__name__}")
        result: dict[str, Any] = {"input_ids": out["input_ids"][0].tolist()}
        for name in self.token_arrays:
            if name in out:
                result[name] = out[name][0].tolist()
        for name in self.extra_rules:
            if name in out:
                result.setdefault("extras", {})[name] = out[name]
        return result

    # ------------------------------------------------------------------ encoding
    def validate(self, messages: list[dict], images: list, record: str) -> None:
        for message in messages:
            if message.get("role") not in ("system", "user", "assistant"):
                raise EncodeError("bad_role", f"{record}: role {message.get('role')!r} is not system/user/assistant")
            if not isinstance(message.get("content"), str):
                raise EncodeError("bad_content", f"{record}: message content must be a string")
            if message["role"] == "assistant" and IMAGE_PLACEHOLDER in message["content"]:
                raise EncodeError("image_in_answer", f"{record}: an assistant turn holds an <image> placeholder")
        placeholders = count_placeholders(messages)
        if placeholders != len(images):
            raise EncodeError("image_count_mismatch",
                              f"{record}: {placeholders} <image> placeholder(s) but {len(images)} image(s)")
        if len(images) > 1 and not self.supports_multi_image:
            raise EncodeError("multi_image_unsupported",
                              f"{record}: {type(self).__name__} takes at most one image per example")
        if not images and not self.supports_text_only:
            raise EncodeError("text_only_unsupported",
                              f"{record}: {type(self).__name__} needs an image in every example")

    def encode(self, messages: list[dict], images: list, *, max_length: int | None = None,
               record: str = "record") -> EncodedExample:
        """Token ids + labels covering assistant tokens only (the final turn must be the assistant's)."""
        self.validate(messages, images, record)
        if not messages or messages[-1]["role"] != "assistant":
            raise EncodeError("no_answer", f"{record}: the last message must be an assistant turn")
        with self.images_once():
            full = self.tokenize(self.render(messages, False), images)
            ids = full["input_ids"]
            spans = []
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                start = self._prefix_length(messages[:index], True, images, ids, record)
                end = self._prefix_length(messages[: index + 1], False, images, ids, record)
                spans.append((start, end))
        example = self._make_example(full, spans)
        self.check_length(example, max_length, record)
        return example

    def encode_prompt(self, messages: list[dict], images: list, *, max_length: int | None = None,
                      record: str = "record") -> EncodedExample:
        """Prompt for generation: the conversation so far plus the generation prompt, no labels."""
        self.validate(messages, images, record)
        full = self.tokenize(self.render(messages, True), images)
        example = self._make_example(full, [])
        self.check_length(example, max_length, record)
        return example

    def _prefix_length(self, messages, generation_prompt, images, full_ids, record) -> int:
        text = self.render(messages, generation_prompt)
        prefix = self.tokenize(text, images[: count_placeholders(messages)])["input_ids"]
        if full_ids[: len(prefix)] != prefix:
            raise ValueError(
                f"{record}: the chat template of {self.path} does not tokenize turn by turn as a prefix of "
                "the whole conversation, so assistant tokens cannot be located; check its template")
        return len(prefix)

    def _make_example(self, tokenized: dict, spans: list[tuple[int, int]]) -> EncodedExample:
        ids = list(tokenized["input_ids"])
        arrays = {name: list(tokenized[name]) for name in self.token_arrays if name in tokenized}
        labels = [IGNORE_INDEX] * len(ids)
        eos = self.tokenizer.eos_token_id
        shift = 0
        for start, end in spans:
            start, end = start + shift, end + shift
            labels[start:end] = ids[start:end]
            if eos is not None and eos not in ids[start:end]:
                # Templates that omit the end-of-turn token (llava-hf's) would never teach the
                # model to stop; insert it after the answer.
                ids.insert(end, eos)
                labels.insert(end, eos)
                for values in arrays.values():
                    values.insert(end, values[end - 1])
                shift += 1
        return EncodedExample(input_ids=ids, labels=labels, token_arrays=arrays,
                              extras=tokenized.get("extras", {}))

    def check_length(self, example: EncodedExample, max_length: int | None, record: str) -> None:
        if max_length is not None and len(example.input_ids) > max_length:
            raise EncodeError("too_long", f"{record}: {len(example.input_ids)} tokens after image expansion "
                                          f"exceed max_length={max_length}; examples are never cut")

    # ------------------------------------------------------------------ batching
    def collate(self, examples: list[EncodedExample], padding_side: str = "right") -> ModelBatch:
        return collate_examples(examples, pad_id=self.tokenizer.pad_token_id, rules=self.extra_rules,
                                padding_side=padding_side)

    def model_inputs(self, batch: ModelBatch) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.extras}
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:  # raw_pixels: normalised here, on the device
            inputs["pixel_values"] = self.normalise_pixels(pixels)
        return inputs

    # ------------------------------------------------------------------ log-probs
    def hidden_states(self, model, batch: ModelBatch) -> torch.Tensor:
        """(B, T, H) last hidden states of the language model."""
        return self.forward_hidden(model, self.model_inputs(batch))

    def forward_hidden(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H) last hidden states for model inputs (model_inputs, or a packed pair batch's)."""
        return unwrap(model).model(**inputs, use_cache=False).last_hidden_state

    def output_head(self, model):
        """Callable hidden (.., H) -> logits (.., V) including any final soft-capping."""
        return unwrap(model).get_output_embeddings()

    def token_logprobs(self, model, batch: ModelBatch, chunk_size: int = 1024,
                       exclude: tuple[int, ...] = ()) -> torch.Tensor:
        """(B, T) fp32: entry t is log p(input_ids[t] | input_ids[<t]) where labels[t] != -100, else 0.
        `exclude`: token ids given no probability (the softmax runs over the rest)."""
        hidden = self.hidden_states(model, batch)
        head = self.output_head(model)
        if exclude:
            ids, full_head = torch.tensor(exclude, device=hidden.device), head

            def head(states):
                return full_head(states).index_fill(-1, ids, float("-inf"))
        return chunked_token_logprobs(hidden, head, batch.labels, chunk_size=chunk_size)

    # ------------------------------------------------------------------ the preference forward
    def pair_states(self, model, chosen: ModelBatch, rejected: ModelBatch) -> PairStates:
        """Last hidden states of a pair batch (row i of each is one pair): packed, so the
        images and the shared prompt go through the model once per pair, where the family
        and the pairs allow it (same images, placeholders only in the shared prefix, an
        attention that takes a 4D mask); otherwise two separate forwards."""
        inputs, plan = self._packed_inputs(model, chosen, rejected)
        if inputs is None:
            return PairStates(self.hidden_states(model, chosen), identity_index(chosen),
                              self.hidden_states(model, rejected), identity_index(rejected), packed=False)
        hidden = self.forward_hidden(model, inputs)
        return PairStates(hidden, plan.chosen_index, hidden, plan.rejected_index, packed=True)

    def pair_token_logprobs(self, model, chosen: ModelBatch, rejected: ModelBatch,
                            chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Tc) and (B, Tr) fp32 token log-probs of a pair batch, as token_logprobs gives
        for each batch alone."""
        states = self.pair_states(model, chosen, rejected)
        head = self.output_head(model)
        return (chunked_token_logprobs(states.chosen, head, chosen.labels, chunk_size, states.chosen_index),
                chunked_token_logprobs(states.rejected, head, rejected.labels, chunk_size, states.rejected_index))

    def row_position_ids(self, model, batch: ModelBatch) -> torch.Tensor:
        """(B, T) position ids the model gives each row's tokens, counted from the row's first
        real token (so either padding side gives the same ids)."""
        return (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def pair_attention(self, plan, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(B, N, N) bool: which packed tokens each packed token attends to (the family's rule
        in its own row); None where the family's rule cannot be kept in one packed row."""
        return plan.allowed()

    def _packed_inputs(self, model, chosen: ModelBatch, rejected: ModelBatch):
        """(model inputs of the packed batch, its plan), or (None, None) where pairs cannot pack."""
        attention = self.language_model(model).config._attn_implementation
        if self.pair_forward != "packed" or attention not in ("sdpa", "eager"):
            return None, None
        shared = [name for name in chosen.extras if name not in self.token_arrays]
        # a pair encoded together shares its pixel tensors (images_once; moved together by
        # ModelBatch.to): the same object needs no element-wise comparison (a device sync)
        if set(chosen.extras) != set(rejected.extras) or not all(
                chosen.extras[name] is rejected.extras[name] or torch.equal(chosen.extras[name], rejected.extras[name])
                for name in shared):
            return None, None  # not the same images: nothing to share
        plan = pack_pairs(chosen, rejected)
        if not hasattr(self, "_placeholders"):
            self._placeholders = tuple(self.placeholder_token_ids())
        input_ids = plan.take(chosen.input_ids, rejected.input_ids, fill=self.tokenizer.pad_token_id)
        placeholders = torch.isin(input_ids, torch.tensor(self._placeholders, device=input_ids.device))
        if (placeholders & (plan.branch > 0)).any():
            return None, None  # an image placeholder after the fork: images are not shared
        inputs = self.model_inputs(chosen)
        inputs["input_ids"] = input_ids
        for name in self.token_arrays:
            if name in chosen.extras:
                inputs[name] = plan.take(chosen.extras[name], rejected.extras[name])
        inputs["position_ids"] = plan.take(self.row_position_ids(model, chosen),
                                           self.row_position_ids(model, rejected))
        allowed = self.pair_attention(plan, inputs)
        if allowed is None:
            return None, None
        # Additive, in the weights' dtype: eager attention adds it, and CPU sdpa runs a float
        # mask about as fast as its causal kernel (a bool mask ~1.4x slower).
        inputs["attention_mask"] = additive_mask(allowed, self.output_head(model).weight.dtype)
        return inputs, plan

    def rollout_logprobs(self, model, batch: ModelBatch) -> torch.Tensor:
        """Log-probs under the distribution rollouts sample from: the model's, with the
        placeholder tokens excluded (see placeholder_token_ids). Online RL trains these."""
        if not hasattr(self, "_placeholders"):
            self._placeholders = tuple(self.placeholder_token_ids())
        return self.token_logprobs(model, batch, exclude=self._placeholders)

    # ------------------------------------------------------------------ the group forward
    def group_hidden(self, model, batch: ModelBatch, groups: list[list[int]] | None,
                     representatives: ModelBatch | None):
        """(hidden states, plan): the rows of each group (the same prompt and images) packed
        into one row (vlrlhf.models.groups), so the images and the prompt run once per group;
        plan None where the family, the attention or the rows cannot pack (then hidden is
        the separate rows', (B, T, H))."""
        inputs, plan = self._group_inputs(model, batch, groups, representatives)
        if inputs is None:
            return self.hidden_states(model, batch), None
        return self.forward_hidden(model, inputs), plan

    def group_rollout_logprobs(self, model, batch: ModelBatch, groups: list[list[int]] | None,
                               representatives: ModelBatch | None, chunk_size: int = 1024, temperature: float = 1.0):
        """(rollout_logprobs(model, batch), packed: bool), with the group forward where it applies;
        under softmax(logits / temperature), the distribution the engines sample from."""
        if not hasattr(self, "_placeholders"):
            self._placeholders = tuple(self.placeholder_token_ids())
        hidden, plan = self.group_hidden(model, batch, groups, representatives)
        ids, full_head = torch.tensor(self._placeholders, device=hidden.device), self.output_head(model)

        def head(states):
            logits = full_head(states)
            return (logits if temperature == 1.0 else logits / temperature).index_fill(-1, ids, float("-inf"))
        if plan is None:
            return chunked_token_logprobs(hidden, head, batch.labels, chunk_size), False
        return chunked_token_logprobs(hidden, head, batch.labels, chunk_size, plan.index, plan.group_of), True

    def _group_inputs(self, model, batch: ModelBatch, groups, representatives):
        """(model inputs of the packed groups, their plan), or (None, None) where they cannot pack."""
        if not groups or representatives is None or len(groups) == len(batch):
            return None, None  # nothing to share
        attention = self.language_model(model).config._attn_implementation
        if self.pair_forward != "packed" or attention not in ("sdpa", "eager"):
            return None, None
        plan = pack_groups(batch, groups)
        if not hasattr(self, "_placeholders"):
            self._placeholders = tuple(self.placeholder_token_ids())
        input_ids = plan.take(batch.input_ids, fill=self.tokenizer.pad_token_id)
        placeholders = torch.isin(input_ids, torch.tensor(self._placeholders, device=input_ids.device))
        if (placeholders & (plan.branch > 0)).any():
            return None, None  # an image placeholder after the fork: the rows' images differ
        inputs = self.model_inputs(representatives)
        inputs["input_ids"] = input_ids
        for name in self.token_arrays:
            if name in batch.extras:
                inputs[name] = plan.take(batch.extras[name])
        inputs["position_ids"] = plan.take(self.row_position_ids(model, batch))
        allowed = self.pair_attention(plan, inputs)
        if allowed is None:
            return None, None
        inputs["attention_mask"] = additive_mask(allowed, self.output_head(model).weight.dtype)
        return inputs, plan

    # ------------------------------------------------------------------ model surgery
    def language_model(self, model):
        return unwrap(model).get_decoder()

    def vision_modules(self, model) -> list[torch.nn.Module]:
        """The vision encoder (frozen by `freeze_vision`); projectors stay trainable."""
        return [model.model.vision_tower]

    def freeze_vision(self, model) -> None:
        for module in self.vision_modules(model):
            module.requires_grad_(False)

    def lora_targets(self, model) -> list[str]:
        """Full module names of the language model's linear projections."""
        decoder = self.language_model(model)
        prefix = next(name for name, module in model.named_modules() if module is decoder)
        return [f"{prefix}.{name}" for name, module in decoder.named_modules()
                if isinstance(module, torch.nn.Linear)]

    def placeholder_token_ids(self) -> list[int]:
        """Image/video placeholder ids: a sampled completion must never hold one (the training
        forward would find more image tokens than image features). Rollouts ban them, and
        online RL scores completions without them (rollout_logprobs), so the behaviour and
        the trained distributions are the same."""
        ids = set()
        for config in (self.config, getattr(self.config, "text_config", None)):
            for key in PLACEHOLDER_KEYS:
                value = getattr(config, key, None) if config is not None else None
                if isinstance(value, int) and 0 <= value < len(self.tokenizer):
                    ids.add(value)
        for name in ("image_token", "video_token"):
            token = getattr(self.processor, name, None) or getattr(self.tokenizer, name, None)
            if isinstance(token, str):
                token_id = self.tokenizer.convert_tokens_to_ids(token)
                if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                    ids.add(token_id)
        return sorted(ids)

    def generation_defaults(self) -> dict[str, Any]:
        return {"max_new_tokens": 128, "do_sample": False,
                "eos_token_id": self.tokenizer.eos_token_id, "pad_token_id": self.tokenizer.pad_token_id}

    @torch.no_grad()
    def generate(self, model, batch: ModelBatch, **overrides) -> list[list[int]]:
        """Greedy (by default) continuations of a left-padded prompt batch, eos and padding removed."""
        kwargs = {**self.generation_defaults(), **overrides}
        output = model.generate(**self.model_inputs(batch), **kwargs)
        prompt_length = batch.input_ids.shape[1]
        stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        results = []
        for row in output[:, prompt_length:].tolist():
            tokens = []
            for token in row:
                if token in stops:
                    break
                tokens.append(token)
            results.append(tokens)
        return results


class _ImagesOnce:
    """An image processor that remembers its last outputs by the identity of the images."""

    def __init__(self, inner):
        self.inner = inner
        self.outputs: dict = {}

    def __call__(self, images, *args, **kwargs):
        def identities(value):
            return tuple(identities(v) for v in value) if isinstance(value, (list, tuple)) else id(value)

        key = (identities(images), repr(args), repr(sorted(kwargs.items(), key=lambda item: item[0])))
        if key not in self.outputs:
            self.outputs[key] = (images, self.inner(images, *args, **kwargs))  # images kept: ids stay unique
        output = self.outputs[key][1]
        return type(output)(dict(output)) if hasattr(output, "keys") else output  # callers may pop keys

    def output_for(self, images: list):
        """The remembered output of a call on these very images (in any nesting), or None."""
        def flat(value):
            return [i for v in value for i in flat(v)] if isinstance(value, (list, tuple)) else [id(value)]

        wanted = flat(images)
        return next((output for kept, output in self.outputs.values() if flat(kept) == wanted), None)

    def __getattr__(self, name):
        return getattr(self.inner, name)
