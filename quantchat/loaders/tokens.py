"""Hugging Face tokenizer helpers shared by the backends that encode with one (hf, exllama): prompts in, text out."""
from __future__ import annotations

from .base import segments


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def encode_prompt(tokenizer, prompt: str):
    """A rendered prompt's token ids (1 x n). The conversation's own text is tokenized with special tokens split
    into plain text (loaders.base.Prompt); BOS comes first where the tokenizer adds one and the template did not."""
    import torch
    ids: list[int] = []
    for text, markup in segments(prompt):
        ids += tokenizer(text, add_special_tokens=False, split_special_tokens=not markup).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] != [bos] and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]:
        ids.insert(0, bos)
    return torch.tensor([ids], dtype=torch.long)


class Detokenizer:
    """Incremental decoding: emits text only once it is stable (no half UTF-8 character, no merge pending)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


def eos_ids(*sources) -> set[int]:
    """Every end-of-sequence id that the tokenizer, config or generation config names (an int or a list each)."""
    ids: set[int] = set()
    for value in sources:
        ids |= set(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids
