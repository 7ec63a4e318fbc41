"""A judge reward that sees the image: an OpenAI-compatible VLM endpoint grades each completion
(or a checkpoint on the job's own actor group, `online.judge.path`: actors/judge.py, which builds
the same requests with `judge_inputs`).

    online:
      judge: {base_url: http://judge:8000/v1, model: Qwen2.5-VL-72B-Instruct, weight: 1.0,
              api_key_env: JUDGE_API_KEY, min_score: 0, max_score: 10, fallback: 0.0}

Each request carries the prompt's images (PNG data URLs, after the data plane's own
loading and max_pixels) and a rubric filled with the question, the reference answer and
the completion; the judge's reply is parsed for a score in [min_score, max_score] ("Score:
7", else the last number in range) and scaled to [0, 1]. The requests go out from Ray
tasks that fetch the step's prompts by reference and load their images there, so the
driver never holds an image (the prompts' records reach it without them). The HTTP client
is the evaluation judge's (vlrlhf.eval.judge): time limits, retries with backoff on
errors and unparseable replies, a concurrency limit, an optional reply cache. A sample
whose request fails for good scores `fallback` and is counted (train/judge_failures).
"""

from __future__ import annotations

import base64
import io
import re

RUBRIC = ("You are grading an answer to a question about the image(s).\n"
          "Question: {question}\n"
          "Reference answer: {reference}\n"
          "Answer to grade: {completion}\n"
          "Rate how correct and faithful to the image the answer is, from {min_score} (wrong) to "
          "{max_score} (fully correct). End your reply with 'Score: N'.")
SCORE = re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str, low: float, high: float) -> float | None:
    """The score a reply gives, scaled to [0, 1]: the last 'Score: N', else the last number,
    when it lies in [low, high]; None otherwise (the client then asks again)."""
    found = SCORE.findall(reply) or NUMBER.findall(reply)
    if not found:
        return None
    value = float(found[-1])
    if not low <= value <= high:
        return None
    return (value - low) / (high - low)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def rubric_text(rubric: str, question: str, reference: str | None, completion: str, low: float,
                high: float) -> str:
    return rubric.format(question=question, reference=reference if reference is not None else "(none)",
                         completion=completion, min_score=f"{low:g}", max_score=f"{high:g}")


def request_content(text: str, images: list) -> list[dict]:
    """An OpenAI user turn's content parts: the images first, then the filled rubric."""
    return [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images] + \
        [{"type": "text", "text": text}]


def question_of(record) -> str:
    """The prompt's user text, without the image placeholders."""
    return "\n".join(m.content.replace("<image>", "").strip() for m in record.prompt if m.role == "user").strip()


def judge_inputs(share, settings, spec: dict) -> list[tuple[list, str]]:
    """(images, filled rubric) of each row of a RowsShare: where the step's prompts can be fetched
    (a Ray task or the judge's worker); each prompt's images are loaded once."""
    from vlrlhf.data.images import load_image
    from vlrlhf.rows import step_prompts

    records = [item.record for item in step_prompts(share.prompts)]
    images, out = {}, []
    for row in share.rows:
        record = records[row.request]
        if row.request not in images:
            images[row.request] = [load_image(source, image_root=settings.image_root,
                                              max_pixels=settings.max_pixels) for source in record.images]
        out.append((images[row.request], rubric_text(spec["rubric"], question_of(record), record.answer, row.text,
                                                     spec["min_score"], spec["max_score"])))
    return out


def judge_rows(share, settings, spec: dict) -> list[float | None]:
    """Scores in [0, 1] (None: the request failed for good) of a RowsShare's rows, from the
    HTTP judge (runs in a Ray task)."""
    from vlrlhf.eval.judge import HTTPJudge, JudgeSpec

    low, high = spec["min_score"], spec["max_score"]
    contents = [request_content(text, images) for images, text in judge_inputs(share, settings, spec)]
    client = HTTPJudge(JudgeSpec(**{k: spec[k] for k in ("base_url", "model", "api_key_env", "timeout_s", "retries",
                                                         "backoff_s", "concurrency", "max_tokens", "cache")}))
    return client.ask_many(contents, lambda reply: parse_score(reply, low, high))
