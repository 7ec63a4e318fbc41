"""A tiny VLM that loads only with `trust_remote_code`, and the adapter a user would write
for it: the shape of Qwen-VL-Chat or InternLM-XComposer2 (their own modeling file named by
`auto_map`, no processor class, a tokenizer and an image transform the adapter drives).

`write_remote_vlm(folder)` writes config.json with auto_map, modeling_tiny_remote.py,
random weights and a tokenizer. `TinyRemoteAdapter` is named in the job spec
(`model.adapter: tests.jobs.remote_vlm:TinyRemoteAdapter`)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from vlrlhf.models.base import Adapter, unwrap

MODELING = '''
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class TinyRemoteConfig(PretrainedConfig):
    model_type = "tiny_remote_vlm"

    def __init__(self, vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, image_token_id=4, image_size=28, patch_size=14,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.image_token_id = num_key_value_heads, image_token_id
        self.image_size, self.patch_size = image_size, patch_size
        super().__init__(**kwargs)

    def text(self):
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, pad_token_id=self.pad_token_id,
                           max_position_embeddings=1024)


class TinyRemoteBody(nn.Module):
    """Patch embedding as the vision tower, a linear projector, a Llama decoder."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.vision = nn.Conv2d(3, config.hidden_size, config.patch_size, stride=config.patch_size)
        self.projector = nn.Linear(config.hidden_size, config.hidden_size)
        self.language_model = LlamaModel(config.text())

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def forward(self, input_ids, attention_mask=None, pixel_values=None, position_ids=None, use_cache=False,
                **kwargs):
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            features = self.vision(pixel_values.to(embeds.dtype)).flatten(2).transpose(1, 2)
            features = self.projector(features).reshape(-1, embeds.shape[-1])
            mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache)


class TinyRemoteForConditionalGeneration(PreTrainedModel):
    config_class = TinyRemoteConfig
    base_model_prefix = "model"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyRemoteBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model.language_model

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, position_ids=None, **kwargs):
        hidden = self.model(input_ids, attention_mask, pixel_values, position_ids).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))
'''

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|user|>", "<|assistant|>"]


def write_remote_vlm(folder: pathlib.Path) -> pathlib.Path:
    """A checkpoint folder whose model class exists only in its own modeling file."""
    import importlib.util

    from vlrlhf.models.tiny import wrap_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modeling_tiny_remote.py").write_text(MODELING)
    tokenizer = wrap_tokenizer(SPECIALS, bos=None, eos="</s>", pad="<pad>")
    tokenizer.save_pretrained(folder)
    spec = importlib.util.spec_from_file_location("modeling_tiny_remote", folder / "modeling_tiny_remote.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.TinyRemoteConfig(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    module.TinyRemoteForConditionalGeneration(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["auto_map"] = {"AutoConfig": "modeling_tiny_remote.TinyRemoteConfig",
                         "AutoModelForImageTextToText": "modeling_tiny_remote.TinyRemoteForConditionalGeneration"}
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    return folder


class TinyRemoteAdapter(Adapter):
    """The adapter for it: a plain-text template, `<image>` expanded to one token per patch,
    pixels resized and scaled to [0, 1] here (the checkpoint ships no processor)."""

    model_types = ("tiny_remote_vlm",)

    @classmethod
    def load_processor(cls, path, options):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)

    def render(self, messages, add_generation_prompt):
        text = "".join(f"<|{m['role']}|>{m['content']}" + ("</s>" if m["role"] == "assistant" else "")
                       for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def tokenize(self, text, images):
        per_image = (self.config.image_size // self.config.patch_size) ** 2
        ids = self.tokenizer(text.replace("<image>", "<image>" * per_image), add_special_tokens=False)["input_ids"]
        result = {"input_ids": ids}
        if images:
            size = self.config.image_size
            result["extras"] = {"pixel_values": torch.stack([
                torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0)
                .permute(2, 0, 1) for image in images])}
        return result

    def vision_modules(self, model):
        return [unwrap(model).model.vision]
