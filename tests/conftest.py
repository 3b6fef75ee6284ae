import os

import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. The variable
# must be set before any ep_fp8 module defines its kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
