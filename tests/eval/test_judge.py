"""The judge against a real OpenAI-compatible HTTP server on 127.0.0.1 with scripted replies."""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time

import pytest

from tests.eval.fixtures import png_b64, write
from vlrlhf.eval.benchmarks import get_benchmark
from vlrlhf.eval.benchmarks.mmvet import grading_prompt, parse_score
from vlrlhf.eval.judge import HTTPJudge, JudgeError, JudgeSpec

SECRET = "sk-test-0123456789abcdef"


class ScriptedServer:
    """`script(prompt, attempt) -> (status, content, delay_s)`; records every request."""

    def __init__(self, script):
        self.script, self.requests, self.attempts = script, [], collections.Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                with server.lock:
                    server.attempts[prompt] += 1
                    attempt = server.attempts[prompt]
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "model": body["model"], "prompt": prompt})
                status, content, delay = server.script(prompt, attempt)
                time.sleep(delay)
                payload = content if isinstance(content, bytes) else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def spec(server, tmp_path, **overrides):
    return JudgeSpec(**{"base_url": server.url, "model": "grader", "api_key_env": "VLRLHF_TEST_JUDGE_KEY",
                        "timeout_s": 2.0, "retries": 3, "backoff_s": 0.01, "concurrency": 2,
                        "cache": str(tmp_path / "cache.jsonl"), **overrides})


def test_retries_on_500_and_malformed_replies_then_caches(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("VLRLHF_TEST_JUDGE_KEY", SECRET)
    script = {1: (500, "boom", 0), 2: (200, b"{not json", 0), 3: (200, "a fine answer, I would say", 0),
              4: (200, "0.6", 0)}
    server = serve(lambda prompt, attempt: script[attempt])
    judge = HTTPJudge(spec(server, tmp_path))
    assert judge.ask("grade this", parse_score) == 0.6
    assert judge.requests == 4 and server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["auth"] == f"Bearer {SECRET}" and server.requests[0]["model"] == "grader"
    again = HTTPJudge(spec(server, tmp_path))  # a rerun: answered from the disk cache, nothing sent
    assert again.ask("grade this", parse_score) == 0.6 and again.requests == 0 and len(server.requests) == 4
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()


def test_timeouts_are_retried_and_a_dead_judge_fails_clearly_without_the_key(serve, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLRLHF_TEST_JUDGE_KEY", SECRET)
    server = serve(lambda prompt, attempt: (200, "0.3", 1.0) if prompt == "slow" and attempt == 1 else
                   (500, "down", 0) if prompt == "dead" else (200, "0.3", 0))
    judge = HTTPJudge(spec(server, tmp_path, timeout_s=0.3, retries=2))
    assert judge.ask("slow", parse_score) == 0.3 and server.attempts["slow"] == 2
    with pytest.raises(JudgeError, match="gave up after 3 attempt.*HTTP 500") as error:
        judge.ask("dead", parse_score)
    assert SECRET not in str(error.value)
    assert judge.ask_many(["dead", "fine"], parse_score) == [None, 0.3]  # reported, not silently zero
    assert "gave up" in capsys.readouterr().out


def test_a_client_error_is_not_retried(serve, tmp_path, monkeypatch):
    monkeypatch.setenv("VLRLHF_TEST_JUDGE_KEY", SECRET)
    server = serve(lambda prompt, attempt: (401, "bad key", 0))
    with pytest.raises(JudgeError, match="HTTP 401"):
        HTTPJudge(spec(server, tmp_path)).ask("x", parse_score)
    assert len(server.requests) == 1


def test_mmvet_scores_by_the_judge_per_capability(serve, tmp_path):
    grades = {"x = -1": "0.5", "It is a cat.": "Correctness: 1.0"}
    server = serve(lambda prompt, attempt: (200, next(v for k, v in grades.items()
                                                     if f"| {k} |" in prompt.splitlines()[-1]), 0))
    rows = [{"index": 0, "image": png_b64(), "question": "What is x?", "answer": "-1 <AND> -5",
             "capability": "math,ocr"},
            {"index": 1, "image": png_b64(), "question": "Which animal?", "answer": "cat", "capability": "rec"}]
    bench = get_benchmark("mmvet")
    items = bench.read(write(tmp_path / "MMVet.tsv", rows))
    score = bench.score(items, {"0": "x = -1", "1": "It is a cat."}, HTTPJudge(spec(server, tmp_path)))
    assert score.metrics == {"total": 75.0, "math": 50.0, "ocr": 50.0, "rec": 100.0}
    prompt = server.requests[0]["prompt"]
    assert "<AND>" in prompt and "0.0" in prompt and "1.0" in prompt
    assert prompt.rstrip().endswith("|") and "Question | Ground truth | Prediction | Correctness" in prompt
    assert grading_prompt("a|b", "c", "d").splitlines()[-1] == "a/b | c | d |"  # cells cannot break the table


def test_mathvista_asks_the_judge_only_where_rules_fail(serve, tmp_path):
    server = serve(lambda prompt, attempt: (200, "7", 0))
    rows = [{"index": 1, "image": png_b64(), "question": "How many?", "answer": "12", "question_type": "free_form",
             "answer_type": "integer"},
            {"index": 2, "image": png_b64(), "question": "How many?", "answer": "7", "question_type": "free_form",
             "answer_type": "integer"}]
    bench = get_benchmark("mathvista")
    items = bench.read(write(tmp_path / "MathVista.tsv", rows))
    score = bench.score(items, {"1": "12 of them", "2": "seven, I believe"}, HTTPJudge(spec(server, tmp_path)))
    assert [d["correct"] for d in score.details] == [True, True] and score.counts["judge_extracted"] == 1
    assert len(server.requests) == 1 and "seven, I believe" in server.requests[0]["prompt"]
