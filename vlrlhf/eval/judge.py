"""Judges: a language model that grades or extracts answers where rules do not suffice.

    judge = HTTPJudge(JudgeSpec(base_url="http://127.0.0.1:8000/v1", model="gpt-4o", api_key_env="OPENAI_API_KEY"))
    replies = judge.ask_many(prompts, parse=parse_score)   # parsed values, None where it never parsed

One interface (`ask_many`); `HTTPJudge` speaks the OpenAI-compatible chat completions
API (timeouts, retries with exponential backoff on errors, HTTP 5xx/429 and replies
that do not parse, a concurrency limit) and keeps a disk cache of parsed-OK replies
keyed by model and prompt, so a rerun sends nothing already answered. `NoJudge`
answers nothing: the scorers report those items as unscored. The key is read from
the environment variable the spec names and never appears in logs, errors or files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable


@dataclasses.dataclass
class JudgeSpec:
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"  # the variable's name, never the key
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    concurrency: int = 4
    max_tokens: int = 256
    cache: str | None = None  # a JSONL file of earlier replies

    def public(self) -> dict:
        """What may be written to result files."""
        return {"base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env}


class JudgeError(RuntimeError):
    """A judge request that failed for good (after its retries)."""


class NoJudge:
    """Answers nothing; scorers count what they could not score."""

    available = False
    requests = 0

    def ask_many(self, prompts: list, parse: Callable[[str], object]) -> list:
        return [None] * len(prompts)


class ReplyCache:
    """prompt hash -> reply, appended to a JSONL file; only replies that parsed are stored."""

    def __init__(self, path: str | None):
        self.path = pathlib.Path(path) if path else None
        self.replies: dict[str, str] = {}
        self.lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.replies[entry["key"]] = entry["reply"]

    @staticmethod
    def key(model: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([model, prompt]).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        with self.lock:
            self.replies[key] = reply
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as handle:
                    handle.write(json.dumps({"key": key, "reply": reply}) + "\n")


class HTTPJudge:
    available = True

    def __init__(self, spec: JudgeSpec):
        self.spec = spec
        self.key = os.environ.get(spec.api_key_env, "") if spec.api_key_env else ""
        self.cache = ReplyCache(spec.cache)
        self.requests = 0  # HTTP requests sent (tests: cache hits send none)
        self._count = threading.Lock()

    def redact(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text

    def _post(self, prompt: str | list) -> str:
        """`prompt`: the user turn's text, or its content parts (text and image_url parts: a VLM judge)."""
        body = json.dumps({"model": self.spec.model, "temperature": 0.0, "max_tokens": self.spec.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(self.spec.base_url.rstrip("/") + "/chat/completions", data=body,
                                         headers=headers, method="POST")
        with self._count:
            self.requests += 1
        with urllib.request.urlopen(request, timeout=self.spec.timeout_s) as response:
            payload = json.loads(response.read().decode())
        return payload["choices"][0]["message"]["content"]

    def ask(self, prompt: str | list, parse: Callable[[str], object]):
        """The parsed reply; retried on transport errors, 5xx/429 and unparseable replies."""
        key = ReplyCache.key(self.spec.model, prompt)
        cached = self.cache.get(key)
        if cached is not None:
            return parse(cached)
        last = "no attempt"
        for attempt in range(self.spec.retries + 1):
            if attempt:
                time.sleep(self.spec.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self._post(prompt)
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code}"
                if error.code < 500 and error.code != 429:  # a client error does not heal by retrying
                    break
                continue
            except (urllib.error.URLError, TimeoutError, OSError) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
                continue
            except (KeyError, IndexError, TypeError, json.JSONDecodeError):
                last = "a response without choices[0].message.content"
                continue
            value = parse(reply)
            if value is not None:
                self.cache.put(key, reply)
                return value
            last = f"an unparseable reply {reply[:80]!r}"
        raise JudgeError(self.redact(f"judge {self.spec.model} at {self.spec.base_url}: gave up after "
                                     f"{self.spec.retries + 1} attempt(s), last: {last}"))

    def ask_many(self, prompts: list, parse: Callable[[str], object]) -> list:
        """Parsed replies in order; a prompt that failed for good gives None (and is reported)."""
        def one(prompt):
            try:
                return self.ask(prompt, parse)
            except JudgeError as error:
                print(f"warning: {error}", flush=True)
                return None

        with concurrent.futures.ThreadPoolExecutor(max(1, self.spec.concurrency)) as pool:
            return list(pool.map(one, prompts))


def make_judge(spec: JudgeSpec | dict | None):
    if spec is None:
        return NoJudge()
    return HTTPJudge(spec if isinstance(spec, JudgeSpec) else JudgeSpec(**spec))
