"""Rollout rows: one sampled completion with everything the updates need, and their batches.

A Row holds the completion's tokens and per-token lists over them (behaviour log-probs,
reference log-probs, critic values, advantages, returns): numbers, which the online
driver computes advantages from. `padded` stacks a field into a completion-only (N, L)
tensor for the advantage maths (vlrlhf.losses.policy).

The tensors (the prompt's tokens and pixels) never pass through the driver: a
`RowsShare` names the step's encoded prompts by their references in the object store
(the rollout engines encoded them once, to sample) and carries the rows; the worker that consumes it
fetches the prompts, builds each row's example (`with_examples`: prompt + completion,
labels on the completion) and collates (`collate_rl` / `collate_values` place the lists
at the label positions of a padded prompt + completion batch).
"""

from __future__ import annotations

import dataclasses

import torch

from vlrlhf.models.batch import EncodedExample
from vlrlhf.training import RLBatch, ValueBatch


@dataclasses.dataclass
class Row:
    example: EncodedExample | None  # prompt + completion ids, labels on the completion (built by workers)
    request: int  # index of the prompt in the step
    logprobs: list[float]  # behaviour log-prob of each completion token
    ref_logprobs: list[float] | None = None
    values: list[float] | None = None  # critic V(s_t) (PPO)
    advantages: list[float] | None = None
    returns: list[float] | None = None  # GAE targets of the critic (PPO)
    truncated: bool = False  # cut at max_tokens
    token_ids: list[int] | None = None  # the completion
    text: str = ""  # the completion, decoded (reward models score it)
    # a multi-turn episode (online.tools): 1 on the sampled tokens of token_ids, 0 on the tool
    # turns' (no loss; the per-token lists above cover the sampled ones only), and its own
    # example (an ObjectRef, or the example itself in-process): it holds the tools' images
    mask: list[int] | None = None
    example_ref: object = None


@dataclasses.dataclass
class RowsShare:
    """A worker's rows of a step and where the step's encoded prompts are (block slices of the
    prompt pipeline's rows, in the step's prompt order): the worker builds and collates them."""

    prompts: list  # ObjectRefs of the step's encoded prompts (lists of EncodedItem, in prompt order)
    rows: list[Row]  # without examples
    micro_batch_size: int
    kind: str = "score"  # score | policy | policy_kl (reference log-probs in the loss) | values
    pad_to: int = 0  # micro-batches at least (DeepSpeed: every rank runs as many), blank rows added
    blank: bool = False  # the rows are only a pattern for blank rows: this worker has none of its own
    temperature: float = 1.0  # online.temperature: log-probs of logits / temperature, as the engines sampled


def step_prompts(refs: list) -> list:
    """The step's encoded prompts (EncodedItems: record and encoded prompt), fetched from the object
    store: each reference holds a list of them (one per rollout engine's share), in order."""
    import ray

    return [item for part in ray.get(list(refs)) for item in part]


def with_examples(share: RowsShare, prompts: list | None = None, fill: dict[str, int] | None = None) -> list[Row]:
    """The share's rows with their examples (prompt + completion), from the step's prompts;
    `fill`: the adapter's completion_token_arrays."""
    prompts = step_prompts(share.prompts) if prompts is None else prompts
    own = own_examples(share.rows)
    return [dataclasses.replace(row, example=own[index] if index in own else rl_example(
        prompts[row.request].encoded, row.token_ids, fill, row.mask)) for index, row in enumerate(share.rows)]


def own_examples(rows: list[Row]) -> dict[int, EncodedExample]:
    """The examples the rows of multi-turn episodes carry (fetched in one call), by row index."""
    import ray

    indices = [index for index, row in enumerate(rows) if row.example_ref is not None]
    refs = [index for index in indices if isinstance(rows[index].example_ref, ray.ObjectRef)]
    fetched = dict(zip(refs, ray.get([rows[index].example_ref for index in refs]), strict=True)) if refs else {}
    return {index: fetched.get(index, rows[index].example_ref) for index in indices}


def group_keys(rows: list[Row]) -> list:
    """The group forward's key of each row: its prompt; a row with its own example (tool turns,
    with images the prompt does not hold) is a group of its own."""
    return [row.request if row.example_ref is None else ("own", index) for index, row in enumerate(rows)]


def micro_batches(adapter, share: RowsShare) -> list:
    """The share built and collated as its kind asks: RLBatch for scoring and the policy, ValueBatch
    for the critic; at least `pad_to` micro-batches, the missing ones a copy of a row with no label
    (which adds no loss, no gradient and no metric)."""
    built = with_examples(share, fill=adapter.completion_token_arrays)
    rows = [] if share.blank else built
    size = share.micro_batch_size
    chunks = group_chunks(rows, size)
    if len(chunks) < share.pad_to:
        blank = dataclasses.replace(built[0], example=dataclasses.replace(
            built[0].example, labels=[-100] * len(built[0].example.labels)))
        chunks += [[blank]] * (share.pad_to - len(chunks))
    if share.kind == "values":
        return [collate_values(adapter, chunk) for chunk in chunks]
    if share.kind == "score":
        return scoring_batches(adapter, rows, size, share.temperature)
    return [collate_rl(adapter, chunk, with_reference=share.kind == "policy_kl", temperature=share.temperature)
            for chunk in chunks]


def group_chunks(rows: list[Row], size: int) -> list[list[Row]]:
    """Micro-batches of at most `size` rows that keep the rows of one prompt (a group) together,
    so each group's image and prompt run once (the group forward); a group larger than `size`
    is cut into pieces of `size`. Groups are taken in the order their first rows come."""
    from vlrlhf.models.groups import groups_of

    chunks: list[list[Row]] = []
    current: list[Row] = []
    for group in groups_of(group_keys(rows)):
        members = [rows[i] for i in group]
        for start in range(0, len(members), size):
            piece = members[start:start + size]
            if current and len(current) + len(piece) > size:
                chunks.append(current)
                current = []
            current = current + piece
    if current:
        chunks.append(current)
    return chunks


def row_groups(adapter, rows: list[Row]) -> tuple[list[list[int]] | None, object]:
    """(groups of the rows by prompt, one collated row per group) when some prompt has several
    rows here (the group forward then applies), else (None, None)."""
    from vlrlhf.models.groups import groups_of

    groups = groups_of(group_keys(rows))
    if len(groups) == len(rows):
        return None, None
    return groups, adapter.collate([rows[group[0]].example for group in groups])


def rl_example(prompt: EncodedExample, token_ids: list[int], fill: dict[str, int] | None = None,
               mask: list[int] | None = None) -> EncodedExample:
    """Prompt + completion; labels (and log-prob slots) on the completion tokens (those `mask`
    marks, when given). `fill`: the value of the completion's tokens per token array
    (adapter.completion_token_arrays; 0)."""
    fill = fill or {}
    arrays = {name: values + [fill.get(name, 0)] * len(token_ids) for name, values in prompt.token_arrays.items()}
    labels = token_ids if mask is None else [t if m else -100 for t, m in zip(token_ids, mask, strict=True)]
    return EncodedExample(prompt.input_ids + token_ids, [-100] * len(prompt.input_ids) + labels, arrays,
                          prompt.extras)


def padded(rows: list[Row], field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) float tensor of a per-token field (0 past each completion) and its (N, L) bool mask."""
    length = max((len(r.logprobs) for r in rows), default=0)
    out = torch.zeros(len(rows), max(length, 1))
    mask = torch.zeros(len(rows), max(length, 1), dtype=torch.bool)
    for index, row in enumerate(rows):
        values = getattr(row, field)
        out[index, :len(values)] = torch.tensor(values, dtype=torch.float32)
        mask[index, :len(row.logprobs)] = True
    return out, mask


def unpadded(values: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    return [values[i][mask[i]].tolist() for i in range(values.shape[0])]


def at_labels(adapter, rows: list[Row], **fields: str) -> tuple:
    """The padded batch of `rows` and, per name=row field, a (B, T) tensor holding the
    field's values at the label positions, in order (0 elsewhere)."""
    batch = adapter.collate([row.example for row in rows])
    positions = [torch.tensor([i for i, label in enumerate(row.example.labels) if label != -100], dtype=torch.long)
                 for row in rows]
    out = []
    for field in fields.values():
        tensor = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for index, row in enumerate(rows):
            values, where = getattr(row, field), positions[index]
            if len(where) == 0:  # a blank row (no labels): nothing to place
                continue
            if len(where) != len(values):
                raise ValueError(f"row of prompt {row.request}: {len(values)} {field} for {len(where)} label positions")
            tensor[index, where] = torch.tensor(values, dtype=torch.float32)
        out.append(tensor)
    return batch, *out


def collate_rl(adapter, rows: list[Row], with_reference: bool = True, temperature: float = 1.0) -> RLBatch:
    """The policy's batch; `with_reference`: carry the rows' reference log-probs for a KL in the loss."""
    with_reference = with_reference and rows[0].ref_logprobs is not None
    fields = {"old": "logprobs", "advantages": "advantages"} | ({"ref": "ref_logprobs"} if with_reference else {})
    batch, old, advantages, *ref = at_labels(adapter, rows, **fields)
    return RLBatch(batch, old, advantages, ref[0] if ref else None, *row_groups(adapter, rows), temperature)


def collate_values(adapter, rows: list[Row]) -> ValueBatch:
    batch, old_values, returns = at_labels(adapter, rows, old="values", returns="returns")
    return ValueBatch(batch, old_values, returns, *row_groups(adapter, rows))


def scoring_batches(adapter, rows: list[Row], micro_batch_size: int, temperature: float = 1.0) -> list[RLBatch]:
    """Micro-batches for reference log-probs and critic values (no advantages yet)."""
    out = []
    for chunk in group_chunks(list(rows), micro_batch_size):
        batch, old = at_labels(adapter, chunk, old="logprobs")
        out.append(RLBatch(batch, old, torch.zeros_like(old), None, *row_groups(adapter, chunk), temperature))
    return out


def scatter(per_batch: list[torch.Tensor], batches: list[RLBatch], requests: list[int] | None = None
            ) -> list[list[float]]:
    """(B, T) results of `scoring_batches` -> one list per row over its completion tokens: in the
    batches' order, or, given the rows' `requests` (group_keys), in the rows' own order
    (scoring_batches takes them group by group)."""
    from vlrlhf.models.groups import groups_of

    out = []
    for values, rl in zip(per_batch, batches, strict=True):
        mask = rl.batch.loss_mask
        out.extend(values[i][mask[i]].tolist() for i in range(values.shape[0]))
    if requests is None:
        return out
    order = [i for group in groups_of(requests) for i in group]
    result: list = [None] * len(order)
    for scored, index in zip(out, order, strict=True):
        result[index] = scored
    return result


def score_share(adapter, share: RowsShare, score) -> list[list[float]]:
    """Per row of the share, over its completion tokens: `score(micro_batches)` ((B, T) per
    micro-batch: reference log-probs, critic values) read at the label positions."""
    batches = micro_batches(adapter, dataclasses.replace(share, kind="score"))
    return scatter(score(batches), batches, None if share.blank else group_keys(share.rows))
