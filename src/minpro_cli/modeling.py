"""Loading, saving and scoring causal LMs: the only module that talks to transformers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minpro_cli.errors import CheckpointError

EMBEDDED_MODEL = "embedded"
# model.path names of the checkpoints shipped in the package → their directory under assets/
EMBEDDED_MODELS = {EMBEDDED_MODEL: "default_model", "embedded:chain": "chain_model"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)


def embedded_model_dir(name: str = EMBEDDED_MODEL) -> Path:
    return Path(str(resources.files("minpro_cli") / "assets" / EMBEDDED_MODELS[name]))


def resolve_model_path(path: str | Path) -> Path:
    return embedded_model_dir(str(path)) if str(path) in EMBEDDED_MODELS else Path(path)


def load_policy(
    path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"
) -> Policy:
    """Load weights (safetensors only, never pickle) and tokenizer from a local directory."""
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
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load checkpoint {model_dir}: {exc}".splitlines()[0]) from exc
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"tokenizer in {model_dir} has no eos_token; set one in tokenizer_config.json")
    return Policy(model=model.to(device), tokenizer=tokenizer, path=model_dir)


def save_policy(policy: Policy, directory: Path) -> None:
    """HF `save_pretrained` layout with safetensors weights: loadable by plain transformers."""
    policy.model.save_pretrained(directory, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter's name, dtype, shape and bytes: equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    payload = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class PackedBatch:
    """Prompts left-padded to a shared end column, responses right-padded after it.

    Response token j of row i sits at column P + j, so the logits that predict it are at
    column P + j - 1 for every row: one slice, no per-row gather.
    """

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    position_ids: torch.Tensor  # (B, P + R)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) bool


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PackedBatch:
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    input_ids = torch.full((batch, prompt_len + response_len), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros((batch, response_len), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, prompt_len - len(p) : prompt_len] = torch.tensor(p, dtype=torch.long)
        input_ids[i, prompt_len : prompt_len + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, prompt_len - len(p) : prompt_len + len(r)] = 1
        response_mask[i, : len(r)] = True
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions_from_mask(attention),
        response_ids=input_ids[:, prompt_len:],
        response_mask=response_mask,
    )


def pad_rows(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row lists right-padded with zeros into a tensor of the shape, dtype and device of `like`."""
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=out.dtype)
    return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding must not shift positions: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: PreTrainedModel, batch: PackedBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) of each response token (B, R), from logits divided by temperature.

    Entropy (detached) of the same distribution is returned when asked; it needs the full
    softmax, which the log-prob gather alone does not.
    """
    device = next(model.parameters()).device
    response_len = batch.response_ids.shape[1]
    logits = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        logits_to_keep=response_len + 1,
        use_cache=False,
    ).logits[:, :-1]
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logprobs = logp_all.gather(-1, batch.response_ids.to(device).unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy
