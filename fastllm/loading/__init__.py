"""Checkpoints straight into NF4, and NF4 models back to bitsandbytes 4-bit checkpoints.

- :func:`from_pretrained`: load a 16-bit checkpoint quantizing as it reads, or a bitsandbytes nf4 one as stored.
- :class:`NF4Config`: the same through ``AutoModel*.from_pretrained(path, quantization_config=NF4Config())``.
- :func:`save_pretrained`: write an NF4 model as a bitsandbytes 4-bit checkpoint, atomically.
- :func:`memory_plan`: what QLoRA fine-tuning a model needs in memory, by item.
"""

import fastllm.integrations.quantizer  # noqa: F401  (registers fastllm_nf4 with transformers)
from fastllm.loading.config import NF4Config
from fastllm.loading.load import from_pretrained
from fastllm.loading.save import save_pretrained

__all__ = ["NF4Config", "from_pretrained", "save_pretrained"]
