"""Output that must follow a grammar (a JSON schema, a tool call), enforced token by token with llguidance.

A `Constraint` is what a request asked for, as a grammar in llguidance's Lark dialect; it knows no vocabulary. A
backend that decodes token by token (llama.cpp, transformers) turns it into a `TokenGuide` over its own vocabulary:
before each token the guide says which tokens may come next (a bitmask over the vocabulary), and after it is chosen
the guide advances. The model can then only write text the grammar accepts: JSON that parses and validates, a tool
call naming a function that exists with arguments that fit its parameters.

llguidance (rather than xgrammar, or llama.cpp's own GBNF grammars): one engine for every backend, Rust with no
torch dependency, a mask in tens of microseconds for a 150k-token vocabulary, JSON schemas compiled directly (no
hand conversion to GBNF), and lazy grammars that let free text run until a tool call starts (docs/api.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import UserError

# JSON written as json.dumps writes it (", " and ": ", no other whitespace): what models saw in training, and no
# room for a run of newlines that never ends
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 1 * 2**20   # a schema or a tool list larger than this is refused before it is compiled


def marker(i: int) -> str:
    # a byte that json.dumps never writes raw: cannot occur inside a schema embedded in the grammar
    return f"\x00{i}\x00"


@dataclass(frozen=True)
class Constraint:
    """A grammar for the answer. `lark` is llguidance's Lark dialect; `markers` are texts (e.g. "<tool_call>") that a
    model's vocabulary may hold as one special token: `lark` writes the i-th as marker(i), and each vocabulary
    resolves it to its token or to plain text."""
    lark: str
    what: str                      # what it enforces, for messages: "response_format json_schema 'person'"
    markers: tuple[str, ...] = ()
    request: tuple[tuple[str, Any], ...] = ()   # the OpenAI request fields that ask for it (sent on to a remote engine)

    def grammar_for(self, tokenizer) -> str:
        lark = self.lark
        for i, text in enumerate(self.markers):
            lark = lark.replace(marker(i), special_or_text(tokenizer, text))
        return lark


def json_value(schema: dict[str, Any]) -> str:
    """A Lark fragment matching JSON that validates against `schema`."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def json_schema(schema: dict[str, Any], what: str, request: dict[str, Any] | None = None) -> Constraint:
    return Constraint(f"start: {json_value(schema)}\n", what, request=tuple((request or {}).items()))


def special_or_text(tokenizer, text: str) -> str:
    """`text` in Lark: the vocabulary's special token where it has one (models write '<tool_call>' as one token),
    else the text itself."""
    ids = tokenizer.tokenize_str(text)
    if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError("constrained output needs llguidance: pip install llguidance") from None
    return llguidance


def _grammar(constraint: Constraint, tokenizer) -> str:
    """The constraint as llguidance's grammar for this vocabulary."""
    return _llguidance().LLMatcher.grammar_from_lark(constraint.grammar_for(tokenizer))


def check(constraint: Constraint, tokenizer) -> None:
    """Raise one line (a UserError) for a grammar that does not compile: an unknown type, a regex llguidance cannot
    run, a schema too large."""
    if len(constraint.lark) > MAX_GRAMMAR_CHARS:
        raise UserError(f"{constraint.what} is too large: at most {MAX_GRAMMAR_CHARS // 2**20} MiB of schema")
    error = _llguidance().LLMatcher.validate_grammar(_grammar(constraint, tokenizer), tokenizer)
    if error:
        raise UserError(f"{constraint.what} cannot be enforced: {error.splitlines()[0]}")


class TokenGuide:
    """One generation's place in the grammar over one vocabulary: `mask()` before each token, `advance(token)` after.

    The mask is a bitmask of int32 words (bit t of word t // 32: token t allowed), as llguidance writes it."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int):
        import numpy as np
        self.matcher = _llguidance().LLMatcher(tokenizer, _grammar(constraint, tokenizer), log_level=0)
        if self.matcher.is_error():
            raise UserError(f"{constraint.what} cannot be enforced: {self.matcher.get_error()}")
        self.what, self.vocab_size = constraint.what, vocab_size
        self.bits = np.full((vocab_size + 31) // 32, -1, dtype=np.int32)

    def mask(self, out=None):
        """The allowed next tokens as an int32 bitmask, written into `out` (a numpy array of len(self.bits) words,
        e.g. a pinned tensor's view) or into a reused array of the guide's own: read it before the next call."""
        out = self.bits if out is None else out
        self.matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return out

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} is outside {self.what}: {self.matcher.get_error()}")

    def mask_scores(self, scores) -> None:
        """Set the scores (a 1-D numpy float array over the vocabulary) of disallowed tokens to -inf, in place."""
        import numpy as np
        allowed = np.unpackbits(self.mask().view(np.uint8), bitorder="little")[: self.vocab_size].astype(bool)
        scores[~allowed] = float("-inf")
