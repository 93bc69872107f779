"""Does a CUDA build of llama-cpp-python load a model after CUDA libraries are already in the process?

python bench/llamacpp_gpu_probe.py GGUF [none|cuinit|cudart|torch]: each case in its own process; prints OK or dies.
"""
import ctypes
import sys

path, case = sys.argv[1], sys.argv[2]
if case == "cuinit":
    ctypes.CDLL("libcuda.so.1").cuInit(0)
elif case == "cudart":
    ctypes.CDLL("libcudart.so.13")
elif case == "torch":
    import torch  # noqa: F401
import llama_cpp  # noqa: E402

llm = llama_cpp.Llama(path, n_gpu_layers=-1, n_ctx=256, verbose=False)
print(case, "OK", llm.detokenize(llm.tokenize(b"probe")))
