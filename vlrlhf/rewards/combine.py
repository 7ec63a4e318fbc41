"""Several rewards, weighted, with a policy for functions that fail.

    rewards = RewardSet([RewardTerm("exact_match", weight=1.0),
                         RewardTerm("my_pkg.rewards:style", weight=0.2, on_error="fallback", fallback=0.0)])
    result = rewards.score(completions, records)   # result.total, result.terms[name], result.failures[name]

A function is called once per batch. When it raises, returns the wrong number of
values, or gives NaN/inf, the failing samples are found (one call per sample after a
batch error) and either the job stops with an error naming the function, the sample
(record id and index) and the cause (`on_error: raise`, default) or those samples get
the term's `fallback` value and are counted (`on_error: fallback`). Never a silent zero.

A call that takes longer than the term's `timeout_s` (60 s) fails every sample of the
batch the same way (a verifier that never answers must not hang the job): it runs in a
daemon thread, which is left behind when it does not return.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from collections import Counter
from collections.abc import Callable


class RewardError(ValueError):
    """A reward function failed on a sample under on_error=raise."""


class RewardTimeout(RuntimeError):
    """A reward call ran past its term's timeout_s."""


def call_with_limit(function: Callable, timeout_s: float | None, *args, **kwargs):
    """function(*args, **kwargs), or RewardTimeout after timeout_s (the call goes on in a daemon
    thread that nothing waits for)."""
    if timeout_s is None:
        return function(*args, **kwargs)
    box = {}

    def target():
        try:
            box["value"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True, name="reward-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardTimeout(f"took longer than {timeout_s:g} s (timeout_s)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclasses.dataclass
class RewardTerm:
    function: str  # a built-in name or 'package.module:function'
    weight: float = 1.0
    options: dict = dataclasses.field(default_factory=dict)
    on_error: str = "raise"  # raise | fallback
    fallback: float = 0.0
    timeout_s: float | None = 60.0  # per call; None: no limit

    def __post_init__(self):
        if self.on_error not in ("raise", "fallback"):
            raise ValueError(f"reward {self.function}: on_error={self.on_error!r} must be 'raise' or 'fallback'")


@dataclasses.dataclass
class RewardResult:
    total: list[float]
    terms: dict[str, list[float]]
    failures: Counter


def load_function(name: str) -> Callable:
    from vlrlhf.rewards.builtin import BUILTINS

    if name in BUILTINS:
        return BUILTINS[name]
    if ":" not in name:
        raise ValueError(f"reward function {name!r} is neither a built-in ({', '.join(sorted(BUILTINS))}) "
                         "nor 'package.module:function'")
    from vlrlhf.models.registry import import_object

    return import_object(name, "reward function")


def check_options(term: RewardTerm, function: Callable) -> None:
    """`options` must fit the function's keywords: a misspelt option is an error, not ignored."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    try:
        signature.bind([], [], **term.options)
    except TypeError as error:
        raise ValueError(f"reward {term.function}: options {term.options} do not fit {function.__name__}"
                         f"{signature} ({error})") from None


class RewardSet:
    def __init__(self, terms: list[RewardTerm]):
        if not terms:
            raise ValueError("at least one reward function is needed")
        self.terms = terms
        self.functions = [load_function(term.function) for term in terms]
        for term, function in zip(terms, self.functions, strict=True):
            check_options(term, function)

    def score(self, completions: list[str], records: list) -> RewardResult:
        failures: Counter = Counter()
        per_term = {}
        total = [0.0] * len(completions)
        for term, function in zip(self.terms, self.functions, strict=True):
            values = self._term_values(term, function, completions, records, failures)
            per_term[term.function] = values
            total = [t + term.weight * v for t, v in zip(total, values, strict=True)]
        return RewardResult(total, per_term, failures)

    def _term_values(self, term, function, completions, records, failures) -> list[float]:
        try:
            values = list(call_with_limit(function, term.timeout_s, completions, records, **term.options))
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
            problems = {}
        except RewardTimeout as error:  # one by one would wait as long again for each sample
            values = [math.nan] * len(completions)
            problems = {index: f"the batch call {error}" for index in range(len(completions))}
        except Exception as error:  # find the failing samples one by one
            values, problems = [], {}
            for index, (completion, record) in enumerate(zip(completions, records, strict=True)):
                try:
                    (value,) = call_with_limit(function, term.timeout_s, [completion], [record], **term.options)
                except Exception as sample_error:  # noqa: BLE001  (any failure of user code is reported)
                    problems[index] = f"raised {type(sample_error).__name__}: {sample_error}"
                    value = math.nan
                values.append(value)
            if not problems:  # only the batch call failed: report it as such
                problems = {index: f"the batch call raised {type(error).__name__}: {error}"
                            for index in range(len(completions))}
        out = []
        for index, value in enumerate(values):
            try:
                number = float(value)
            except (TypeError, ValueError):
                problems.setdefault(index, f"returned {value!r}, not a number")
                number = math.nan
            if not math.isfinite(number):
                problems.setdefault(index, f"returned {number}")
            out.append(number)
        for index, cause in sorted(problems.items()):
            record = records[index]
            if term.on_error == "raise":
                raise RewardError(f"reward {term.function} failed on sample {index} (record "
                                  f"{getattr(record, 'id', '?')}): {cause}")
            out[index] = term.fallback
            failures[term.function] += 1
        return out
