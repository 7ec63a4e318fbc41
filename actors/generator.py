"""Batch generation with the transformers engine: evaluation now, rollouts' oracle later.

`Generator` is a callable class for Ray Data's `map_batches` (one model per actor,
loaded once): a batch of {key, prompt, images} rows -> {key, prediction, error}.
Prompts go through the model's adapter (chat template, one image-token expansion),
left-padded, greedy by default. A row whose image does not load is returned with an
error instead of a prediction, so the driver can raise or count it.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from vlrlhf.data.images import ImageError, load_image
from vlrlhf.models.base import EncodeError, LoadOptions
from vlrlhf.models.registry import load_adapter


def load_for_inference(path: str, adapter: str | None = None, options: LoadOptions | None = None):
    """(adapter, model in eval mode) for a full checkpoint or a LoRA adapter folder (merged on load)."""
    folder = pathlib.Path(path)
    config = folder / "adapter_config.json"
    if config.is_file():
        from peft import PeftModel

        base = json.loads(config.read_text())["base_model_name_or_path"]
        processor_here = (folder / "tokenizer_config.json").is_file()
        family = load_adapter(path if processor_here and (folder / "config.json").is_file() else base,
                              adapter=adapter, options=options)
        model = PeftModel.from_pretrained(load_adapter(base, adapter=adapter, options=options).load_model(options),
                                          path).merge_and_unload()
    else:
        family = load_adapter(path, adapter=adapter, options=options)
        model = family.load_model(options)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return family, model.to(device).eval()


def user_turn(prompt: str, num_images: int) -> list[dict]:
    return [{"role": "user", "content": "<image>\n" * num_images + prompt}]


class Generator:
    def __init__(self, model_path: str, adapter: str | None = None, dtype: str = "float32",
                 max_new_tokens: int = 64, micro_batch_size: int = 16, trust_remote_code: bool = False):
        torch.manual_seed(0)
        self.adapter, self.model = load_for_inference(model_path, adapter,
                                                      LoadOptions(dtype=dtype, trust_remote_code=trust_remote_code))
        self.max_new_tokens, self.micro_batch_size = max_new_tokens, micro_batch_size
        self.device = next(self.model.parameters()).device

    def __call__(self, batch: dict) -> dict:
        keys, prompts, images = list(batch["key"]), list(batch["prompt"]), list(batch["images"])
        predictions, errors = [""] * len(keys), [""] * len(keys)
        encoded, rows = [], []
        for row, (prompt, sources) in enumerate(zip(prompts, images, strict=True)):
            try:
                pictures = [load_image(bytes(source)) for source in sources]
                encoded.append(self.adapter.encode_prompt(user_turn(str(prompt), len(pictures)), pictures))
                rows.append(row)
            except (ImageError, EncodeError) as error:
                errors[row] = str(error)  # "reason: message"
        for start in range(0, len(encoded), self.micro_batch_size):
            chunk = self.adapter.collate(encoded[start:start + self.micro_batch_size], padding_side="left")
            outputs = self.adapter.generate(self.model, chunk.to(self.device), max_new_tokens=self.max_new_tokens)
            for row, tokens in zip(rows[start:start + self.micro_batch_size], outputs, strict=True):
                predictions[row] = self.adapter.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return {"key": np.array(keys, dtype=object), "prediction": np.array(predictions, dtype=object),
                "error": np.array(errors, dtype=object)}
