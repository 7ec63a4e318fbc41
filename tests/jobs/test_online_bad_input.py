"""Bad input in online prompts: an unreadable image and an oversized one are counted,
quarantined (file, row, reason) and never reach the rollout under on_bad_record: skip, and
stop the job with an error naming them under raise. (A prompt without the answer a rule
reward needs and a reward that raises or hangs: tests/rewards/test_rewards.py.)"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from jobs.run import run_job
from tests.data.test_images import png_header_only
from vlrlhf.data.bad import BadRecordError

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPES = ROOT / "data" / "shapes"


@pytest.fixture
def prompts(tmp_path) -> pathlib.Path:
    """8 prompts, two steps' worth: 6 with the bundled images, row 4 an unreadable file, row 8
    a PNG that declares 20000x20000 pixels (a few dozen bytes). Images are read where a
    step's prompts are prepared, so every row is read within the two steps."""
    rows = [json.loads(line) for line in (SHAPES / "prompts.jsonl").read_text().splitlines()[:8]]
    (tmp_path / "images").mkdir()
    for row in rows:
        shutil.copy(SHAPES / row["image"], tmp_path / "images" / pathlib.Path(row["image"]).name)
        row["image"] = f"images/{pathlib.Path(row['image']).name}"
    (tmp_path / "images" / "broken.png").write_bytes(b"these bytes are not an image")
    (tmp_path / "images" / "huge.png").write_bytes(png_header_only(20_000, 20_000))
    rows[3]["image"], rows[7]["image"] = "images/broken.png", "images/huge.png"
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def overrides(prompts: pathlib.Path, tmp_path: pathlib.Path, policy: str) -> list[str]:
    return [f"data.train={prompts}", f"data.image_root={prompts.parent}", f"data.on_bad_record={policy}",
            "data.max_pixels=1000000", "trainer.max_steps=2", "online.prompts_per_step=4", "online.n=2",
            "online.max_tokens=4", "trainer.epochs=1", f"checkpoint.dir={tmp_path / 'ck'}"]


def test_bad_images_in_online_prompts_are_counted_and_quarantined(ray_cluster, tmp_path, prompts):
    run_dir = tmp_path / "run"
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides(prompts, tmp_path, "skip"),
                   run_dir=str(run_dir)) == 0
    quarantined = [json.loads(line) for line in (run_dir / "quarantine.jsonl").read_text().splitlines()]
    assert sorted((q["where"], q["reason"]) for q in quarantined) == [
        ("prompts.jsonl:4", "unreadable"), ("prompts.jsonl:8", "too_many_pixels")]  # rows numbered from 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/reward" in row] == [1, 2]  # the good prompts still train


def test_bad_image_in_online_prompts_stops_the_job_naming_file_and_row(ray_cluster, tmp_path, prompts):
    with pytest.raises(BadRecordError) as info:
        run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides(prompts, tmp_path, "raise"),
                run_dir=str(tmp_path / "run"))
    assert info.value.where in ("prompts.jsonl:4", "prompts.jsonl:8")
    assert info.value.reason in ("unreadable", "too_many_pixels")
