"""python generate.py --base_model=... : load a model and chat with it (flags as in h2oGPT; --help lists them)."""
import sys

from quantchat.cli import main

if __name__ == "__main__":
    sys.exit(main())
