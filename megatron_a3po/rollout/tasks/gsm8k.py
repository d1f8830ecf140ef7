"""GSM8K: grade-school maths word problems with a numeric final answer.

Prompt (the reference one): ``question + "\\nPlease put your final answer within \\boxed{}."`` through
the tokenizer's chat template when it has one.

Reward: 1.0 if the response's final answer equals the reference, else 0.0. The response's answer is the
content of its last ``\\boxed{...}``, else the text after its last ``####``; the reference is the text
after ``####`` in the dataset's ``answer`` field. Both are normalised (``,``/``$``/spaces removed); equal
numbers match at once, anything else is checked by math-verify (parse + verify); a parse failure scores 0.
math-verify can run for ever on some answers (``\\boxed{9^{9^{9^{9}}}}``: a big-integer power in C that
holds the GIL, so no timeout inside this process can fire); the bound is the rollout's reward worker,
killed at ``reward_timeout_s`` (rollout/rewards.py), where that answer scores 0.
"""

from __future__ import annotations

import re
from fractions import Fraction

from math_verify import parse, verify  # at import: a reward worker pays it before its first bounded reward

from megatron_a3po.rollout.tasks import Task, chat_prompt_ids

PROMPT_SUFFIX = "\nPlease put your final answer within \\boxed{}."


def build_prompt(rec: dict, tokenizer) -> list[int]:
    return chat_prompt_ids(tokenizer, rec["question"] + PROMPT_SUFFIX)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            best = text[m.end():i - 1]
    return best


def extract_answer(text: str) -> str | None:
    """The final answer of a response: last \\boxed{} content, else the text after the last '####'."""
    b = last_boxed(text)
    if b is not None:
        return b.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    return None


def reference_answer(answer_field: str) -> str:
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' final answer: {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip()


_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")


def _normalise(s: str) -> str:
    s = s.strip().strip(".")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    for junk in (",", "$", "\\$", " ", "\\!", "\\,", "dollars", "%", "\\%"):
        s = s.replace(junk, "")
    return s.strip().rstrip(".")


def _as_number(s: str) -> Fraction | None:
    s = _normalise(s)
    if _NUM.match(s):
        return Fraction(s)
    m = re.fullmatch(r"\\?d?frac\{(-?\d+)\}\{(\d+)\}", s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def _math_verify(pred: str, gold: str) -> bool:
    g = parse(f"${gold}$", parsing_timeout=None)
    p = parse(f"${pred}$", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def answers_match(pred: str, gold: str) -> bool:
    a, b = _as_number(pred), _as_number(gold)
    if a is not None and b is not None:
        return a == b
    try:
        return _math_verify(_normalise(pred), _normalise(gold))
    except Exception:  # noqa: BLE001 - a parser failure scores 0
        return False


def reward(text: str, rec: dict) -> float:
    pred = extract_answer(text)
    if pred is None or not pred:
        return 0.0
    return 1.0 if answers_match(pred, reference_answer(rec["answer"])) else 0.0


TASK = Task(name="gsm8k", fields=("question", "answer"), build_prompt=build_prompt, reward=reward)
