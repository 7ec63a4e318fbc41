"""InstructBLIP: EVA/ViT tower, an instruction-aware Q-Former, a causal LM.

The processor prepends the query tokens itself, so prompts carry no `<image>`
text. The Q-Former reads the instruction: it gets the prompt only, never the
answer (the answer would otherwise reach the LM through the query tokens), cut to
its own max_position_embeddings. One image per example.
"""

from __future__ import annotations

from vlrlhf.models.base import Adapter, EncodeError
from vlrlhf.models.paligemma import plain_prompt


class InstructBlipAdapter(Adapter):
    model_types = ("instructblip",)
    supports_multi_image = False
    supports_text_only = False
    scores_every_turn = False  # only the last answer is scored
    shared_prefill = False  # its generate takes pixel_values on every call, not a prefilled cache
    pair_forward = "packed"  # the Q-Former reads the prompt only, so a pair shares its queries
    raw_pixels = True  # its processor normalises last
    # pixel_values: (B, 3, H, W); qformer_*: (B, Lq) right-padded with 0.
    extra_rules = {"pixel_values": "concat", "qformer_input_ids": "stack_seq",
                   "qformer_attention_mask": "stack_seq"}

    def render(self, messages, add_generation_prompt):
        return plain_prompt(messages)

    def _process_prompt(self, prompt: str, images: list):
        limit = self.config.qformer_config.max_position_embeddings if self.config is not None else None
        out = self.processor(images=[images], text=[prompt], return_tensors="pt", **self.pixel_kwargs(images))
        if limit is not None and out["qformer_input_ids"].shape[1] > limit:
            out["qformer_input_ids"] = out["qformer_input_ids"][:, :limit]
            out["qformer_attention_mask"] = out["qformer_attention_mask"][:, :limit]
        return self._unbatch(out)

    def encode(self, messages, images, *, max_length=None, record="record"):
        self.validate(messages, images, record)
        if not messages or messages[-1]["role"] != "assistant":
            raise EncodeError("no_answer", f"{record}: the last message must be an assistant turn")
        tokenized = self._process_prompt(plain_prompt(messages[:-1]), images)
        start = len(tokenized["input_ids"])
        answer = self.tokenizer(" " + messages[-1]["content"].strip(), add_special_tokens=False)["input_ids"]
        tokenized["input_ids"] = tokenized["input_ids"] + answer + [self.tokenizer.eos_token_id]
        example = self._make_example(tokenized, [(start, len(tokenized["input_ids"]))])
        self.check_length(example, max_length, record)
        return example

    def encode_prompt(self, messages, images, *, max_length=None, record="record"):
        self.validate(messages, images, record)
        example = self._make_example(self._process_prompt(plain_prompt(messages), images), [])
        self.check_length(example, max_length, record)
        return example

    def forward_hidden(self, model, inputs):
        # The language model sits behind its own wrapper; take the last hidden layer
        # (position_ids, when given, reach it through the wrapper's kwargs).
        out = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        return out.language_model_outputs.hidden_states[-1]

    def vision_modules(self, model):
        return [model.vision_model]
