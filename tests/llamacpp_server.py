"""llama-cpp-python's OpenAI-compatible server (`python tests/llamacpp_server.py --model ...`, its own flags), the
remote tests' stand-in engine, with the weights in llama.cpp's plain buffers where its build has AMX: its AMX
kernels crashed the server's first answer there, as they crashed quantchat's (quantchat/loaders/llamacpp.py)."""
import runpy

import llama_cpp

from quantchat.loaders.llamacpp import _model_params, amx_in_build

if __name__ == "__main__":
    with _model_params(llama_cpp, extra_buffers=not amx_in_build()):
        runpy.run_module("llama_cpp.server", run_name="__main__")
