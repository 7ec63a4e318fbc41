"""Test prompts as the online driver gets them: the prompt pipeline's records in the object
store, as block slices (what `start_rollout` takes), and the job's encode settings."""

from __future__ import annotations

import json
import pathlib


def prompt_slices(folder: pathlib.Path, images: list, model_path: str, question: str = "What colour is the circle?"):
    """(slices of the prompt records in file order, the encode settings, the dataset holding them).
    `images`: PIL images, one prompt each, saved under `folder`."""
    from vlrlhf.data.pipeline import EncodeSettings, RecordSource, record_dataset
    from vlrlhf.data.shares import block_rows
    from vlrlhf.data.sources import expand_sources

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "prompt": question, "answer": str(index)}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    source = RecordSource(tuple(expand_sources(str(folder / "prompts.jsonl"))), "prompts")
    records = record_dataset(source).materialize()
    slices = list(block_rows(records.iter_internal_ref_bundles()))
    return slices, EncodeSettings(model_path=model_path, task="prompt", image_root=str(folder)), records
