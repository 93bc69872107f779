"""Speculative decoding by prompt lookup: guess the next tokens from the text so far, check them in one pass.

At batch 1 a model step reads all the weights for one token; a step over k+1 tokens reads them once too, so where
guesses are often right several tokens come for the price of about one step. The guesses here cost nothing: the
last few tokens are looked up earlier in the prompt and the answer, and what followed them there is proposed
(prompt lookup decoding). Answers that quote their input (documents Q&A, code edits, rewrites, summaries) gain
most; free chat gains little.

The check keeps exactly what decoding without guesses would have produced: each position's token is chosen from
the model's own logits there (greedy or sampled, with the same sampler), and the guesses are kept only up to the
first position where the chosen token differs; that chosen token is kept too. For a guess that is one fixed token
(as here) this is the standard speculative sampling rule, so the distribution is unchanged.

Whether it pays depends on the machine: on a GPU a step over a few tokens costs about as much as one, on a CPU
several times as much. `DraftControl` measures it as it goes, per request: the seconds per token of steps that
carried guesses against those that did not, and stops guessing for the rest of the answer where guessing is
slower.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpeculationStats:
    """One answer's speculation, for the timing line and /metrics."""
    steps: int = 0        # model steps that carried guesses
    drafted: int = 0      # guessed tokens checked
    accepted: int = 0     # guessed tokens kept
    seconds: float = 0.0  # spent in the steps that carried guesses (the guessing, the step, reading its choices)
    switched_off: bool = False  # guessing stopped during this answer (it was slower)
    resting: bool = False  # a draft model did not guess in this answer: it was slower in the answers before (DraftRecord)

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens made per model step that carried guesses (1 + the accepted guesses)."""
        return (self.steps + self.accepted) / self.steps if self.steps else None

    @property
    def shown(self) -> bool:
        """Whether the timing line has something to say: guesses checked, or a draft model resting."""
        return bool(self.drafted or self.resting)

    def line(self) -> str:
        """What the timing line says (where `shown`)."""
        if self.resting:
            return "no guesses: the draft model was slower in the last answers"
        rate = f"{self.accepted} of {self.drafted} guessed tokens kept, {self.tokens_per_step:.2f} tokens per step"
        return rate + (" (then switched off: slower here)" if self.switched_off else "")


class PromptLookup:
    """Guesses by n-gram lookup: the most recent earlier place where the last `n` tokens occurred (n from
    `longest` down to `shortest`), and the tokens that followed it there. An index of n-grams to their last end
    keeps each lookup O(1) as the text grows; what each token replaced in it is remembered, so that the text can be
    cut back (`follow`) instead of indexed again: a chat's next turn indexes only its new tokens (indexing a
    7,100-token history took 5-11 ms of host time, on a 2-core CPU, before each follow-up's first token)."""

    def __init__(self, tokens: list[int], longest: int = 4, shortest: int = 3):
        self.tokens: list[int] = []
        self.sizes = range(longest, shortest - 1, -1)
        self.last_end: dict[tuple[int, ...], int] = {}   # n-gram -> index just after its latest occurrence
        self._replaced: list[tuple] = []  # per token: the (n-gram, its earlier end or None) its indexing replaced
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            replaced = []
            for n in self.sizes:
                if end > n:  # the n-gram ending before this token: it was followed by this token
                    gram = tuple(self.tokens[end - 1 - n:end - 1])
                    replaced.append((gram, self.last_end.get(gram)))
                    self.last_end[gram] = end - 1
            self._replaced.append(tuple(replaced))

    def cut(self, length: int) -> None:
        """Forget the tokens from `length` on, as if they had never been indexed."""
        while len(self.tokens) > length:
            self.tokens.pop()
            for gram, earlier in self._replaced.pop():
                if earlier is None:
                    del self.last_end[gram]
                else:
                    self.last_end[gram] = earlier

    @classmethod
    def over(cls, tokens: list[int], previous: PromptLookup | None) -> PromptLookup:
        """A lookup indexing `tokens`: the previous answer's, followed on (it is changed), where there is one."""
        return previous.follow(tokens) if previous else cls(tokens)

    def follow(self, tokens: list[int]) -> PromptLookup:
        """This lookup made to index `tokens` (a chat's next prompt): cut back to what it shares with them, then
        extended by the rest; a new one where they share less than half."""
        from .loaders.base import shared_prefix  # (here: the loaders import this module)
        shared = shared_prefix(self.tokens, tokens)
        if 2 * shared < len(tokens):
            return PromptLookup(tokens, self.sizes.start, self.sizes.stop + 1)
        self.cut(shared)
        self.extend(tokens[shared:])
        return self

    def has_guess(self) -> bool:
        return bool(self.draft(1))

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the text's last n tokens."""
        at = self.match()
        return [] if at is None else self.tokens[at:at + k]

    def match(self) -> int | None:
        """Where the guesses start: the index after the latest earlier occurrence of the text's last n tokens (n from
        longest down to shortest), or None."""
        for n in self.sizes:
            if len(self.tokens) >= n and (at := self.last_end.get(tuple(self.tokens[-n:]))) is not None:
                return at
        return None


@dataclass
class DraftControl:
    """How many tokens to guess next, and whether guessing still pays for this answer.

    The draft length follows acceptance: one more than the guesses the last step kept, up to `most`. The switch
    compares measured seconds per token of steps with guesses and without (steps without a guess happen whenever the
    lookup finds nothing, so both are seen in passing); after `patience` steps of each, guessing stops for the rest
    of the answer if it is the slower way."""
    most: int = 8
    patience: int = 4
    # take steps without guesses to compare against, where guesses never run out (a draft model); prompt lookup
    # finds nothing often enough by itself, and where it always finds something its guesses are paying
    probe_plain_steps: bool = False
    length: int = 2  # (grows with acceptance: a long first guess is costly where steps cost by the token, a CPU)
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    record: DraftRecord | None = None  # told whether guessing paid in this answer (a draft model's)
    _plain_time: float = 0.0
    _plain_steps: int = 0
    _judged: bool = False

    @property
    def on(self) -> bool:
        return not (self.stats.switched_off or self.stats.resting)

    @property
    def guessing(self) -> bool:
        """Whether the next step carries guesses: not once switched off, nor while the steps without guesses that
        the switch compares against are still too few (a draft model has guesses at every step)."""
        return self.on and not (self.probe_plain_steps and self.stats.steps >= self.patience and
                                self._plain_steps < self.patience)

    def step_done(self, drafted: int, accepted: int, seconds: float) -> None:
        """Record one model step: how many guesses it checked and kept, and how long it took."""
        if drafted:
            self.stats.steps += 1
            self.stats.drafted += drafted
            self.stats.accepted += accepted
            self.stats.seconds += seconds
            self.length = max(1, min(self.most, accepted + 1))
        else:
            self._plain_time += seconds
            self._plain_steps += 1
        if self.on and self.stats.steps >= self.patience and self._plain_steps >= self.patience:
            guessing = self.stats.seconds / (self.stats.steps + self.stats.accepted)  # (each such step: 1 + kept)
            plain = self._plain_time / self._plain_steps
            if guessing > plain:
                self.stats.switched_off = True
            if self.record and (self.stats.switched_off or not self._judged):  # (the first verdict, and a later loss)
                self.record.judged(paying=not self.stats.switched_off)
            self._judged = True


@dataclass
class DraftRecord:
    """A draft model's verdicts across answers, one record per loaded model. Whether a draft pays is mostly the
    machine's (its step's cost against the base model's), yet each answer's switch pays for its look: guessing, then
    steps without guesses to compare with (12-13% of each answer for Qwen2.5-Coder-0.5B drafting for the 1.5B on an
    H200, docs/benchmarks.md). So after `losses` answers in a row that switched guessing off, the next answers do not
    guess: `first_rest` of them, twice as many after each further loss, up to `longest_rest`; then one answer looks
    again. An answer that finds guessing paying ends the rests. (Prompt lookup needs no record: where it finds no
    guess it costs nothing, and what it finds depends on the prompt.)"""
    losses: int = 3
    first_rest: int = 8
    longest_rest: int = 64
    lost_in_a_row: int = 0
    rest: int = 0     # answers the latest rest lasts (0: no rest yet)
    resting: int = 0  # answers left in it

    def control(self, most: int) -> DraftControl:
        """The next answer's control: guessing and reporting back here, or resting."""
        if self.resting:
            self.resting -= 1
            return DraftControl(most=most, probe_plain_steps=True, stats=SpeculationStats(resting=True))
        return DraftControl(most=most, probe_plain_steps=True, record=self)

    def judged(self, paying: bool) -> None:
        """An answer's switch found guessing paying or not."""
        if paying:
            self.lost_in_a_row = self.rest = 0
            return
        self.lost_in_a_row += 1
        if self.lost_in_a_row >= self.losses:
            self.rest = min(self.longest_rest, 2 * self.rest) if self.rest else self.first_rest
            self.resting = self.rest


def answer_control(most: int, record: DraftRecord | None) -> DraftControl:
    """An answer's DraftControl: a draft model's through its record, else prompt lookup's."""
    return record.control(most) if record else DraftControl(most=most)
