"""RULER's QA tasks' data: SQuAD and HotpotQA files read into paragraphs and questions with their gold paragraphs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longforge.errors import LongforgeError


@dataclass
class QAData:
    """Paragraphs and questions of a QA set; each question names its gold paragraphs and, for SQuAD, the other
    paragraphs of its article (RULER's first distractors; empty when the set has none)."""

    name: str
    docs: list[str]
    questions: list[tuple[str, list[str], list[int]]]
    related: list[list[int]] = field(default_factory=list)


def load_squad(path: Path) -> QAData:
    """SQuAD (v1 or v2 JSON): every paragraph is a document; answerable questions with their paragraph as gold."""
    data = _read_json(path, "SQuAD")
    index: dict[str, int] = {}  # a paragraph's text -> its document (a repeated paragraph is one document, as RULER)
    docs: list[str] = []
    questions: list[tuple[str, list[str], list[int]]] = []
    related: list[list[int]] = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                if para["context"] not in index:
                    index[para["context"]] = len(docs)
                    docs.append(para["context"])
            article_docs = [index[p["context"]] for p in article["paragraphs"]]
            for para, doc in zip(article["paragraphs"], article_docs):
                for qa in para["qas"]:
                    answers = [a["text"] for a in qa.get("answers", [])]
                    if answers and not qa.get("is_impossible", False):
                        questions.append((qa["question"], list(dict.fromkeys(answers)), [doc]))
                        related.append([d for d in dict.fromkeys(article_docs) if d != doc])
    except (KeyError, TypeError):
        raise LongforgeError(f"{path} is not in SQuAD's format (data -> paragraphs -> context, qas); pass the official dev JSON.") from None
    return _check_qa(QAData("SQuAD", docs, questions, related), path)


def load_hotpotqa(path: Path) -> QAData:
    """HotpotQA (distractor dev JSON): each question's context paragraphs are its gold documents, as in RULER."""
    data = _read_json(path, "HotpotQA")
    index: dict[str, int] = {}
    docs: list[str] = []
    questions: list[tuple[str, list[str], list[int]]] = []
    try:
        for item in data:
            gold = []
            for title, sentences in item["context"]:
                text = f"{title}\n{''.join(sentences)}"
                if text not in index:
                    index[text] = len(docs)
                    docs.append(text)
                gold.append(index[text])
            questions.append((item["question"], [item["answer"]], gold))
    except (KeyError, TypeError, ValueError):
        raise LongforgeError(f"{path} is not in HotpotQA's format (a list of question, answer, context); pass the distractor dev JSON.") from None
    return _check_qa(QAData("HotpotQA", docs, questions), path)


def _read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LongforgeError(f"{what} file {path} does not exist; pass the dataset's JSON file.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LongforgeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); pass {what}'s JSON file.") from None


def _check_qa(data: QAData, path: Path) -> QAData:
    if not data.questions:
        raise LongforgeError(f"{path} has no answerable questions; pass {data.name}'s dev set.")
    return data
