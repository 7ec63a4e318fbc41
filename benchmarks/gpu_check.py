"""GPU check: the DPO policy step at LLaVA-1.5-7B geometry on one GPU, random bf16 weights.

    bash benchmarks/gpu_check.sh [--dry] [--out gpu_check.json] [--pairs 8] [--steps 5]

Nothing downloads and nothing needs Ray, DeepSpeed or vLLM: the model is LLaVA-1.5-7B's
geometry (Llama-2-7B + CLIP ViT-L/14-336, 576 image tokens a pair) built on the GPU with
random bf16 weights, fed by the tiny LLaVA processor (the same tokens and pixels a real
processor would give, from a small vocabulary). It checks and measures:

1. the environment: torch, CUDA, the device, bf16, TF32, whether flash-attn is installed;
2. packed = separate in bf16: each pair's chosen and rejected log-probs and the LoRA
   gradients from the packed pair forward (image and prompt once, the shared-prefix
   mask under SDPA) against two separate forwards;
3. the DPO policy step as the policy worker takes it (vlrlhf.training.dpo_micro_step;
   LoRA r64 on the language model, fp32 adapters under bf16 autocast, gradient
   checkpointing, the reference = the base with the adapters off, fused AdamW): pairs/s,
   peak memory and MFU, against the layout of TRL's DPOTrainer (chosen and rejected
   concatenated into one batch of 2B rows, each image twice, as its concatenated_forward
   does; TRL itself is not on the GPU machine), alternating step by step;
4. the memory plan (vlrlhf.memory, what `vlrlhf plan` prints) against the measured peak.

MFU counts the model FLOPs of the useful tokens (the packed row's: image and prompt once):
2PT for the reference forward and 4PT for the policy's forward and backward (the frozen
base needs no weight gradients; gradient checkpointing's recompute is not counted), with P
the language model's parameters, plus 2P_v per image patch for each vision forward;
attention's T^2 term is left out (~3% at these lengths). Peak: the device's dense bf16.

--dry runs the same code on the CPU at a tiny geometry in fp32 (tests/test_gpu_check.py),
so the script cannot rot before a GPU is there. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GEOMETRY = {  # build_llava overrides
    "llava15_7b": dict(text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32064,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5),
                       vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16),
                       image_size=336, patch_size=14),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=16),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
                 image_size=56, patch_size=14),
}
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12))
WORDS = ("the circle is red and the square beside it is blue while a small green triangle sits below them "
         "on a white ground with a thin black border").split()


def environment(device: torch.device) -> dict:
    import importlib.util

    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "device": "cpu",
           "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        props = torch.cuda.get_device_properties(device)
        out |= {"device": props.name, "memory_gb": props.total_memory / 2**30, "bf16": torch.cuda.is_bf16_supported(),
                "tf32": torch.backends.cuda.matmul.allow_tf32, "capability": list(torch.cuda.get_device_capability())}
    return out


def build(geometry: str, device: torch.device, dtype: torch.dtype, folder: pathlib.Path):
    """(adapter, model, config folder): the model built on `device` with random weights."""
    from transformers import AutoModelForImageTextToText

    from vlrlhf.models.llava import LlavaAdapter
    from vlrlhf.models.tiny import build_llava

    config, processor = build_llava(**GEOMETRY[geometry])
    config.save_pretrained(folder)  # for the memory plan, which reads config.json only
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return LlavaAdapter(processor, config=config, path=str(folder)), model


def lora(adapter, model, rank: int, autocast: bool, checkpointing: bool):
    """As the policy worker prepares a LoRA policy: frozen vision, adapters on the language model
    (fp32 under autocast), gradient checkpointing."""
    from peft import LoraConfig, get_peft_model

    adapter.freeze_vision(model)
    network = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                               target_modules=adapter.lora_targets(model)))
    if autocast:
        for parameter in network.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
    if checkpointing:
        network.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return network.train()


def examples(adapter, pairs: int, answer_words: int, image_size: int):
    """Encoded (chosen, rejected) examples: one image each, answers that differ after a shared start."""
    from PIL import Image, ImageDraw

    colours = ("red", "blue", "green", "orange", "purple", "grey", "black", "yellow")
    chosen, rejected = [], []
    for index in range(pairs):
        image = Image.new("RGB", (image_size, image_size), "white")
        ImageDraw.Draw(image).ellipse([8, 8, image_size - 8, image_size - 8], fill=colours[index % len(colours)])
        words = [WORDS[(index + k) % len(WORDS)] for k in range(answer_words)]
        question = f"<image>\nDescribe the picture in detail ({index})."
        for answer, out in ((words, chosen), (words[::-1], rejected)):
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": " ".join(answer)}]
            out.append(adapter.encode(messages, [image]))
    return chosen, rejected


def concatenated_logps(adapter, model, chosen_examples, rejected_examples, device):
    """TRL's layout: the 2B rows padded into one batch, each pair's image in both halves."""
    from vlrlhf.training import score_tokens

    both = adapter.collate(chosen_examples + rejected_examples).to(device)
    scores, lengths = score_tokens(adapter.token_logprobs(model, both), both)
    half = len(chosen_examples)
    return scores[:half], scores[half:], lengths[:half], lengths[half:]


def packed_logps(adapter, model, pairs):
    from vlrlhf.training import pair_logps

    out = pair_logps(adapter, model, pairs)
    return out.chosen, out.rejected, out.chosen_lengths, out.rejected_lengths


def compare_packed_and_separate(adapter, model, pairs, autocast, tolerance: dict) -> dict:
    """Sequence log-probs and LoRA gradients, packed against separate forwards."""
    from vlrlhf.training import pair_logps

    results = {}
    for way in ("packed", "separate"):
        adapter.pair_forward = way
        model.zero_grad(set_to_none=True)
        with autocast():
            out = pair_logps(adapter, model, pairs)
        (out.chosen.sum() + out.rejected.sum()).backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results[way] = (torch.cat([out.chosen, out.rejected]).detach().float(), grads)
    adapter.pair_forward = "packed"
    packed_now = adapter.pair_states(model, pairs.chosen, pairs.rejected).packed
    (logp_p, grad_p), (logp_s, grad_s) = results["packed"], results["separate"]
    logp_error = float(((logp_p - logp_s).abs() / logp_s.abs().clamp(min=1.0)).max())
    cosine = float(torch.nn.functional.cosine_similarity(grad_p, grad_s, dim=0))
    norm_error = float((grad_p - grad_s).norm() / grad_s.norm().clamp(min=1e-12))
    model.zero_grad(set_to_none=True)
    return {"packed": bool(packed_now), "logp_relative_error": logp_error, "grad_cosine": cosine,
            "grad_relative_error": norm_error, "tolerance": tolerance,
            "ok": bool(packed_now) and logp_error <= tolerance["logp"] and norm_error <= tolerance["grad"]}


def time_steps(adapter, model, optimizer, layouts: dict, steps: int, autocast, device) -> dict:
    """Alternating DPO policy steps, one per layout a round, after a warm-up round."""
    from vlrlhf.config import AlgorithmSpec
    from vlrlhf.losses.preference import dpo_loss

    algorithm = AlgorithmSpec(name="dpo")
    seconds = {name: [] for name in layouts}
    peaks = {name: 0 for name in layouts}
    for round_ in range(steps + 1):
        for name, logps in layouts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with torch.no_grad(), model.disable_adapter(), autocast():
                ref_c, ref_r, _, _ = logps()
            with autocast():
                c, r, c_len, r_len = logps()
            out = dpo_loss(c, r, ref_c, ref_r, beta=algorithm.beta, loss_type=algorithm.loss_type,
                           chosen_lengths=c_len, rejected_lengths=r_len)
            (out.losses.sum() / len(c)).backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
            if round_:
                seconds[name].append(time.perf_counter() - started)
    return {name: {"step_s": statistics.median(values), "peak_gb": peaks[name] / 2**30 if peaks[name] else None}
            for name, values in seconds.items()}


def shared_prefix(pairs) -> torch.Tensor:
    """(B,) tokens each pair's chosen and rejected rows share before they fork (right padding)."""
    width = min(pairs.chosen.input_ids.shape[1], pairs.rejected.input_ids.shape[1])
    differs = pairs.chosen.input_ids[:, :width] != pairs.rejected.input_ids[:, :width]
    whole = torch.full_like(differs[:, 0], width, dtype=torch.long)
    return torch.where(differs.any(-1), differs.int().argmax(-1), whole)


def model_flops(shape, useful_tokens: int, patches: int) -> float:
    """Per step: reference forward 2PT, policy forward and backward 4PT (language model), and the
    vision tower's forward in both (2P_v per patch each)."""
    language = shape.total - shape.vision
    return 6 * language * useful_tokens + 2 * 2 * shape.vision * patches


def peak_flops(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16 if key in name), None)


def memory_plan(folder: pathlib.Path, rank: int, tokens: int, dtype: str) -> dict:
    from vlrlhf.memory import GIB, activation_bytes, model_shape, training_states

    shape = model_shape(str(folder))
    states = training_states(shape, dtype, rank, freeze_vision=True, strategy="ddp")
    active = activation_bytes(shape, tokens, dtype, checkpointing=True)
    return {"shape": shape, "states_gb": states / GIB, "activations_gb": active / GIB,
            "total_gb": (states + active) / GIB}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny geometry, fp32 (the test suite's run)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per micro-batch (8; --dry: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout (5; --dry: 1)")
    parser.add_argument("--answer-words", type=int, default=None, help="words per answer (90; --dry: 6)")
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(argv)
    dry = args.dry
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry for the CPU rehearsal")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    pairs_n = args.pairs or (2 if dry else 8)
    steps = args.steps or (1 if dry else 5)
    words = args.answer_words or (6 if dry else 90)
    geometry = "tiny" if dry else "llava15_7b"
    started = time.perf_counter()
    report = {"geometry": geometry, "pairs": pairs_n, "steps": steps, "lora_rank": args.rank,
              "environment": environment(device)}

    def autocast():
        if dry:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=torch.bfloat16)

    from vlrlhf.data.pipeline import PairBatch

    with tempfile.TemporaryDirectory() as temp:
        folder = pathlib.Path(temp)
        adapter, model = build(geometry, device, dtype, folder)
        report["build_s"] = time.perf_counter() - started
        network = lora(adapter, model, args.rank, autocast=not dry, checkpointing=True)
        chosen, rejected = examples(adapter, pairs_n, words, GEOMETRY[geometry]["image_size"])
        pairs = PairBatch(adapter.collate(chosen), adapter.collate(rejected))
        pairs = PairBatch(pairs.chosen.to(device), pairs.rejected.to(device))
        tolerance = {"logp": 1e-4, "grad": 1e-3} if dry else {"logp": 2e-2, "grad": 5e-2}
        report["packed_vs_separate"] = compare_packed_and_separate(adapter, network, pairs, autocast, tolerance)
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-5, fused=True)
        layouts = {"vlrlhf_packed": lambda: packed_logps(adapter, network, pairs),
                   "trl_concatenated": lambda: concatenated_logps(adapter, network, chosen, rejected, device)}
        timed = time_steps(adapter, network, optimizer, layouts, steps, autocast, device)
        shared = shared_prefix(pairs)
        useful = int(pairs.chosen.attention_mask.sum() + pairs.rejected.attention_mask.sum() - shared.sum())
        width = max(pairs.chosen.input_ids.shape[1], pairs.rejected.input_ids.shape[1])
        plan = memory_plan(folder, args.rank, pairs_n * 2 * width, "float32" if dry else "bfloat16")
        shape = plan.pop("shape")
        patches = pairs_n * (GEOMETRY[geometry]["image_size"] // GEOMETRY[geometry]["patch_size"]) ** 2
        flops = model_flops(shape, useful, patches)
        peak = peak_flops(report["environment"]["device"])
        for numbers in timed.values():
            numbers["pairs_per_s"] = pairs_n / numbers["step_s"]
            numbers["mfu"] = flops / numbers["step_s"] / peak if peak else None
        report["tokens"] = {"useful_per_step": useful, "shared_per_pair": shared.tolist(), "row_width": width}
        report["dpo_step"] = timed
        report["speedup_vs_trl_layout"] = timed["trl_concatenated"]["step_s"] / timed["vlrlhf_packed"]["step_s"]
        measured = timed["vlrlhf_packed"]["peak_gb"]
        plan["measured_peak_gb"] = measured
        plan["error"] = (plan["total_gb"] - measured) / measured if measured else None
        plan["ok"] = None if measured is None else abs(plan["error"]) <= 0.15
        report["memory_plan"] = plan
    report["seconds"] = time.perf_counter() - started
    checks = [report["packed_vs_separate"]["ok"]] + ([] if dry else [plan["ok"]])
    report["ok"] = all(checks)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
