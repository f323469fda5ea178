"""Registers the ``maru_tiny`` load format (see vllm_tinymodel.py) when imported.

vLLM's worker processes are spawned, not forked, so a registration made in the parent does not
reach them. They do import the worker extension class named by ``worker_extension_cls`` before
they load the model, so engines pass ``worker_extension_cls="vllm_tinyloader.Extension"`` and every
process that loads the model has imported this module first.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader
from vllm_tinymodel import reinit

LOAD_FORMAT = "maru_tiny"


@register_model_loader(LOAD_FORMAT)
class TinyLoader(DummyModelLoader):
    def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
        super().load_weights(model, model_config)
        reinit(model)


class Extension:
    """No extra worker methods: naming it makes workers import this module."""
