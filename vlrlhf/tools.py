"""Tools a policy calls during a multi-turn rollout (online.tools, online.max_turns).

The model calls a tool by writing, in its turn, the Hermes form that Qwen's chat templates
and most open VLM agents use:

    <tool_call>{"name": "zoom", "arguments": {"box": [40, 40, 80, 80]}}</tool_call>

Each call runs as a Ray task (no CPU reserved, so it never waits behind the job's
placement groups) with a time limit; the result goes back to the model as a new user
turn, `<tool_response>...</tool_response>`, holding text or an image (`<image>`). A call
that cannot be parsed, names no known tool, raises or runs out of time gets an
"error: ..." text instead: the model sees what went wrong, and the rollout counts it.

A tool is a function `tool(images, **arguments)`: `images` are the conversation's
images so far (the prompt's, then any the tools returned), `arguments` the call's JSON
arguments. It returns a string, a PIL image, or {"text": ..., "image": ...}.

Built-ins (pixel coordinates of the image they name, `image` = its index, default 0):
  zoom   {"box": [x0, y0, x1, y1]}: the region, enlarged until its longer side is the
         source image's longer side (at most 4x): DeepEyes' zoom-in
  crop   {"box": [x0, y0, x1, y1]}: the region at its own size
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_ZOOM = 4.0


class ToolError(ValueError):
    """A call the tool refuses (bad arguments): its message goes back to the model."""


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: dict
    error: str | None = None  # why the call could not be read (it then runs nothing)


@dataclasses.dataclass
class ToolResult:
    text: str
    image: object = None  # a PIL image the tool returned
    error: bool = False


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every <tool_call>{...}</tool_call> of a turn, in order; a malformed one carries its error."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as error:
            calls.append(ToolCall("", {}, f"the tool call is not JSON ({error.msg} at {error.pos})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            calls.append(ToolCall("", {}, 'a tool call is {"name": ..., "arguments": {...}}'))
            continue
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some templates write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                arguments = None
        if not isinstance(arguments, dict):
            calls.append(ToolCall(call["name"], {}, "the call's arguments must be a JSON object"))
            continue
        calls.append(ToolCall(call["name"], arguments))
    return calls


def _region(images: list, box, image: int = 0):
    if not isinstance(image, int) or not 0 <= image < len(images):
        raise ToolError(f"image={image!r}: the conversation has {len(images)} image(s), indices from 0")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise ToolError(f"box={box!r}: give [x0, y0, x1, y1] in pixels")
    source = images[image]
    width, height = source.size
    x0, y0 = max(0, round(box[0])), max(0, round(box[1]))
    x1, y1 = min(width, round(box[2])), min(height, round(box[3]))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ToolError(f"box={list(box)}: empty inside the {width}x{height} image")
    return source, source.crop((x0, y0, x1, y1))


def crop(images: list, box, image: int = 0):
    """The region [x0, y0, x1, y1] (pixels, clipped to the image) of image `image`."""
    return _region(images, box, image)[1]


def zoom(images: list, box, image: int = 0):
    """The region, enlarged (bicubic) until its longer side is the source's longer side, at most 4x."""
    from PIL import Image

    source, region = _region(images, box, image)
    factor = min(MAX_ZOOM, max(source.size) / max(region.size))
    if factor <= 1:
        return region
    size = (max(1, round(region.size[0] * factor)), max(1, round(region.size[1] * factor)))
    return region.resize(size, Image.Resampling.BICUBIC)


BUILTINS: dict[str, Callable] = {"zoom": zoom, "crop": crop}


def load_tools(specs: list[dict]) -> dict[str, Callable]:
    """online.tools entries ({"builtin": "zoom"} or {"function": "pkg.mod:fn", "name": ...}) ->
    name -> function."""
    from vlrlhf.models.registry import import_object

    tools = {}
    for spec in specs:
        if spec.get("builtin"):
            function = BUILTINS[spec["builtin"]]
            name = spec.get("name") or spec["builtin"]
        else:
            function = import_object(spec["function"], "tool")
            name = spec.get("name") or spec["function"].rsplit(":", 1)[-1]
        tools[name] = function
    return tools


def result_of(value) -> ToolResult:
    """A tool's return value as the model will see it."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return ToolResult("", value.convert("RGB"))
    if isinstance(value, str):
        return ToolResult(value)
    if isinstance(value, dict) and set(value) <= {"text", "image"}:
        image = value.get("image")
        if image is not None and not isinstance(image, Image.Image):
            raise TypeError(f"a tool's 'image' must be a PIL image, not {type(image).__name__}")
        return ToolResult(str(value.get("text") or ""), image.convert("RGB") if image is not None else None)
    raise TypeError(f"a tool returns a string, a PIL image or {{'text', 'image'}}, not {type(value).__name__}")


def invoke(function: Callable, images: list, arguments: dict) -> ToolResult:
    """One call; a refusal or failure is a result the model reads ("error: ...")."""
    try:
        return result_of(function(images, **arguments))
    except (ToolError, TypeError, ValueError) as error:
        return ToolResult(f"error: {error}", error=True)
    except Exception as error:  # noqa: BLE001 - a broken tool must not stop the rollout; it is counted
        return ToolResult(f"error: the tool failed: {type(error).__name__}: {error}", error=True)


@functools.cache
def remote_invoke():
    """`invoke` as a Ray task (made once per process): no CPU reserved, never retried."""
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(invoke)


def run_calls(tools: dict[str, Callable], calls: list[tuple[ToolCall, list]], timeout_s: float) -> list[ToolResult]:
    """The results of (call, the conversation's images) pairs, in order. Each call runs as a Ray
    task when Ray is up (in this process otherwise); those still running after `timeout_s`
    (counted from when all were started) are cancelled and answer "error: timed out"."""
    import ray

    results: list[ToolResult | None] = [None] * len(calls)
    pending = {}
    remote = remote_invoke() if ray.is_initialized() else None
    for index, (call, images) in enumerate(calls):
        if call.error is not None:
            results[index] = ToolResult(f"error: {call.error}", error=True)
        elif call.name not in tools:
            results[index] = ToolResult(f"error: no tool named {call.name!r} (tools: {', '.join(sorted(tools))})",
                                        error=True)
        elif remote is None:
            results[index] = invoke(tools[call.name], images, call.arguments)
        else:
            pending[remote.remote(tools[call.name], images, call.arguments)] = index
    if pending:
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        for ref in done:
            try:
                results[pending[ref]] = ray.get(ref)
            except Exception as error:  # noqa: BLE001 - the task's process died: counted like a failure
                results[pending[ref]] = ToolResult(f"error: the tool failed: {type(error).__name__}", error=True)
        for ref in late:
            ray.cancel(ref, force=True)
            results[pending[ref]] = ToolResult(f"error: the tool did not answer within {timeout_s:g} s", error=True)
    return results


def response_message(results: list[ToolResult]) -> tuple[dict, list]:
    """The user turn that gives a turn's tool results back to the model, and its images."""
    parts, images = [], []
    for result in results:
        body = result.text.replace("<image>", "[image]")  # a tool's text is text: never an image slot
        if result.image is not None:
            body = "<image>" + (f"\n{body}" if body else "")
            images.append(result.image)
        parts.append(f"<tool_response>\n{body}\n</tool_response>")
    return {"role": "user", "content": "\n".join(parts)}, images
