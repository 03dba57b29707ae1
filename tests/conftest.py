"""Test session setup: run Triton kernels through the interpreter on CPU when no GPU exists."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
