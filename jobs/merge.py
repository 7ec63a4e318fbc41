"""`vlrlhf merge CHECKPOINT OUT_DIR`: a LoRA adapter checkpoint -> a full HF model folder."""

from __future__ import annotations

import json
import pathlib

from vlrlhf.models.registry import load_adapter


def merge_lora(checkpoint: str, out_dir: str) -> pathlib.Path:
    from peft import PeftModel

    folder = pathlib.Path(checkpoint)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no adapter_config.json (not a LoRA checkpoint)")
    base_path = json.loads(config_file.read_text())["base_model_name_or_path"]
    adapter = load_adapter(base_path)
    model = PeftModel.from_pretrained(adapter.load_model(), folder).merge_and_unload()
    out = pathlib.Path(out_dir)
    model.save_pretrained(out)
    adapter.processor.save_pretrained(out)
    return out
