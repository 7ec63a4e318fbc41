"""PaliGemma: image tokens and a bidirectional prefix, a causal suffix.

PaliGemma has no chat template: a conversation becomes prefix = every turn before
the last answer (one line each, placeholders removed: the processor puts the image
tokens first), suffix = the last answer. Only the suffix is scored, since the
prefix is attended bidirectionally. `token_type_ids` (0 prefix, 1 suffix) are
always passed: without them the model attends bidirectionally over the whole
sequence and answer tokens see the future.
"""

from __future__ import annotations

from vlrlhf.models.base import IMAGE_PLACEHOLDER, Adapter, EncodeError


def plain_prompt(messages: list[dict]) -> str:
    """Turns joined one per line, placeholders dropped (template-less families)."""
    lines = [message["content"].replace(IMAGE_PLACEHOLDER, "").strip() for message in messages]
    return "\n".join(line for line in lines if line)


class PaliGemmaAdapter(Adapter):
    model_types = ("paligemma",)
    supports_text_only = False
    scores_every_turn = False  # only the last answer is scored
    extra_rules = {"pixel_values": "concat"}
    token_arrays = ("token_type_ids",)
    shared_prefill = False  # its prefix-LM token types: logits 3e-3 off after a shared prefill (measured)
    completion_token_arrays = {"token_type_ids": 1}  # a sampled answer is suffix: causal, like the last answer
    pair_forward = "packed"  # the bidirectional prefix kept in the packed mask (pair_attention)
    raw_pixels = True  # its processor normalises last

    def render(self, messages, add_generation_prompt):
        return plain_prompt(messages)

    def _process(self, prompt: str, images: list, suffix: str | None):
        # One <image> per image at the start, as the processor expects; it expands them.
        prompt = self.processor.image_token * len(images) + prompt
        out = self.processor(text=[prompt], images=[images], suffix=[suffix] if suffix is not None else None,
                             return_tensors="pt", **self.pixel_kwargs(images))
        return self._unbatch(out)

    def encode(self, messages, images, *, max_length=None, record="record"):
        self.validate(messages, images, record)
        if not messages or messages[-1]["role"] != "assistant":
            raise EncodeError("no_answer", f"{record}: the last message must be an assistant turn")
        tokenized = self._process(plain_prompt(messages[:-1]), images, messages[-1]["content"])
        types = tokenized["token_type_ids"]
        start = types.index(1)  # the suffix: answer tokens and the closing eos
        example = self._make_example(tokenized, [(start, len(types))])
        self.check_length(example, max_length, record)
        return example

    def encode_prompt(self, messages, images, *, max_length=None, record="record"):
        self.validate(messages, images, record)
        example = self._make_example(self._process(plain_prompt(messages), images, None), [])
        self.check_length(example, max_length, record)
        return example

    def row_position_ids(self, model, batch):
        return super().row_position_ids(model, batch) + 1  # PaliGemma counts positions from 1

    def pair_attention(self, plan, inputs):
        """Causal, plus the model's prefix-LM rule: prefix tokens (token type 0: image and
        prompt) see each other both ways. They must all lie before the fork."""
        prefix = (inputs["token_type_ids"] == 0) & (plan.branch >= 0)
        if (prefix & (plan.branch > 0)).any():
            return None
        return plan.allowed() | (prefix[:, :, None] & prefix[:, None, :])

    def vision_modules(self, model):
        return [model.model.vision_tower]
