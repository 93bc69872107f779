"""Hugging Face tokenizer helpers shared by the backends that encode with one (hf, exllama): prompts in, text out."""
from __future__ import annotations

import threading
from collections import OrderedDict

from ..errors import UserError
from .base import segments


class PromptEncoder:
    """A rendered prompt's token ids. The conversation's own text is tokenized with special tokens split into plain
    text (loaders.base.Prompt), each piece of the prompt on its own (the template's markup and each message's text);
    BOS comes first where the tokenizer adds one and the template did not.

    The pieces' ids are remembered. A chat's next turn sends its whole history again, and its pieces (a system
    message holding a document, the earlier messages, the template's markup between them) are then looked up instead
    of tokenized; only new pieces are tokenized. A turn encodes its prompt twice (counting it to fit the context, then
    for the model): the last prompt's ids are kept for the second. A follow-up over a 6,500-token chat encodes in
    about 0.3 ms for both against 22-28 ms each fresh with Qwen2.5's tokenizer on two CPU cores
    (bench/results/prefix-tokenize-cpu.json; 0.5-0.8 ms each when pieces under 256 characters were tokenized every
    time, each call paying the tokenizer's overhead: -before.json). The ids are the same either way, each piece being
    tokenized on its own."""
    MOST_TOKENS = 1_000_000  # remembered in all (a few tens of MB at most), the least recently used forgotten first
    MOST_PIECES = 100_000    # and at most this many pieces (short ones cost more to keep than their ids)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.bos = bos if bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos] else None
        self._known: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self._tokens = 0
        self._last: tuple[tuple, list[int]] = ((), [])  # the last prompt's pieces and ids
        self._lock = threading.Lock()  # (requests of several users encode at once)

    def ids(self, prompt: str) -> list[int]:
        """The prompt's token ids (a new list: the caller may change it)."""
        pieces = tuple(segments(prompt))
        with self._lock:
            last_pieces, last_ids = self._last
        if pieces == last_pieces:
            return list(last_ids)
        ids: list[int] = []
        for text, markup in pieces:
            ids.extend(self._piece(text, markup))
        if self.bos is not None and ids[:1] != [self.bos]:
            ids.insert(0, self.bos)
        with self._lock:
            self._last = (pieces, ids)
        return list(ids)

    def tensor(self, prompt: str):
        """ids() as a 1 x n tensor, through an array (torch.tensor converts a list id by id)."""
        import array

        import torch
        ids = self.ids(prompt)
        return torch.frombuffer(array.array("q", ids), dtype=torch.long).view(1, -1) if ids else \
            torch.zeros((1, 0), dtype=torch.long)  # (frombuffer refuses an empty buffer)

    def _piece(self, text: str, markup: bool) -> list[int]:
        key = (text, markup)
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
                return known
        ids = self._tokenize(text, markup)
        with self._lock:
            if key not in self._known:
                self._known[key] = ids
                self._tokens += len(ids)
            while self._tokens > self.MOST_TOKENS or len(self._known) > self.MOST_PIECES:
                self._tokens -= len(self._known.popitem(last=False)[1])
        return ids

    def _tokenize(self, text: str, markup: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=not markup).input_ids


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
    """Every end-of-sequence id that the tokenizer, config or generation config names (an int or a list each); one
    line if one is not a token id (a damaged generation_config.json would fail every answer instead)."""
    ids: set[int] = set()
    for value in sources:
        for token in value if isinstance(value, (list, tuple)) else [] if value is None else [value]:
            if isinstance(token, bool) or not isinstance(token, int):
                raise UserError(f"the model's end-of-sequence id {str(token)[:40]!r} is not a token id: its "
                                "generation_config.json or tokenizer files are damaged")
            if token >= 0:  # (-1 stands for none in some older configs)
                ids.add(token)
    return ids
