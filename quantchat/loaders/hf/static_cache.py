"""The fast path's KV cache: transformers' static cache, whose layers write where the decoder says and hand attention
only a window of it (fast_decode.py)."""
from __future__ import annotations

import functools


def window_lengths(cache_tokens: int) -> list[int]:
    """Attention windows over the static cache, smallest first: powers of two from 256, then the cache's length."""
    lengths, n = [], 256
    while n < cache_tokens:
        lengths.append(n)
        n *= 2
    return [*lengths, cache_tokens]


def windowed_static_cache(config, cache_tokens: int):
    """transformers' static cache whose layers hand attention only the first `window` positions (a tensor whose
    length is the window, set before each step): reading the whole cache every step cost 12% of a 7B model's
    decode time at 4,096 positions (bench/results/decode-h100.json's profile)."""
    from transformers import StaticCache
    cache = StaticCache(config=config, max_cache_len=cache_tokens)
    cache.layers = [_windowed_layer_class()(max_cache_len=cache_tokens) for _ in cache.layers]
    return cache


@functools.cache  # one class for every decoder: the compiler guards on the layers' type
def _windowed_layer_class():
    from transformers.cache_utils import StaticLayer

    class WindowedLayer(StaticLayer):
        """Writes the step's keys and values at the step's positions (the decoder sets them; transformers' own
        write pointer counts tokens written, which a cache continued from a prefix, or a step whose guesses were
        not all kept, would leave wrong), and hands attention the first `window` positions."""
        window = None     # a tensor as long as the positions attention reads
        positions = None  # the step's positions [tokens]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys.index_copy_(2, self.positions, key_states)
            self.values.index_copy_(2, self.positions, value_states)
            n = self.window.shape[0]
            return self.keys[:, :, :n], self.values[:, :, :n]

        def get_seq_length(self):  # the positions before this step's (where masks start its queries)
            return self.positions[0] if self.positions is not None else super().get_seq_length()

        def get_mask_sizes(self, *args, **kwargs):
            _, offset = super().get_mask_sizes(*args, **kwargs)
            return self.window.shape[0], offset

    return WindowedLayer


def full_attention_config(config):
    """The text config with every layer's cache full-length: sliding-window layers keep their window through the
    attention mask, which counts absolute positions. transformers' sliding cache layers track their fill level in
    a Python int, which would make the compiler specialise (recompile) on every step."""
    import copy
    text = copy.deepcopy(config.get_text_config(decoder=True))
    if getattr(text, "layer_types", None):
        text.layer_types = ["full_attention"] * len(text.layer_types)
    if hasattr(text, "sliding_window"):
        text.sliding_window = None
    return text
