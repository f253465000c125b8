"""Loading causal LMs: policies (model + tokenizer) from local safetensors or the embedded
models, their fingerprints, and their decoder blocks (compiled for training, eager for decoding).
Scoring them is `logprobs`."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minpro_cli import attention
from minpro_cli.errors import CheckpointError
from minpro_cli.logprobs import autocast

if TYPE_CHECKING:
    from minpro_cli.lora import LoraAdapters

EMBEDDED_MODEL = "embedded"
# model.path names of the checkpoints shipped in the package → their directory under assets/
EMBEDDED_MODELS = {EMBEDDED_MODEL: "default_model", "embedded:chain": "chain_model"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """Float32 weights, a tokenizer, the precision forward passes compute in (`model.dtype`),
    and the LoRA adapters injected into the model, if any (`model.lora`, set by `minpro train`)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    compute_dtype: torch.dtype = torch.float32
    adapters: LoraAdapters | None = None

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast(self.model.device, self.compute_dtype)

    def copy(self, dtype: torch.dtype | None = None) -> Policy:
        """The same policy with its own copy of the weights (stale-weight sampling, FSDP2);
        taken before adapters are attached (copying adapted weights would orphan them). With
        `dtype` (a sampler's own precision) the copy is `deepcopy(model).to(dtype)`, made without
        a float32 copy on the way: each floating tensor is cast as it is copied."""
        assert self.adapters is None, "copy a policy before attaching LoRA adapters"
        memo: dict[int, Any] = {}
        if dtype is not None:
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                if tensor.is_floating_point() and id(tensor) not in memo:  # a tied weight once
                    cast = tensor.detach().to(dtype, copy=True)
                    memo[id(tensor)] = torch.nn.Parameter(cast, tensor.requires_grad) if isinstance(
                        tensor, torch.nn.Parameter) else cast  # fmt: skip
        return Policy(copy.deepcopy(self.model, memo), self.tokenizer, self.path, self.compute_dtype)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the token ids a forward pass accepts."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)


def embedded_model_dir(name: str = EMBEDDED_MODEL) -> Path:
    return Path(str(resources.files("minpro_cli") / "assets" / EMBEDDED_MODELS[name]))


HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


def resolve_model_path(path: str | Path) -> Path:
    """An embedded model's directory, a local directory, or a hub model id (`org/name`) found in
    the local Hugging Face cache: minpro never downloads."""
    if str(path) in EMBEDDED_MODELS:
        return embedded_model_dir(str(path))
    if Path(path).exists() or not HUB_MODEL_ID.match(str(path)):
        return Path(path)
    from huggingface_hub import try_to_load_from_cache  # a cache look-up: no network call at all

    found = try_to_load_from_cache(str(path), "config.json")
    if isinstance(found, str):
        return Path(found).parent
    raise CheckpointError(
        f"model '{path}' is not a local directory, and that hub model id is not in the local Hugging Face "
        f"cache; minpro never downloads at run time: fetch it once with `hf download {path}` (or "
        "`huggingface-cli download`) on a machine with network, or point model.path at a local directory"
    )


def load_policy(
    path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"
) -> Policy:
    """Load weights (safetensors only, never pickle) and tokenizer from a local directory.

    Weights are float32 whatever `dtype` says: `dtype` is the compute precision (autocast),
    so that training keeps float32 master weights and every stage computes alike."""
    model_dir = resolve_model_path(path)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"checkpoint not found: {model_dir} has no config.json "
            "(point model.path at a directory written by save_pretrained, or use one of "
            f"{', '.join(EMBEDDED_MODELS)})"
        )
    if not any(model_dir.glob("*.safetensors")):
        raise CheckpointError(
            f"checkpoint {model_dir} has no .safetensors weights; minpro loads safetensors only "
            "(convert pickle checkpoints with transformers' save_pretrained(safe_serialization=True))"
        )
    try:
        model = load_weights(model_dir, trust_remote_code)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {model_dir}: {exc}".splitlines()[0][:300]
            + " (truncated or corrupt weights? restore the directory, or resume from an earlier checkpoint)"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 — tokenizers' own errors are not OSError/ValueError
        raise CheckpointError(
            f"cannot load the tokenizer of {model_dir}: {exc}".splitlines()[0][:300]
            + " (is tokenizer.json or tokenizer_config.json damaged? copy them from the base model)"
        ) from None
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"tokenizer in {model_dir} has no eos_token; set one in tokenizer_config.json")
    return Policy(model=model.to(device), tokenizer=tokenizer, path=model_dir, compute_dtype=DTYPES[dtype])


def load_weights(model_dir: Path, trust_remote_code: bool) -> PreTrainedModel:
    """The model with every weight from the checkpoint: a tensor missing, unexpected (a PEFT
    state dict's `base_model.model.*` names) or of the wrong shape is an error naming it and the
    directory; transformers would initialise it at random and go on."""
    kwargs: dict[str, Any] = {
        "dtype": torch.float32, "use_safetensors": True, "trust_remote_code": trust_remote_code,
        "local_files_only": True, "output_loading_info": True,
    }  # fmt: skip
    with quiet_transformers():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except RuntimeError as exc:
            if "ignore_mismatched_sizes" not in str(exc):
                raise
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, ignore_mismatched_sizes=True, **kwargs)
    problems = [
        *(f"{key} has shape {list(got)} where the model needs {list(want)}" for key, got, want in
          sorted(info.get("mismatched_keys") or [])),
        *(f"{key} is not a weight of this model" for key in sorted(info.get("unexpected_keys") or [])),
        *(f"{key} is missing" for key in sorted(info.get("missing_keys") or [])),
    ]  # fmt: skip
    if problems:
        peft = any(str(k).startswith("base_model.model.") for k in info.get("unexpected_keys") or [])
        hint = (
            "the names are a PEFT model's: save the merged model (merge_and_unload().save_pretrained)"
            if peft else "the weights do not belong to this config.json: restore the directory or point at another"
        )
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {model_dir}: tensor {problems[0]}{more}; {hint}")
    attention.install(model)
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load report and progress bar off: minpro says what is wrong in one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the module classes it names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def compile_blocks(model: torch.nn.Module) -> int:
    """`torch.compile` each transformer block's forward, with dynamic shapes (batch and length
    change every step): fused elementwise kernels for training. Only `forward` is compiled, so
    module hooks (FSDP2, activation checkpointing) stay eager; `eager(model)` puts the plain
    forward back for sampling, whose KV-cache bookkeeping would recompile every step. Returns
    the block count."""
    blocks = decoder_blocks(model)
    for block in blocks:
        block.eager_forward = block.forward
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


@contextlib.contextmanager
def eager(model: torch.nn.Module) -> Iterator[None]:
    """The model's compiled blocks (`compile_blocks`) run their plain forward inside: sampling and
    evaluation. Per model, not process-wide, so training compiled code elsewhere is unaffected."""
    compiled = [block for block in decoder_blocks(model) if hasattr(block, "eager_forward")]
    swapped = [(block, block.forward) for block in compiled]
    for block in compiled:
        block.forward = block.eager_forward
    try:
        yield
    finally:
        for block, forward in swapped:
            block.forward = forward


def weights_written(model: torch.nn.Module) -> tuple[int, ...]:
    """Each weight's storage and write counter: changes whenever a weight is written in place
    (optimizer steps, `load_state_dict`, updates under no_grad) or replaced. A sampler that
    holds its own copy of the weights refreshes it when this changes: a key with no hashing."""
    return tuple(x for p in model.parameters() for x in (p.data_ptr(), p._version))


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter's name, dtype, shape and bytes: equal iff the weights are equal.

    Hashing every weight costs seconds on a real model, so the hash is kept until a tensor is
    replaced or written in place (optimizer steps and `load_state_dict` bump its version)."""
    state = model.state_dict()
    key = tuple((name, t.data_ptr(), t._version) for name, t in state.items())
    cached = _FINGERPRINTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    _FINGERPRINTS[model] = (key, digest.hexdigest()[:16])
    return _FINGERPRINTS[model][1]


_FINGERPRINTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the vocabulary and special tokens (kept per tokenizer object and vocabulary size)."""
    cached = _TOKENIZER_FINGERPRINTS.get(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens},
        sort_keys=True,
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    _TOKENIZER_FINGERPRINTS[tokenizer] = (len(tokenizer), digest)
    return digest


_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, str]] = (
    weakref.WeakKeyDictionary()
)
