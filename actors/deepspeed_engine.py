"""The DeepSpeed ZeRO-2/3 strategy for the policy (and, later, the critic).

`trainer.strategy: deepspeed` wraps the model, the client AdamW and the LR schedule in
a DeepSpeed engine once the worker knows its data-parallel world (setup_distributed):
ZeRO-2 partitions optimizer state and gradients, ZeRO-3 also the weights. The loop is
the same as ddp's: micro-batch losses arrive divided by the GLOBAL normaliser (their
gradients sum to the gradient of the global mean), so the loss is multiplied by the
world size to undo ZeRO's averaging over ranks, and never divided by the accumulation
steps. On CPU the engine runs over gloo (FACTS: DeepSpeed on CPU).
"""

from __future__ import annotations

import contextlib
import math
import pathlib

import torch

STATE_FOLDER = "deepspeed"
TAG = "state"


def engine_config(trainer, micro_batches_per_step: int, world_size: int, dtype: str = "float32",
                  on_gpu: bool = False) -> dict:
    """DeepSpeed's configuration. On GPUs the gradient reduction overlaps the backward pass
    (`overlap_comm`, on its own CUDA stream); on CPU there is no stream to overlap on."""
    precision = {"bf16": {"enabled": True}} if dtype == "bfloat16" else \
        {"fp16": {"enabled": True}} if dtype == "float16" else {}
    return {"train_micro_batch_size_per_gpu": trainer.micro_batch_size,
            "gradient_accumulation_steps": micro_batches_per_step,
            "train_batch_size": trainer.micro_batch_size * micro_batches_per_step * world_size,
            "gradient_clipping": trainer.max_grad_norm or 0.0,
            "zero_optimization": {"stage": trainer.zero_stage, "overlap_comm": on_gpu,
                                  "contiguous_gradients": True},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False,
            **precision}


class DeepSpeedStrategy:
    """engine.backward / engine.step over a step's micro-batches; saves and loads the engine state."""

    def __init__(self, model, optimizer, scheduler, trainer, world_size: int, dtype: str = "float32",
                 variable_steps: bool = False):
        import os

        import deepspeed

        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES: the local device is always 0.
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   dist_init_required=False)
        per_worker = trainer.batch_size // world_size
        self.micro_batches = math.ceil(per_worker / trainer.micro_batch_size)
        self.world_size = world_size
        # online RL: a step's micro-batch count follows the rollout (kept samples vary), so the
        # step's last micro-batch is marked as the accumulation boundary by hand
        self.variable_steps, self.remaining = variable_steps, 0
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=engine_config(trainer, self.micro_batches, world_size, dtype, on_gpu=torch.cuda.is_available()))

    def before_forward(self) -> None:
        """What engine.forward does first. The adapters call the model's parts (decoder,
        chunked head) rather than engine(...), so this is called instead: ZeRO counts
        micro-steps here, and without it ZeRO-3 overwrites accumulated gradients."""
        if self.variable_steps:
            self.remaining -= 1
            self.engine.set_gradient_accumulation_boundary(self.remaining == 0)
        if hasattr(self.engine.optimizer, "clear_backward_seen_flag"):
            self.engine.optimizer.clear_backward_seen_flag()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()  # steps the optimizer and schedule only at the accumulation boundary

    def check_boundary(self, micro_batches: int) -> None:
        """A step of `micro_batches` starts: fixed steps must match the engine's accumulation;
        variable steps take the count (every rank must run the same number)."""
        if self.variable_steps:
            self.remaining = micro_batches
            return
        if micro_batches != self.micro_batches:
            raise ValueError(f"deepspeed: {micro_batches} micro-batches in a step, the engine was built for "
                             f"{self.micro_batches} (trainer.batch_size / workers / micro_batch_size)")

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def stage(self) -> int:
        return self.engine.zero_optimization_stage()

    def full_state_dict(self) -> dict | None:
        """The whole model's weights (ZeRO-3 gathers its partitions; every rank must call)."""
        if self.engine.zero_optimization_stage() == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None

    def save(self, folder: str) -> None:
        self.engine.save_checkpoint(str(pathlib.Path(folder) / STATE_FOLDER), tag=TAG)

    def load(self, folder: str) -> None:
        self.engine.checkpoint_engine.load = load_engine_file  # never DeepSpeed's weights_only=False
        path, _ = self.engine.load_checkpoint(str(pathlib.Path(folder) / STATE_FOLDER), tag=TAG)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed state under {STATE_FOLDER}/{TAG}")


def deepspeed_globals() -> list:
    """The classes a DeepSpeed ZeRO checkpoint names besides tensors and containers (its loss
    scaler, the ZeRO stage enum, a parameter's fragment address): plain data, rebuilt without
    running any of their code. Anything else in the file is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_engine_file(path: str, map_location=None):
    """DeepSpeed's checkpoint-engine `load`, read with torch's restricted unpickler and the
    allow-list above instead of DeepSpeed's own `torch.load(weights_only=False)`."""
    import pickle

    from actors.common import UnsafeStateError

    with torch.serialization.safe_globals(deepspeed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0][:300]
            raise UnsafeStateError(f"{path}: refused to load: it names objects outside a DeepSpeed checkpoint's "
                                   f"tensors, plain values and allow-listed classes ({reason}); loading it could "
                                   "run code") from None


def gathered(parameters: list, strategy: DeepSpeedStrategy | None):
    """A block in which ZeRO-3's partitioned `parameters` are whole on every rank (then
    partitioned again, unchanged). It is a collective: every rank enters it, for the same
    parameters in the same order. Without ZeRO-3 there is nothing to gather."""
    if strategy is None or strategy.stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
