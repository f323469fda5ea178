"""A tiny Llama for real vLLM engines without downloads: a hand-written config.json and a
model loader (``load_format="maru_tiny"``, ``vllm_tinyloader.py``) that is vLLM's dummy loader with
the weights re-drawn deterministically at a scale where the KV matters.

vLLM's dummy weights are uniform in ±1e-3, which makes every logit ~0 and every logprob
log(1/vocab): outputs would match whatever KV an engine used, and no test could tell loaded KV
from garbage. ``reinit`` draws each parameter from a generator seeded by its name (identical in
every process), with unit-variance activations, so outputs depend on every cached key and value.
It runs inside the loader because vLLM's CPU backend repacks linear weights right after loading.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch

#: Small enough to start in seconds, with head_dim 64 and block sizes of 32 (this CPU's backend).
TINY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1000,
}


def write_config(directory: Path, **overrides: Any) -> Path:
    """A Llama config.json in `directory` (created); returns the directory."""
    doc = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **TINY,
        **overrides,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(doc, indent=1))
    return directory


@torch.no_grad()
def reinit(model: torch.nn.Module) -> int:
    """Re-draws every parameter from a generator seeded by its name; returns how many."""
    n = 0
    for name, p in model.named_parameters():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if p.dim() == 1:
            # Norm weights 1, biases 0: the residual stream keeps unit scale.
            p.fill_(1.0 if "norm" in name else 0.0)
        else:
            std = 1.0 if "embed" in name else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
        n += 1
    return n
