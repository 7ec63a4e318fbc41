"""The judge reward (online.judge): a VLM endpoint over HTTP grades each completion with the
prompt's images in the request. The judge here is a real HTTP server on 127.0.0.1, started by
the test, that reads the images and the rubric it is sent and answers with a score."""

from __future__ import annotations

import base64
import io
import json
import pathlib
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from jobs.run import run_job
from vlrlhf.config import load_spec
from vlrlhf.data.images import load_image
from vlrlhf.rewards.judge import parse_score

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPES = ROOT / "data" / "shapes"


@pytest.mark.parametrize("reply, low, high, expected", [
    ("The answer names the right shape. Score: 7", 0, 10, 0.7),
    ("Score: 3", 1, 5, 0.5),
    ("score=10", 0, 10, 1.0),
    ("I would give it 6", 0, 10, 0.6),  # no 'Score:': the last number
    ("Scores: 2 of 10 ... Score: 11", 0, 10, None),  # out of range: asked again, not clipped
    ("no number at all", 0, 10, None),
])
def test_scores_are_read_from_the_reply_and_scaled(reply, low, high, expected):
    assert parse_score(reply, low, high) == (pytest.approx(expected) if expected is not None else None)


def test_a_rubric_must_show_the_judge_the_question_and_the_completion():
    with pytest.raises(ValueError, match="must contain {completion}"):
        load_spec(ROOT / "configs" / "demo_grpo.yaml",
                  ["online.judge={base_url: 'http://127.0.0.1:1/v1', model: m, rubric: 'Q: {question}'}"])


def judged(completion: str) -> int | None:
    """The test judge's verdict: None (HTTP 500) for a third of the completions, else 0..10."""
    key = zlib.crc32(completion.encode())
    return None if key % 3 == 0 else key % 11


class Judge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        (message,) = body["messages"]
        images = [base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                  for part in message["content"] if part["type"] == "image_url"]
        (text,) = [part["text"] for part in message["content"] if part["type"] == "text"]
        completion = text.split("Answer to grade: ", 1)[1].split("\nRate how", 1)[0]
        verdict = judged(completion)
        with self.server.lock:
            self.server.seen.append({"text": text, "images": images, "completion": completion, "verdict": verdict})
        if verdict is None:
            self.send_error(500)
            return
        reply = json.dumps({"choices": [{"message": {"content": f"Plausible. Score: {verdict}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    server.seen, server.lock = [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_grpo_with_a_judge_that_sees_each_prompts_image(ray_cluster, tmp_path, judge_server):
    run_dir, n, prompts = tmp_path / "run", 2, 4
    url = f"http://127.0.0.1:{judge_server.server_address[1]}/v1"
    overrides = ["trainer.max_steps=2", f"checkpoint.dir={tmp_path / 'ck'}", f"online.prompts_per_step={prompts}",
                 f"online.n={n}", "online.rewards=[]",
                 f"online.judge={{base_url: '{url}', model: test-judge, retries: 0, rows_per_task: 5}}"]
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    seen = judge_server.seen
    assert len(seen) == 2 * prompts * n  # one request per sample, none retried (retries: 0)
    records = [json.loads(line) for line in (SHAPES / "prompts.jsonl").read_text().splitlines()]
    for request in seen:  # the image sent is the one of a record with this question and answer
        (png,) = request["images"]
        sent = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        question = request["text"].split("Question: ", 1)[1].split("\n", 1)[0]
        answer = request["text"].split("Reference answer: ", 1)[1].split("\n", 1)[0]
        candidates = [r["image"] for r in records if r["prompt"] == question and r["answer"] == answer]
        assert candidates, (question, answer)
        assert any(np.array_equal(sent, np.asarray(load_image(path, image_root=SHAPES))) for path in candidates)
    steps = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row, requests in zip(steps, (seen[:prompts * n], seen[prompts * n:]), strict=True):
        scores = [0.0 if r["verdict"] is None else r["verdict"] / 10 for r in requests]  # fallback 0
        assert row["train/judge"] == pytest.approx(sum(scores) / len(scores), abs=1e-6)
        assert row["train/reward"] == pytest.approx(row["train/judge"], abs=1e-6)  # the only reward, weight 1
        assert row["train/judge_failures"] == sum(r["verdict"] is None for r in requests)
    assert sum(row["train/judge_failures"] for row in steps) > 0  # the fallback path ran
