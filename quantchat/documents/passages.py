"""A passage of a document, how an answer cites it, and how passages go into the question."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# h2oGPT's wording around the documents (its pre_prompt_query and prompt_query)
BEFORE_PASSAGES = ("Pay attention and remember the information below, which will help to answer the question "
                   "or imperative after the context ends.")
BEFORE_QUESTION = "According to only the information in the document sources provided within the context above, "


@dataclass
class Passage:
    text: str
    source: str                 # the file, relative to the collection's folder (or the uploaded file's name)
    unit: str = "line"          # what first and last count: line, paragraph or row
    first: int = 1
    last: int = 1
    page: int | None = None     # PDFs: lines count within this page
    score: float = 0.0          # similarity to the question, 0 to 1

    def cite(self) -> str:
        """'notes.md, lines 3-9', 'paper.pdf, p. 2, lines 1-14', 'table.csv, row 7'."""
        span = f"{self.unit} {self.first}" if self.first == self.last else f"{self.unit}s {self.first}-{self.last}"
        page = f"p. {self.page}, " if self.page is not None else ""
        return f"{self.source}, {page}{span}"

    def as_dict(self) -> dict:
        return {**asdict(self), "citation": self.cite()}


def question_with_context(question: str, passages: list[Passage]) -> str:
    """The user's question preceded by the numbered passages it should be answered from."""
    if not passages:
        return question
    quoted = "\n\n".join(f"[{i}] ({p.cite()})\n{p.text}" for i, p in enumerate(passages, start=1))
    return f'{BEFORE_PASSAGES}\n"""\n{quoted}\n"""\n{BEFORE_QUESTION}{question}'


def sources_lines(passages: list[Passage]) -> list[str]:
    """One line per source, numbered as in the prompt: '[1] notes.md, lines 3-9 (0.82)'."""
    return [f"[{i}] {p.cite()} ({p.score:.2f})" for i, p in enumerate(passages, start=1)]
