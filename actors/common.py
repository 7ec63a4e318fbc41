"""What every model-holding role shares: the device, load options, the mixed-precision
rule, the learning-rate schedule, RNG state for exact resume, and the optimizer step of
data-parallel replicas (one all-reduce of the gradients, clipping, step, clear).

Used by the policy, critic, reference and reward roles; imports no other role.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from vlrlhf.config import ModelSpec, TrainerSpec
from vlrlhf.models.base import LoadOptions


def device() -> torch.device:
    """This worker's device. On GPUs, fp32 matmuls and convolutions (fp32 master weights, the
    vision towers' convolutions, reductions outside autocast) use TF32 tensor cores."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")


def training_attention(model: ModelSpec) -> str:
    """The attention the training roles load: the packed forward's shared-prefix mask needs
    SDPA (or eager); flash attention cannot take it, so it gives way unless model.packing is off."""
    return "sdpa" if model.attention == "flash_attention_2" and model.packing else model.attention


def load_options(model: ModelSpec) -> LoadOptions:
    return LoadOptions(dtype=model.dtype, attn_implementation=training_attention(model),
                       trust_remote_code=model.trust_remote_code, processor=tuple(sorted(model.processor.items())),
                       packing=model.packing)


def mixed_precision(model: ModelSpec, trainer: TrainerSpec) -> torch.dtype | None:
    """The autocast dtype of a ddp policy whose model.dtype is bfloat16: the weights the
    optimizer updates stay fp32 (master weights; AdamW on bf16 weights rounds small updates
    away) and the forward runs in bf16. None: plain fp32, or DeepSpeed, whose engine keeps
    its own fp32 master copy of a bf16/fp16 model."""
    if model.dtype == "float32" or trainer.strategy == "deepspeed":
        return None
    if model.dtype == "float16":
        raise ValueError("model.dtype=float16 with trainer.strategy=ddp: fp16 training needs loss scaling, "
                         "which the deepspeed strategy does; use bfloat16 (or strategy: deepspeed)")
    return getattr(torch, model.dtype)


def schedule(trainer: TrainerSpec, total_steps: int):
    def factor(step: int) -> float:
        if trainer.warmup_steps and step < trainer.warmup_steps:
            return (step + 1) / trainer.warmup_steps
        if trainer.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - trainer.warmup_steps) / max(1, total_steps - trainer.warmup_steps))
        if trainer.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def rng_state() -> dict:
    """This process's random states as tensors and plain values (what a safe load reads back)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():  # dropout (LoRA's too) on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():  # a GPU run resumed on GPUs (as many as it sees)
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


class UnsafeStateError(ValueError):
    """A state file that holds more than tensors and plain values: it is not read (loading it
    could run code); the message says why and what to do."""


def load_state_file(path) -> dict:
    """A state file written by `torch.save` of tensors and plain values (dicts, lists, numbers,
    strings), read with torch's restricted unpickler (`weights_only=True`): it builds tensors
    and containers only, so a file that names any other class or function is refused before
    anything of it runs."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0][:300]
        raise UnsafeStateError(
            f"{path}: refused to load: it holds objects other than tensors and plain values ({reason}). Loading "
            "it could run code. A checkpoint written by vlrlhf before this version holds NumPy objects: resume is "
            "not possible from it; start a new run from its weights instead (model.path=CHECKPOINT "
            "checkpoint.resume=off)") from None


def optimizer_step(parameters: list, world_size: int, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """After the micro-batches' backward passes: sum gradients over the workers, clip, step
    the optimizer and the schedule, clear. Returns the gradient norm before clipping."""
    all_reduce_gradients(parameters, world_size)
    grad_norm = clip_gradients(parameters, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def all_reduce_gradients(parameters: list, world_size: int) -> None:
    """Sum the gradients over the data-parallel workers with one flat all-reduce (a missing
    gradient counts as zeros: LLaVA leaves unused tower parameters)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for parameter, grad in zip(parameters, grads, strict=True):
        parameter.grad = flat[offset: offset + grad.numel()].view_as(parameter).clone()
        offset += grad.numel()


def clip_gradients(parameters: list, max_norm: float | None) -> float:
    """Clip to max_norm (None: only measure); returns the total norm before clipping."""
    if max_norm is None:
        grads = [p.grad for p in parameters if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
