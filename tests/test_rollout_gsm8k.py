"""GSM8K reward and prompt data: checked against the dataset's own '####' answers."""

import json
import re
from pathlib import Path

import pytest

from megatron_a3po.rollout.data import DataError, load_prompts, load_records
from megatron_a3po.rollout.tasks import get_task
from megatron_a3po.rollout.tasks.gsm8k import PROMPT_SUFFIX, extract_answer

# the project's shared data lies beside the checkout: <parent of the repository root>/shared/data
TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
pytestmark = pytest.mark.skipif(not TEST.exists(), reason=f"{TEST} not present (../shared beside the checkout)")


def _gold(answer: str) -> str:  # independent parse of the dataset's final answer
    return answer.split("####")[-1].strip()


def test_reward_matches_reference_solutions_and_rejects_perturbed():
    task = get_task("gsm8k")
    recs = [json.loads(line) for line in TEST.read_text().splitlines() if line.strip()]
    assert len(recs) == 1319
    for r in recs:
        gold = _gold(r["answer"])
        assert task.reward(r["answer"], r) == 1.0, r["answer"][-60:]  # the reference solution itself
        assert task.reward(f"Reasoning...\nThe answer is \\boxed{{{gold}}}.", r) == 1.0, gold
        num = int(gold.replace(",", ""))
        for wrong in (num + 1, num - 1, num * 10):
            assert task.reward(f"\\boxed{{{wrong}}}", r) == 0.0, (gold, wrong)
        perturbed = re.sub(r"####\s*.*$", f"#### {num + 7}", r["answer"].strip())
        assert task.reward(perturbed, r) == 0.0
    assert task.reward("no final answer here 18", recs[0]) == 0.0


def test_answer_extraction_forms():
    assert extract_answer("a \\boxed{1} then \\boxed{\\frac{3}{4}}") == "\\frac{3}{4}"
    assert extract_answer("x #### 1,234\nmore") == "1,234"
    rec = {"answer": "#### 0.5"}
    assert get_task("gsm8k").reward("\\boxed{\\frac{1}{2}}", rec) == 1.0  # math-verify path
    assert get_task("gsm8k").reward("\\boxed{$0.50}", rec) == 1.0


def test_prompt_uses_chat_template(tmp_path):
    from megatron_a3po.models.tiny import build_char_tokenizer

    q = "What is 2+3?"
    tok = build_char_tokenizer("".join(sorted(set(q + PROMPT_SUFFIX))))
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": q, "answer": "#### 5"}) + "\n")
    (p,) = load_prompts(f, "gsm8k", tok)
    expected = tok.convert_tokens_to_ids(["<|user|>", *(q + PROMPT_SUFFIX), "<|assistant|>"])
    assert p.prompt_ids == expected


def test_malformed_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_records(f, ("question", "answer"))
    g = tmp_path / "missing.jsonl"
    g.write_text('{"question": "a"}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl:1: missing field 'answer'"):
        load_records(g, ("question", "answer"))
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_parquet_loads(tmp_path):
    import datasets

    f = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"question": "q", "answer": "#### 3"}]).to_parquet(str(f))
    assert load_records(f, ("question", "answer")) == [{"question": "q", "answer": "#### 3"}]
