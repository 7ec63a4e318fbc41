"""Multi-turn rollouts: the model calls tools, reads their results, and answers (online.tools).

    samples = run_episodes(engine, requests, sampling, Episodes(tools, max_turns=3, timeout_s=10))

The first turn samples n completions per prompt as a single-turn rollout does. A completion
that ended its turn (eos) with tool calls in it, while turns remain, gets the calls run
(vlrlhf.tools, Ray tasks with a time limit) and their results appended as a user turn; the
engine then samples the next turn after exactly the tokens so far. An episode ends at a
turn without tool calls, at max_tokens (truncated), or after max_turns turns.

No drift between what was sampled and what is trained on: the token sequence is built by
concatenation, never by re-encoding the conversation:

    prompt ids | sampled turn 1 | tool-turn ids | sampled turn 2 | ...

where the tool-turn ids are the chat template's text between the end of the assistant's
sampled text and the start of the next assistant turn (closing the turn, the user turn with
the tool results, the generation prompt), tokenized with the tools' images expanded. The
engine samples each turn after these ids and the trainer scores the same ids: `mask` is 1
on sampled tokens (loss, log-probs) and 0 on tool-turn tokens (no loss). Where the sampled
text round-trips through the tokenizer, the sequence is also what encoding the whole
conversation gives (tests/actors/test_episodes.py checks both).

An episode that used tools carries its own encoded example (prompt + completion, labels on
the sampled tokens, the pixels of every image) in the object store: the driver sees its
reference, the workers that train on it fetch it.
"""

from __future__ import annotations

import dataclasses

from vlrlhf.models.batch import IGNORE_INDEX, EncodedExample, collate_extra

MERGEABLE = ("concat", "concat_pad")  # extras rules under which one example may hold several images


@dataclasses.dataclass
class Episodes:
    """online.tools as the rollout worker runs them."""

    tools: dict  # name -> function
    max_turns: int = 2
    timeout_s: float = 10.0
    # an episode ends (finish "length") rather than start a turn whose prompt + max_tokens would
    # pass this (online.max_model_len: vLLM refuses longer prompts); None: no limit
    max_length: int | None = None


@dataclasses.dataclass
class Episode:
    request: int
    messages: list[dict]  # the conversation so far; assistant turns as their decoded text
    images: list  # the conversation's images: the prompt's, then the tools'
    prompt: EncodedExample  # the prompt's encoding
    raw_ids: list[int]  # the same tokens before image expansion (what vLLM takes: it expands them itself)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # everything after the prompt
    mask: list[int] = dataclasses.field(default_factory=list)  # 1: sampled, 0: from a tool turn
    arrays: dict = dataclasses.field(default_factory=dict)  # per-token arrays over token_ids
    extras: list[dict] = dataclasses.field(default_factory=list)  # the tool images' processor outputs
    logprobs: list[float] = dataclasses.field(default_factory=list)  # of the sampled tokens
    finish_reason: str = "stop"
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    last_text: str = ""
    texts: list[str] = dataclasses.field(default_factory=list)  # each sampled turn's text
    broken: str = ""  # why the episode could not go on (its template or a tool's output), if so
    first: object = None  # the first turn's Sample (the engine's type: the episode's Sample is a copy)

    def add_sampled(self, sample, fill: dict[str, int]) -> None:
        self.raw_ids = self.raw_ids + sample.token_ids
        self.token_ids += sample.token_ids
        self.mask += [1] * len(sample.token_ids)
        for name in self.prompt.token_arrays:
            self.arrays.setdefault(name, []).extend([fill.get(name, 0)] * len(sample.token_ids))
        self.logprobs += sample.logprobs
        self.finish_reason, self.last_text = sample.finish_reason, sample.text
        self.texts.append(sample.text)
        self.turns += 1

    def add_tool_turn(self, tail: dict, assistant: dict, response: dict, images: list) -> None:
        self.raw_ids = self.raw_ids + tail["raw_ids"]
        self.token_ids += tail["input_ids"]
        self.mask += [0] * len(tail["input_ids"])
        for name in self.prompt.token_arrays:
            self.arrays.setdefault(name, []).extend(tail.get(name) or [0] * len(tail["input_ids"]))
        if tail.get("extras"):
            self.extras.append(tail["extras"])
        self.messages = self.messages + [assistant, response]
        self.images = self.images + images

    def example(self, rules: dict[str, str], labelled: bool) -> EncodedExample:
        """Prompt + completion so far; `labelled`: labels on the sampled tokens (training), else
        none (the next turn's prompt)."""
        ids = self.prompt.input_ids + self.token_ids
        completion = [token if (labelled and keep) else IGNORE_INDEX
                      for token, keep in zip(self.token_ids, self.mask, strict=True)]
        labels = [IGNORE_INDEX] * len(self.prompt.input_ids) + completion
        arrays = {name: values + self.arrays.get(name, []) for name, values in self.prompt.token_arrays.items()}
        return EncodedExample(ids, labels, arrays, merged_extras(rules, [self.prompt.extras, *self.extras]))


def merged_extras(rules: dict[str, str], parts: list[dict]) -> dict:
    """One example's extras from the prompt's and each tool image's (images in order)."""
    if len(parts) == 1:
        return parts[0]
    names = [name for part in parts for name in part]
    return {name: collate_extra([part.get(name) for part in parts], rules[name]) for name in dict.fromkeys(names)}


def check_tool_images(adapter) -> None:
    """Tools that return images need a family whose example may hold several images, laid out flat."""
    rules = adapter.extra_rules
    if not adapter.supports_multi_image or any(rule not in MERGEABLE for rule in rules.values()) \
            or "batch_num_images" in rules:
        raise ValueError(f"{type(adapter).__name__}: a tool returned an image, and this family cannot take "
                         "the images of a multi-turn conversation in one example; use tools that return text")


def turn_closing(body: str, text: str, family: str) -> str:
    """What the template writes after the assistant's text in `body` (its rendering of the turn):
    the end-of-turn marker. Templates that trim the text (LLaVA's " " + content | trim) are
    read by the trimmed text; what the sampled text already holds is not repeated."""
    if body.startswith(text):
        return body[len(text):]
    core = text.strip()
    at = body.find(core)
    if at < 0 or body[:at].strip():
        raise ValueError(f"{family}: the chat template rewrites the assistant's text ({text[:40]!r}...), so the "
                         "tool turn cannot follow the sampled tokens")
    closing = body[at + len(core):]
    trailing = text[len(text.rstrip()):]
    return closing[len(trailing):] if trailing and closing.startswith(trailing) else closing


def tool_turn_tokens(adapter, messages: list[dict], images: list, text: str, ended: str | None,
                     response: dict, new_images: list) -> dict:
    """The ids (and per-token arrays, and the new images' extras) between the end of the
    assistant's sampled `text` and the start of the next assistant turn: the rest of the
    template's closing of the turn (without its first token when the sample `ended` with that
    token: the eos, or another stop token such as Gemma's <end_of_turn>), the user turn holding
    the tool results, the generation prompt."""
    assistant = {"role": "assistant", "content": text}
    head = adapter.render(messages, True)
    closed = adapter.render(messages + [assistant], False)
    following = adapter.render(messages + [assistant, response], True)
    family = type(adapter).__name__
    if not closed.startswith(head) or not following.startswith(closed):
        raise ValueError(f"{family}: the chat template does not render a conversation turn by turn as a prefix "
                         "of the whole; multi-turn rollouts need one that does")
    closing = turn_closing(closed[len(head):], text, family)
    if ended and closing.startswith(ended):
        closing = closing[len(ended):]
    tail_text = closing + following[len(closed):]
    out = adapter.processor(text=[tail_text], images=[new_images] if new_images else None, add_special_tokens=False,
                            return_tensors="pt", **adapter.pixel_kwargs(new_images))
    return adapter._unbatch(out) | {"raw_ids": adapter.tokenizer(tail_text, add_special_tokens=False)["input_ids"]}


def raw_prompt_ids(adapter, messages: list[dict]) -> list[int]:
    """The prompt's tokens before image expansion (one placeholder per image)."""
    text = adapter.render(messages, True)
    bos = adapter.tokenizer.bos_token
    return adapter.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def run_episodes(engine, requests: list[dict], sampling, episodes: Episodes) -> list:
    """n episodes per request (prompt order, as engine.generate returns samples) as Samples
    whose token_ids cover every turn, `mask` marking the sampled ones."""
    import ray

    from vlrlhf.tools import parse_tool_calls, response_message, run_calls

    adapter = engine.adapter
    prompts = engine.encode(requests)
    fill = adapter.completion_token_arrays
    raw = [raw_prompt_ids(adapter, request["messages"]) for request in requests]
    active = []
    states = []
    for sample in engine.generate(requests, sampling):
        request = requests[sample.request]
        state = Episode(sample.request, list(request["messages"]), list(request.get("images") or []),
                        prompts[sample.request], raw[sample.request])
        state.first = sample
        state.add_sampled(sample, fill)
        states.append(state)
        active.append(state)
    number = {id(state): index for index, state in enumerate(states)}  # (equal episodes compare equal)
    for turn in range(1, episodes.max_turns):
        calls, waiting = [], []
        for state in active:
            found = parse_tool_calls(state.last_text) if state.finish_reason == "stop" else []
            if found:
                waiting.append((state, len(found)))
                calls += [(call, state.images) for call in found]
        if not waiting:
            break
        results = run_calls(episodes.tools, calls, episodes.timeout_s)
        requests_next, going, start = [], [], 0
        for state, count in waiting:
            own = results[start:start + count]
            start += count
            state.tool_calls += count
            state.tool_errors += sum(result.error for result in own)
            response, images = response_message(own)
            said = state.last_text.replace("<image>", "[image]")  # text, not an image slot, in the template
            ended = adapter.tokenizer.decode(state.token_ids[-1:]) if state.finish_reason == "stop" else None
            try:
                if images:
                    check_tool_images(adapter)
                tail = tool_turn_tokens(adapter, state.messages, state.images, said, ended, response, images)
            except Exception as error:  # noqa: BLE001 - this episode ends here; counted, the others go on
                state.broken = f"{type(error).__name__}: {error}"
                continue
            length = len(state.prompt.input_ids) + len(state.token_ids) + len(tail["input_ids"]) + sampling.max_tokens
            if episodes.max_length is not None and length > episodes.max_length:
                state.finish_reason = "length"  # the next turn would not fit: the episode ends here
                continue
            state.add_tool_turn(tail, {"role": "assistant", "content": said}, response, images)
            # the transformers engine samples after `encoded`; vLLM after `raw_ids` with the images,
            # each episode with a seed of its own (episodes with the same context must not repeat)
            requests_next.append({"encoded": state.example(adapter.extra_rules, labelled=False),
                                  "raw_ids": state.raw_ids, "images": state.images, "messages": state.messages,
                                  "seed": turn_seed(sampling.seed, turn, number[id(state)])})
            going.append(state)
        if not going:
            break
        follow = engine.generate(requests_next, dataclasses.replace(
            sampling, n=1, seed=turn_seed(sampling.seed, turn, len(states))))
        active = []
        for state, sample in zip(going, follow, strict=True):
            state.add_sampled(sample, fill)
            active.append(state)
    out = []
    for state in states:
        example = None
        if state.turns > 1:  # its own example: the tool turns' tokens and images
            example = state.example(adapter.extra_rules, labelled=True)
            example = ray.put(example) if ray.is_initialized() else example
        # what rewards read: the model's own turns, never text a tool returned
        out.append(dataclasses.replace(
            state.first, token_ids=state.token_ids, logprobs=state.logprobs, finish_reason=state.finish_reason,
            text="\n".join(state.texts), mask=state.mask if state.turns > 1 else None, example=example,
            turns=state.turns, tool_calls=state.tool_calls, tool_errors=state.tool_errors, broken=bool(state.broken)))
    broken = [state.broken for state in states if state.broken]
    if broken:
        print(f"rollout: {len(broken)} episode(s) ended early, e.g. {broken[0]}", flush=True)
    return out


def turn_seed(seed: int | None, turn: int, episode: int) -> int | None:
    """A seed of its own for each episode's later turns."""
    return None if seed is None else (seed * 1_000_003 + turn * 100_003 + episode) % 2**31
