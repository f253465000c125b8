"""Mixed into vLLM's worker processes (`LLM(worker_extension_cls=...)`), in the vllm
environment: new weights from a minpro shared-memory segment, loaded in place without the disk.

Never imports minpro: minpro's `weightsync` module (torch and the standard library only) is
loaded from the path the sampler sends, so both sides read one format from one file.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

_MODULES: dict[str, ModuleType] = {}


def weightsync(path: str) -> ModuleType:
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location("minpro_weightsync", path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


class SegmentLoader:
    """Methods `collective_rpc` can call on every vLLM worker."""

    def reseed(self: Any, seed: int) -> None:
        """The generator unseeded requests sample from (`sampler.options.seed_mode: round`)."""
        import torch

        torch.manual_seed(seed)

    def load_segment(self: Any, table: str, module: str) -> int:
        """Reload every weight from the segment whose table is `table`; its version."""
        version, weights = weightsync(module).read_weights(table)
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return version
