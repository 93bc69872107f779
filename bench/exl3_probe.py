"""Is exllamav3 deterministic for one prompt asked again, and after another prompt? (diagnostic)"""
import sys
from quantchat import loaders
from quantchat.generate import build_engine
from quantchat.loaders.base import GenParams
from quantchat.settings import from_flags
s = from_flags({"base_model": sys.argv[1], "load_exllama": True})
m = loaders.load(loaders.plan(s))
e = build_engine(s, m)
ask = lambda q: "".join(e.chat([{"role": "user", "content": q}], GenParams(max_new_tokens=48)))
A, B = "Write a sentence about the sea.", "List four fruits."
for label, q in [("A1", A), ("A2", A), ("B1", B), ("A3", A), ("B2", B)]:
    print(label, repr(ask(q)))
gen = m.generator
print({k: v for k, v in vars(gen).items() if isinstance(v, (bool, int, float, str))})
