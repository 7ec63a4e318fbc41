"""The judge role (online.judge.path): a checkpoint on its own actor group grades completions
with the prompt's images. `expected` scoring is checked against a brute-force reading of the
score tokens' probabilities, one teacher-forced forward per score; the time limit with a real
Ray task that is too slow; a GRPO run with the judge on its own actor group."""

from __future__ import annotations

import json
import math
import pathlib
import time

import pytest

from actors.generator import user_turn
from actors.judge import PREFIX, JudgeWorker, score_tokens
from jobs.online import finish_judging, share_sizes
from jobs.run import run_job
from vlrlhf.config import JudgeRewardSpec, load_spec
from tests.actors.rollout_check import circle

ROOT = pathlib.Path(__file__).resolve().parents[2]


def judge_spec(path, **fields) -> dict:
    return JudgeRewardSpec(path=str(path), **fields).model_dump()


def brute_force(engine, request: dict, low: int, high: int) -> float:
    """sum_s p(s) s / sum_s p(s), each p(s) = p("Score:" then s) / p("Score:") from its own
    unpadded forward, scaled to [0, 1]."""
    tokenizer = engine.adapter.tokenizer
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    logps = []
    for value in range(low, high + 1):
        token = tokenizer.encode(f"{PREFIX} {value}", add_special_tokens=False)[-1]
        logps.append(engine.logprobs([request], [prefix + [token]])[0][-1])
    weights = [math.exp(v) for v in logps]
    mean = sum(w * s for w, s in zip(weights, range(low, high + 1), strict=True)) / sum(weights)
    return (mean - low) / (high - low)


def test_expected_scores_are_the_score_tokens_probability_weighted_mean(tiny_path):
    worker = JudgeWorker(judge_spec(tiny_path("llava"), scoring="expected", min_score=0, max_score=9,
                                    micro_batch_size=3))
    texts = ["Question: What colour?\nAnswer to grade: red\nScore it.", "Question: What shape?\nAnswer to grade: "
             "a big blue square with four equal sides\nScore it."]
    requests = [{"messages": user_turn(text, 1), "images": [circle(colour)]}
                for colour in ("red", "blue") for text in texts]
    scores = worker.expected(requests)  # micro-batches of 3, left-padded: the prompts differ in length
    expected = [brute_force(worker.engine, request, 0, 9) for request in requests]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert all(0 <= s <= 1 for s in scores)
    assert abs(scores[0] - scores[2]) > 1e-6  # the image reaches the judge: red and blue differ


def test_generate_scoring_reads_the_greedy_reply_to_the_request_the_http_judge_would_get(ray_cluster, tiny_path):
    """The worker builds each row's request from the step's prompts in the object store: the
    prompt's image, then the rubric filled with its question, answer and the row's completion.
    Its score is the one parse_score reads from a greedy reply to that request."""
    import ray

    from actors.rollout import Sampling
    from vlrlhf.data.images import load_image
    from vlrlhf.data.pipeline import EncodedItem, EncodeSettings
    from vlrlhf.data.records import Message, PromptRecord
    from vlrlhf.rewards.judge import RUBRIC, parse_score, rubric_text
    from vlrlhf.rows import Row, RowsShare

    shapes = str(ROOT / "data" / "shapes")
    settings = EncodeSettings(model_path=str(tiny_path("llava")), task="prompt", image_root=shapes)

    records = [PromptRecord(id=f"p:{i}", images=[image], prompt=[Message(role="user", content=f"<image>\n{question}")],
                            answer=answer)
               for i, (image, question, answer) in enumerate([("images/train/00000.png", "What colour?", "red"),
                                                              ("images/train/00001.png", "What shape?", "circle")])]
    prompts = [ray.put([EncodedItem(i, r.id, r, None) for i, r in enumerate(records)])]
    rows = [Row(None, request, [], text=text) for request, text in ((0, "red"), (0, "blue"), (1, "a square"))]
    worker = JudgeWorker(judge_spec(tiny_path("llava"), max_tokens=12, min_score=0, max_score=10))
    scores = worker.judge_rows(RowsShare(prompts, rows, 8), settings)

    replies = []
    for row in rows:
        record = records[row.request]
        image = load_image(record.images[0], image_root=settings.image_root)
        text = rubric_text(RUBRIC, record.prompt[0].content.replace("<image>", "").strip(), record.answer, row.text,
                           0, 10)
        assert f"Question: {'What colour?' if row.request == 0 else 'What shape?'}" in text
        (sample,) = worker.engine.generate([{"messages": user_turn(text, 1), "images": [image]}],
                                           Sampling(n=1, temperature=0.0, max_tokens=12))
        replies.append(sample.text)
    assert scores == [parse_score(reply, 0, 10) for reply in replies]
    assert len(set(replies)) > 1  # the completion reaches the judge


def test_scores_must_be_single_tokens_for_expected_scoring(tiny_path):
    worker = JudgeWorker(judge_spec(tiny_path("llava")))  # generate: any range
    tokenizer = worker.engine.adapter.tokenizer
    prefix, ids = score_tokens(tokenizer, 0, 9)
    assert [tokenizer.decode(prefix + [i]).strip() for i in ids] == [f"{PREFIX} {v}" for v in range(10)]
    if len(tokenizer.encode(f"{PREFIX} 10", add_special_tokens=False)) != len(prefix) + 1:
        with pytest.raises(ValueError, match=r"score\(s\) \[10\] are not one distinct token"):
            score_tokens(tokenizer, 0, 10)


def test_judge_spec_needs_one_source_and_expected_needs_a_local_transformers_judge():
    with pytest.raises(ValueError, match="either base_url .* or path"):
        JudgeRewardSpec(base_url="http://127.0.0.1:1/v1", model="m", path="/x")
    with pytest.raises(ValueError, match="either base_url .* or path"):
        JudgeRewardSpec()
    with pytest.raises(ValueError, match="needs model"):
        JudgeRewardSpec(base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="needs path with engine transformers"):
        JudgeRewardSpec(base_url="http://127.0.0.1:1/v1", model="m", scoring="expected")
    with pytest.raises(ValueError, match="needs path with engine transformers"):
        JudgeRewardSpec(path="/x", engine="vllm", scoring="expected")


def test_a_judge_call_past_its_time_limit_scores_its_share_the_fallback(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def answer(seconds: float, scores: list):
        time.sleep(seconds)
        return scores

    ray.get(answer.remote(0.0, []))  # a worker process is up: the limit measures the call, not its start
    judge = JudgeRewardSpec(path="/unused", timeout_s=3.0, fallback=0.25)
    calls = [answer.remote(0.0, [0.5, None, 1.0]), answer.remote(30.0, [1.0, 1.0])]
    started = time.monotonic()
    scores, failed = finish_judging(judge, calls, [3, 2], wait=True)
    assert time.monotonic() - started < 15  # the slow share was not waited for
    assert scores.tolist() == [0.5, 0.25, 1.0, 0.25, 0.25] and failed == 3
    ray.cancel(calls[1], force=True)
    assert share_sizes(7, 3) == [3, 3, 1] and share_sizes(2, 4) == [1, 1]


def test_grpo_with_a_judge_on_its_own_actor_group(ray_cluster, tmp_path):
    """The judge is the policy's own starting checkpoint (a tiny LLaVA), one worker on half a CPU,
    reading the score tokens' probabilities; it is the only reward."""
    run_dir, n, prompts = tmp_path / "run", 2, 4
    overrides = ["trainer.max_steps=2", f"checkpoint.dir={tmp_path / 'ck'}", f"online.prompts_per_step={prompts}",
                 f"online.n={n}", "online.rewards=[]", "resources.judge={num_workers: 1, cpus: 0.5}",
                 "online.judge={path: 'tiny:llava', scoring: expected, min_score: 1, max_score: 5}"]
    spec = load_spec(ROOT / "configs" / "demo_grpo.yaml", overrides)
    assert spec.online.judge.path.endswith("llava")  # tiny: paths resolve for the judge too
    assert run_job(str(ROOT / "configs" / "demo_grpo.yaml"), overrides, run_dir=str(run_dir)) == 0
    steps = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/reward" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row in steps:
        assert 0 < row["train/judge"] < 1 and row["train/judge_failures"] == 0
        assert row["train/reward"] == pytest.approx(row["train/judge"], abs=1e-6)  # the only reward, weight 1
    assert steps[0]["train/judge"] != steps[1]["train/judge"]  # other prompts, other completions
