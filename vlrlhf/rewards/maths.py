"""The `math` reward: the final answer of a completion, checked for symbolic equivalence.

    rewards:
      - {function: math}                                  # the last \\boxed{...}
      - {function: math, options: {marker: "<answer>"}}   # or what follows the last <answer>
      - {function: format_match, weight: 0.1, options: {pattern: '<think>.*</think>.*\\\\boxed\\{.*\\}.*'}}

The answer is read from the completion (`final_answer`), both it and `record.answer` are
parsed as LaTeX by math-verify (fractions, roots, degrees, percentages, intervals, sets,
`x=3` against `3`) and compared with sympy. A completion with no boxed answer (or no marker)
scores 0: the reward asks for a final answer, not for a number somewhere in the text.

sympy can take unbounded time on a pathological expression (`9^{9^{9^9}}`), and a Python
thread cannot be interrupted, so the checks run in a child process (`Checker`); a check
that runs past `check_timeout_s` gets its child killed and restarted, scores 0 and is
printed with its record id. Nothing else in the batch is lost.
"""

from __future__ import annotations

import atexit
import json
import queue
import subprocess
import sys
import threading

BOXES = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when absent
    or unclosed."""
    start = max(text.rfind(box) for box in BOXES)
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0 or text[start:opening].strip() not in BOXES:
        return None
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1:index].strip()
    return None


def final_answer(text: str, marker: str | None = None) -> str | None:
    """What the completion gives as its answer: after the last `marker` when one is set (up to
    its closing tag, `</answer>` for `<answer>`), and within that the last \\boxed{} if any;
    without a marker, the last \\boxed{}. None when there is no answer to read."""
    if marker is None:
        return last_boxed(text)
    at = text.rfind(marker)
    if at < 0:
        return None
    rest = text[at + len(marker):]
    if marker.startswith("<") and marker.endswith(">") and not marker.startswith("</"):
        closing = "</" + marker[1:]
        rest = rest.split(closing, 1)[0]
    boxed = last_boxed(rest)
    answer = boxed if boxed is not None else rest.strip()
    return answer or None


class Checker:
    """A child process that answers 'are these two answers equal?' one JSON line at a time."""

    def __init__(self):
        self.process = None
        self.lines: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.timeouts = 0
        self.fresh = True  # the first answer of a new child also waits for its imports

    def _start(self):
        self.fresh = True
        self.process = subprocess.Popen([sys.executable, "-m", "vlrlhf.rewards.maths"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines = queue.Queue()
        out, lines = self.process.stdout, self.lines
        threading.Thread(target=lambda: [lines.put(line) for line in out] + [lines.put(None)], daemon=True,
                         name="math-checker-reader").start()

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def check(self, pairs: list[tuple[str, str]], timeout_s: float, labels: list[str]) -> list[bool | None]:
        """One verdict per (answer, guess) pair; None for a check that ran past timeout_s."""
        with self.lock:
            verdicts: list[bool | None] = []
            while len(verdicts) < len(pairs):
                if self.process is None or self.process.poll() is not None:
                    self._start()
                pending = pairs[len(verdicts):]
                for answer, guess in pending:  # the child answers in order as it goes
                    self.process.stdin.write(json.dumps([answer, guess]) + "\n")
                self.process.stdin.flush()
                for _ in pending:
                    limit = timeout_s + (30.0 if self.fresh else 0.0)  # sympy and math-verify's imports
                    try:
                        line = self.lines.get(timeout=limit)
                    except queue.Empty:
                        line = "timeout"
                    if line is None or line == "timeout":
                        label = labels[len(verdicts)]
                        cause = f"ran past {timeout_s:g} s" if line == "timeout" else "lost its process"
                        print(f"math reward: the check of {label} {cause} (scored 0)", file=sys.stderr, flush=True)
                        self.timeouts += 1
                        verdicts.append(None)
                        self.stop()
                        break
                    self.fresh = False
                    verdicts.append(json.loads(line))
            return verdicts


CHECKER = Checker()
atexit.register(CHECKER.stop)


def math(completions, records, *, marker: str | None = None, check_timeout_s: float = 5.0) -> list[float]:
    """1 when the completion's final answer (see final_answer) is equivalent to record.answer."""
    pairs, where, labels = [], [], []
    out = [0.0] * len(completions)
    for index, (completion, record) in enumerate(zip(completions, records, strict=True)):
        if record.answer is None:
            raise ValueError(f"record {record.id} has no answer for the math reward")
        guess = final_answer(completion, marker)
        if guess is not None:
            pairs.append((str(record.answer), guess))
            where.append(index)
            labels.append(f"record {record.id} (sample {index})")
    for index, verdict in zip(where, CHECKER.check(pairs, check_timeout_s, labels) if pairs else [], strict=True):
        out[index] = float(bool(verdict))
    return out


def equivalent(answer: str, guess: str) -> bool:
    """In the checker process: both sides parsed as LaTeX (a boxed expression), then compared."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    found = parse(f"\\boxed{{{guess}}}", parsing_timeout=None)
    return bool(gold and found and verify(gold, found, timeout_seconds=None))


def serve() -> None:
    import logging

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # 'timeout disabled': the parent keeps time
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    for line in sys.stdin:
        answer, guess = json.loads(line)
        try:
            verdict = equivalent(answer, guess)
        except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
            verdict = False
        sys.stdout.write(json.dumps(verdict) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
