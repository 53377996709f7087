"""Does a bad call of the extension reach Python as RuntimeError: through the dispatcher op
(torch.ops.sparse24_ext.decode: a TORCH_CHECK in sparse24_ext.cu fails) and through the pybind entry
(its own checks, std::string messages, None + last_error)? Run each in its own process:
python benchmarks/probe_exceptions.py dispatcher|pybind (rc 139 = the process crashed). Also prints
which libstdc++ the process mapped and the host compiler (the crash it found: sparse24_ext_py.cpp)."""
import sys

import torch

sys.path.insert(0, ".")
from vllm_sparse24.kernels.cuda import ext  # noqa: E402

assert ext.build(), ext.error()
if sys.argv[1] == "pybind":
    import subprocess

    libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps") if "libstdc++" in ln or "libgcc_s" in ln})
    print("mapped:", libs)
    print("c++:", subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
ext.register_fake()
w = torch.zeros(64 * 64, dtype=torch.int8, device="cuda")
ws = torch.ones(64, device="cuda")
x = torch.zeros(17, 64, device="cuda", dtype=torch.bfloat16)  # M = 17 > 16: the .cu check fails
f = torch.ops.sparse24_ext.decode if sys.argv[1] == "dispatcher" else ext.decode_direct()
try:
    f(x, w, ws, None, 16, 4, 64, 0)
    print(sys.argv[1], "no error raised")
except RuntimeError as e:
    print(sys.argv[1], "raised RuntimeError:", str(e).splitlines()[0][:120])
