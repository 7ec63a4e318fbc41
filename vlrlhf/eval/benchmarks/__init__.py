"""Benchmarks by name; `vlrlhf eval --bench NAME[,NAME]`."""

from __future__ import annotations

import pathlib

from vlrlhf.eval.benchmarks.amber import AMBER
from vlrlhf.eval.benchmarks.base import Benchmark, Score
from vlrlhf.eval.benchmarks.hallusionbench import HallusionBench
from vlrlhf.eval.benchmarks.mathvista import MathVista
from vlrlhf.eval.benchmarks.mmbench import MMBench, SEEDBench
from vlrlhf.eval.benchmarks.mme import MME
from vlrlhf.eval.benchmarks.mmmu import MMMU
from vlrlhf.eval.benchmarks.mmvet import MMVet
from vlrlhf.eval.benchmarks.pope import POPE
from vlrlhf.eval.benchmarks.shapes import ShapesBench

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (MME(), MMBench(), SEEDBench(), POPE(), MMMU(), MathVista(),
                                                        MMVet(), HallusionBench(), AMBER(),
                                                        ShapesBench())}

__all__ = ["BENCHMARKS", "Benchmark", "Score", "find_file", "get_benchmark"]


def get_benchmark(name: str, rules: str = "official") -> Benchmark:
    """The benchmark `name`, reading and scoring by `rules` (official | vlmevalkit)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
    return type(BENCHMARKS[name])(rules)


def find_file(benchmark: Benchmark, folder: str | pathlib.Path) -> pathlib.Path:
    """The benchmark's TSV in `folder`: a file whose name starts with one of its prefixes
    (AMBER: also its official release folder, `folder/AMBER`)."""
    folder = pathlib.Path(folder)
    if benchmark.name == "amber" and (folder / "AMBER").is_dir():
        return folder / "AMBER"
    candidates = sorted(p for p in folder.glob("*.tsv")
                        if any(p.name.lower().startswith(prefix.lower()) for prefix in benchmark.files))
    if not candidates:
        raise ValueError(f"benchmark {benchmark.name}: no {'/'.join(benchmark.files)}*.tsv in {folder}")
    return candidates[0]
