"""`vlrlhf eval` end to end: a tiny checkpoint on the synthetic benchmark, on local Ray."""

from __future__ import annotations

import base64
import csv
import json
import pathlib

from actors.generator import Generator
from jobs.cli import main
from vlrlhf.eval.benchmarks.shapes import build_shapes_bench
from vlrlhf.eval.tsv import write_tsv

DATA = pathlib.Path(__file__).resolve().parents[2] / "data" / "shapes"


def test_eval_writes_predictions_scores_and_a_table(ray_cluster, tiny_path, tmp_path, capsys):
    bench_dir = tmp_path / "bench"
    assert build_shapes_bench(DATA, bench_dir / "Shapes_MC.tsv", limit=6) == 6
    with (bench_dir / "Shapes_MC.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    rows.append({**rows[0], "index": "99", "image": base64.b64encode(b"not an image").decode()})
    write_tsv(bench_dir / "Shapes_MC.tsv", rows)
    model = tiny_path("llava")
    out = tmp_path / "out"
    code = main(["eval", "--model", str(model), "--bench", "shapes", "--data", str(bench_dir), "--output", str(out),
                 "on_bad_record=skip", "generation.max_new_tokens=4"])
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    shapes = scores["benchmarks"]["shapes"]
    assert shapes["counts"]["questions"] == 6 and shapes["counts"]["items"] == len(rows) - 1
    assert "skipped 1 bad record(s)" in scores["bad_records"]  # the row whose image does not decode
    assert "| shapes | overall |" in (out / "results.md").read_text()
    predictions = [json.loads(line) for line in (out / "shapes" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) - 1
    # the Ray Data actors answer as one in-process generator does (greedy, deterministic)
    oracle = Generator(str(model), max_new_tokens=4)
    first = predictions[0]
    image = base64.b64decode(rows[0]["image"])
    expected = oracle({"key": ["k"], "prompt": [first["prompt"]], "images": [[image]]})["prediction"][0]
    assert first["prediction"] == expected and first["prompt"] == rows[0]["question"]
    # resources.num_workers=0: the generator in this process (no Ray): the same predictions and scores
    local = tmp_path / "local"
    assert main(["eval", "--model", str(model), "--bench", "shapes", "--data", str(bench_dir), "--output", str(local),
                 "on_bad_record=skip", "generation.max_new_tokens=4", "resources.num_workers=0"]) == 0
    assert (local / "shapes" / "predictions.jsonl").read_text() == (out / "shapes" / "predictions.jsonl").read_text()
    assert json.loads((local / "scores.json").read_text())["benchmarks"] == scores["benchmarks"]
    # compare: per-benchmark deltas
    other = tmp_path / "other"
    other.mkdir()
    shifted = json.loads((out / "scores.json").read_text())
    shifted["benchmarks"]["shapes"]["metrics"]["overall"] += 12.5
    (other / "scores.json").write_text(json.dumps(shifted))
    capsys.readouterr()
    assert main(["eval", "compare", str(out), str(other)]) == 0
    assert "| shapes | overall |" in (table := capsys.readouterr().out) and "+12.50" in table


def test_eval_bad_arguments_exit_2_before_ray(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--bench", "nosuch", "--data", str(tmp_path)]) == 2
    assert "unknown nosuch" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--bench", "mme", "--data", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
