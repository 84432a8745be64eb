"""Question sets (``cart.questions/1`` JSONL) for ``cart eval``: loading, checking, and the chat
messages and reference answer each question turns into.

One object per line::

    {"schema": "cart.questions/1", "id": "q1", "question": "Who ...?",
     "answers": ["Ada Lovelace", "Lovelace"], "metric": "contains"}

``question`` (a string) or ``messages`` (chat messages ending with the user's turn); ``answers``
(the first is the reference answer, the rest aliases) or ``answer`` (a string or such a list);
optional ``choices`` (options A, B, ...; ``answers`` then holds the letter); optional ``metric``
(default ``multiple_choice`` with choices, else ``contains``). ``schema`` and ``id`` are
optional, so that question sets as people have them (``{"question": ..., "answer": ...}``)
read as they are: a record without ``schema`` is of the current version, one without ``id`` is
named ``line-N`` after its line. Other fields are kept and ignored.
"""

from __future__ import annotations

import string
from typing import Any

from cart.io import CartError, check_schema, display_name, parse_jsonl, read_jsonl, require

ROLES = ("system", "user", "assistant")
# The longest question, message or answer text: far beyond any model's context, yet small
# enough that a runaway file (a corpus pasted into a question) fails here, at its line.
MAX_TEXT_CHARS = 100_000


def default_metric(question: dict[str, Any]) -> str:
    return "multiple_choice" if question.get("choices") else "contains"


def load_questions(path: str, data: bytes | None = None) -> list[dict[str, Any]]:
    """Read and check a question file (``data``: its bytes, already read -- e.g. stdin); each
    question gets ``metric`` resolved and ``line`` (FILE:LINE)."""
    from cart.metrics import METRICS

    questions: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    instances: dict[str, Any] = {}
    lines = (read_jsonl(path) if data is None else
             parse_jsonl(data.splitlines(keepends=True), display_name(path)))
    for line in lines:
        q, where = line.record, line.where
        if not isinstance(q, dict) or "schema" in q:  # no schema: the current version
            check_schema(q, "questions", where)
        qid = require(q, "id", str, where) if "id" in q else f"line-{line.lineno}"
        if not qid.strip():
            raise CartError(f"{where}: field 'id' is empty")
        if qid in seen:
            raise CartError(f"{where}: duplicate id {qid!r} (first on line {seen[qid]})")
        seen[qid] = line.lineno
        if ("question" in q) == ("messages" in q):
            raise CartError(f"{where}: give exactly one of the fields 'question' and 'messages'")
        if "question" in q:
            if not require(q, "question", str, where).strip():
                raise CartError(f"{where}: field 'question' is empty")
            _check_length(q["question"], "question", where)
        else:
            _check_messages(require(q, "messages", list, where), where)
        answers = _answers(q, where)
        if "choices" in q and not isinstance(q["choices"], list):
            raise CartError(f"{where}: field 'choices' must be list, got {type(q['choices']).__name__}")
        for i, choice in enumerate(q.get("choices") or []):
            if isinstance(choice, str):
                _check_length(choice, f"choices[{i}]", where)
        q = {**q, "id": qid, "answers": answers}
        metric = q.get("metric", default_metric(q))
        if not isinstance(metric, str):
            raise CartError(f"{where}: field 'metric' must be str, got {type(metric).__name__}")
        if metric not in METRICS:
            raise CartError(f"{where}: unknown metric {metric!r} (known: {', '.join(sorted(METRICS))})")
        if metric not in instances:
            instances[metric] = METRICS[metric]()
        instances[metric].check(q, where)
        if q.get("choices") and metric != "multiple_choice":
            raise CartError(f"{where}: field 'choices' needs metric multiple_choice, got {metric!r}")
        questions.append({**q, "metric": metric, "line": where})
    if not questions:
        raise CartError(f"{display_name(path)}: no questions")
    return questions


def _answers(q: dict[str, Any], where: str) -> list[str]:
    """The reference answer and its aliases, from ``answers`` (a list) or ``answer`` (a string
    or a list, as most public question sets have it)."""
    if "answers" in q and "answer" in q:
        raise CartError(f"{where}: give only one of the fields 'answers' and 'answer'")
    field = "answer" if "answer" in q else "answers"  # neither: "missing field 'answers'"
    value = require(q, field, list if field == "answers" else (str, list), where)
    answers = [value] if isinstance(value, str) else value
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        what = "a non-empty string or list" if field == "answer" else "a non-empty list"
        raise CartError(f"{where}: field '{field}' must be {what} of non-empty strings")
    for i, a in enumerate(answers):
        _check_length(a, f"{field}[{i}]" if isinstance(value, list) else field, where)
    return answers


def _check_length(text: str, field: str, where: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise CartError(f"{where}: field '{field}' is {len(text)} characters long, more than "
                        f"{MAX_TEXT_CHARS}")


def _check_messages(messages: list, where: str) -> None:
    if not messages:
        raise CartError(f"{where}: field 'messages' is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise CartError(f"{where}: messages[{i}] must be an object with a string 'content'")
        _check_length(m["content"], f"messages[{i}].content", where)
        if m.get("role") not in ROLES:
            raise CartError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}, "
                            f"got {m.get('role')!r}")
    if messages[-1]["role"] != "user":
        raise CartError(f"{where}: the last of 'messages' must be the user's turn")


def question_messages(q: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat turns that ask the question (options listed under it for multiple choice)."""
    if "messages" in q:
        msgs = [dict(m) for m in q["messages"]]
    else:
        msgs = [{"role": "user", "content": q["question"]}]
    if q.get("choices"):
        letters = string.ascii_uppercase
        options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(q["choices"]))
        msgs[-1]["content"] = (f"{msgs[-1]['content']}\n{options}\n"
                               f"Answer with the letter of the correct option.")
    return msgs


def reference_answer(q: dict[str, Any]) -> str:
    """The text whose likelihood is measured: the first answer ("B. <option>" for choices)."""
    if q.get("choices"):
        i = string.ascii_uppercase.index(q["answers"][0].strip().upper())
        return f"{q['answers'][0].strip().upper()}. {q['choices'][i]}"
    return q["answers"][0]
