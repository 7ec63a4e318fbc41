"""Adapter lookup: by `config.model_type`, or by import path for a user's own adapter."""

from __future__ import annotations

import importlib
import json
import pathlib

from vlrlhf.models.base import Adapter, LoadOptions
from vlrlhf.models.gemma3 import Gemma3Adapter
from vlrlhf.models.idefics3 import Idefics3Adapter
from vlrlhf.models.instructblip import InstructBlipAdapter
from vlrlhf.models.internvl import InternVLAdapter
from vlrlhf.models.llava import LlavaAdapter
from vlrlhf.models.llava_next import LlavaNextAdapter
from vlrlhf.models.llava_onevision import LlavaOnevisionAdapter
from vlrlhf.models.paligemma import PaliGemmaAdapter
from vlrlhf.models.qwen2_vl import Glm4vAdapter, Qwen2VLAdapter

BUILTIN_ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, InstructBlipAdapter, Idefics3Adapter, PaliGemmaAdapter,
    LlavaOnevisionAdapter, InternVLAdapter, Gemma3Adapter, Glm4vAdapter)
ADAPTERS: dict[str, type[Adapter]] = {t: cls for cls in BUILTIN_ADAPTERS for t in cls.model_types}


def import_object(spec: str, what: str):
    """'package.module:Name' -> the object, with an error that names the spec."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what}={spec!r} must look like 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what}={spec!r}: cannot import {module_name!r} ({error})") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ValueError(f"{what}={spec!r}: module {module_name!r} has no {attribute!r}") from None


def read_model_type(path: str | pathlib.Path) -> str:
    config_file = pathlib.Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"model.path={str(path)!r}: no config.json there (is it a Hugging Face checkpoint folder?)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if not model_type:
        raise ValueError(f"{config_file}: no model_type")
    return model_type


def adapter_class(model_type: str | None = None, adapter: str | None = None) -> type[Adapter]:
    if adapter:
        cls = import_object(adapter, "model.adapter")
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise ValueError(f"model.adapter={adapter!r} is not a subclass of vlrlhf.models.base.Adapter")
        return cls
    if model_type not in ADAPTERS:
        raise ValueError(f"model_type {model_type!r} has no built-in adapter; known: {', '.join(sorted(ADAPTERS))}. "
                         "Write one and name it with model.adapter: my_pkg.module:MyAdapter")
    return ADAPTERS[model_type]


def load_adapter(path: str | pathlib.Path, adapter: str | None = None,
                 options: LoadOptions | None = None) -> Adapter:
    """The adapter for the checkpoint at `path` (its processor loaded)."""
    model_type = None if adapter else read_model_type(path)
    return adapter_class(model_type, adapter).from_pretrained(path, options)
