"""MathVista (Lu+ 2023): answers extracted by rules per answer type, a judge only where they fail.

Types (column `answer_type`): integer (the last number, as an integer), float (the
last number rounded to the `precision` column's places), list (a bracketed list of
numbers), text. Multiple-choice rows (`question_type` multi_choice, options in
columns A.. or a `choices` list literal) accept the option letter or the option text.
'answer is X' / 'answer: X' narrows the search to what follows. Where the rules find
nothing, a judge (if configured) is asked to extract the answer; else the item is
wrong and counted as unparsed.
"""

from __future__ import annotations

import ast
import re

from vlrlhf.eval.benchmarks.base import Benchmark, Score, accuracy_by, percent, prediction_of
from vlrlhf.eval.extract import choice_letter

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
EXTRACT_PROMPT = ("Extract the final answer from the model's response to the question. Reply with the answer only "
                  "(a number, a list, an option letter or a short phrase).\n\nQuestion: {question}\n\n"
                  "Response: {response}\n\nFinal answer:")


def focus(response: str) -> str:
    stated = re.split(r"answer\s*(?:is|:)\s*:?", response, flags=re.IGNORECASE)
    return stated[-1] if len(stated) > 1 else response


def choices_of(item) -> list[str]:
    if item.options:
        return list(item.options.values())
    raw = item.get("choices")
    if raw.startswith("["):
        return [str(c) for c in ast.literal_eval(raw)]
    return []


def extract(response: str, item) -> str | None:
    """The normalised answer the rules find, or None."""
    text = focus(response).strip()
    choices = choices_of(item)
    if item.get("question_type") == "multi_choice" and choices:
        options = {chr(ord("A") + i): c for i, c in enumerate(choices)}
        letter = choice_letter(text, options)
        return options.get(letter) if letter else None
    kind = item.get("answer_type") or "text"
    numbers = NUMBER.findall(text)
    if kind == "integer":
        return str(int(round(float(numbers[-1].replace(",", ""))))) if numbers else None
    if kind == "float":
        places = int(float(item.get("precision") or 2))
        return f"{round(float(numbers[-1].replace(',', '')), places):.{places}f}" if numbers else None
    if kind == "list":
        found = re.search(r"\[[^\[\]]*\]", text)
        return normalise_list(found.group(0)) if found else None
    return text.strip().strip(".").lower() or None


def normalise_list(text: str) -> str | None:
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return str([round(float(v), 4) if isinstance(v, int | float) else str(v).strip().lower() for v in values])


def normalise_answer(answer: str, item) -> str:
    kind = item.get("answer_type") or "text"
    if item.get("question_type") == "multi_choice":
        return answer.strip()
    if kind == "integer":
        return str(int(round(float(answer))))
    if kind == "float":
        places = int(float(item.get("precision") or 2))
        return f"{round(float(answer), places):.{places}f}"
    if kind == "list":
        return normalise_list(answer) or answer
    return answer.strip().strip(".").lower()


class MathVista(Benchmark):
    name = "mathvista"
    files = ("MathVista",)

    def score(self, items, predictions, judge=None) -> Score:
        extracted = {item.index: extract(prediction_of(predictions, item), item) for item in items}
        failed = [item for item in items if extracted[item.index] is None]
        judged = set()
        if failed and judge is not None and judge.available:
            prompts = [EXTRACT_PROMPT.format(question=item.question, response=predictions[item.index])
                       for item in failed]
            for item, reply in zip(failed, judge.ask_many(prompts, lambda r: r.strip() or None), strict=True):
                if reply is not None:
                    extracted[item.index] = extract(reply, item)
                    judged.add(item.index)
        details = []
        for item in items:
            value = extracted[item.index]
            details.append({"index": item.index, "prediction": predictions[item.index], "extracted": value,
                            "correct": value is not None and value == normalise_answer(item.answer, item),
                            "judge_extracted": item.index in judged, "task": item.get("task") or "all"})
        metrics = {"overall": percent(sum(d["correct"] for d in details), len(details))}
        metrics.update({f"task/{k}": v for k, v in accuracy_by(details, "task").items()})
        counts = {"items": len(details), "unparsed": sum(d["extracted"] is None for d in details),
                  "judge_extracted": len(judged)}
        return Score(self.name, "overall", metrics, details, counts)
