"""Tiny checkpoints are in the layout vLLM loads: its greedy tokens equal transformers'."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.models.helpers import shape_image, single_turn
from vlrlhf.models.registry import load_adapter

pytest.importorskip("vllm")
SCRIPT = pathlib.Path(__file__).with_name("vllm_greedy.py")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vllm_greedy_equals_transformers_greedy(family, tiny_path):
    adapter = load_adapter(tiny_path(family))
    model = adapter.load_model().eval()
    messages = single_turn()[:1]
    prompt = adapter.render(messages, True)  # placeholders unexpanded: vLLM expands them
    expected = adapter.generate(model, adapter.collate([adapter.encode_prompt(messages, [shape_image("red")])],
                                                       padding_side="left"), max_new_tokens=6)[0]
    out = subprocess.run([sys.executable, str(SCRIPT), str(tiny_path(family)), json.dumps(prompt), "red", "6"],
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("TOKENS ")]
    assert lines, out.stderr[-3000:]
    got = json.loads(lines[-1][len("TOKENS "):])
    eos = adapter.tokenizer.eos_token_id
    assert got[: len(expected)] == expected and (len(got) == len(expected) or got[len(expected)] == eos)
