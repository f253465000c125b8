"""Loading and scoring causal LMs: policies (model + tokenizer) from local safetensors or the
embedded models, their fingerprints, and log-probs and entropy through the chunked head."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minpro_cli.errors import CheckpointError

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

    def copy(self) -> Policy:
        """The same policy with its own copy of the weights (stale-weight sampling, FSDP2);
        taken before adapters are attached (copying adapted weights would orphan them)."""
        assert self.adapters is None, "copy a policy before attaching LoRA adapters"
        return Policy(copy.deepcopy(self.model), self.tokenizer, self.path, self.compute_dtype)

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


def resolve_model_path(path: str | Path) -> Path:
    return embedded_model_dir(str(path)) if str(path) in EMBEDDED_MODELS else Path(path)


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
        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(
            f"cannot load checkpoint {model_dir}: {exc}".splitlines()[0][:300]
            + " (truncated or corrupt weights? restore the directory, or resume from an earlier checkpoint)"
        ) from None
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"tokenizer in {model_dir} has no eos_token; set one in tokenizer_config.json")
    return Policy(model=model.to(device), tokenizer=tokenizer, path=model_dir, compute_dtype=DTYPES[dtype])


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
    """Rows built as Python lists and turned into tensors once (not one copy per row)."""
    prompt_len = max(len(p) for p in prompts)
    response_len = max(1, max(len(r) for r in responses))
    ids, attention, response_mask = [], [], []
    for p, r in zip(prompts, responses):
        left, right = prompt_len - len(p), response_len - len(r)
        ids.append([pad_id] * left + p + r + [pad_id] * right)
        attention.append([0] * left + [1] * (len(p) + len(r)) + [0] * right)
        response_mask.append([True] * len(r) + [False] * right)
    input_ids, attention_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(attention, dtype=torch.long)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        response_ids=input_ids[:, prompt_len:],
        response_mask=torch.tensor(response_mask, dtype=torch.bool),
    )


def pad_rows(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-row lists right-padded with zeros into a tensor of the shape, dtype and device of `like`."""
    width = like.shape[1]
    padded = [row + [0.0] * (width - len(row)) for row in rows]  # one host tensor, moved once
    return torch.tensor(padded, dtype=like.dtype).reshape(like.shape).to(like.device, non_blocking=True)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding must not shift positions: the first real token is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# logit post-processing after the head (soft-capping, scaling): such models take the
# full-vocabulary path, since the chunked head reproduces a plain linear layer only
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier")
CHUNK_ELEMENTS = 2**25  # tokens × vocabulary entries per chunk: 128 MB of float32 logits


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the head: ~2^25 logits, e.g. 682 tokens at 49k, 221 at 152k."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    """Compute in `dtype` while weights (and AdamW states) stay float32: mixed precision."""
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def response_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) of each response token (B, R) float32, from logits / temperature.

    The head runs chunk by chunk over the response tokens (`ChunkedLogProbs`): memory is
    O(B·R + chunk·V), never a (B, R, V) float32 tensor, and padding costs nothing past the
    decoder. Entropy of the same distribution comes from the same chunks when asked: detached,
    or differentiable with `entropy_grad` (an entropy bonus), at no cost until it is used.
    `model` may be wrapped (DDP, FSDP2): forward goes through the wrapper.
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()
    device = next(model.parameters()).device
    if not isinstance(head, torch.nn.Linear) or any(
        getattr(inner.config, key, None) not in (None, 1, 1.0) for key in LOGIT_TRANSFORMS
    ):
        return _full_vocabulary_logprobs(model, batch, temperature, with_entropy, entropy_grad)
    inner.set_output_embeddings(torch.nn.Identity())  # the model returns hidden states
    try:
        hidden = _forward_response_columns(model, batch, device)
    finally:
        inner.set_output_embeddings(head)
    mask = batch.response_mask.to(device)
    targets = batch.response_ids.to(device)[mask]
    logprobs, entropy = ChunkedLogProbs.apply(
        hidden[mask], head.weight, head.bias, targets, temperature, with_entropy, chunk_tokens(head.out_features)
    )
    zeros = torch.zeros(mask.shape, dtype=logprobs.dtype, device=device)
    if not with_entropy:
        return zeros.masked_scatter(mask, logprobs), None
    return zeros.masked_scatter(mask, logprobs), zeros.masked_scatter(mask, entropy if entropy_grad else entropy.detach())


def _forward_response_columns(model: torch.nn.Module, batch: PackedBatch, device: torch.device) -> torch.Tensor:
    """The model's output at the columns that predict the response tokens: (B, R, ·)."""
    response_len = batch.response_ids.shape[1]
    return model(
        input_ids=batch.input_ids.to(device, non_blocking=True),
        attention_mask=batch.attention_mask.to(device, non_blocking=True),
        position_ids=batch.position_ids.to(device, non_blocking=True),
        logits_to_keep=response_len + 1,
        use_cache=False,
    ).logits[:, :-1]


def _full_vocabulary_logprobs(
    model: torch.nn.Module, batch: PackedBatch, temperature: float, with_entropy: bool, entropy_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own logits (whatever follows its head), log-softmax over the full vocabulary."""
    device = next(model.parameters()).device
    logits = _forward_response_columns(model, batch, device)
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    logprobs = logp_all.gather(-1, batch.response_ids.to(device).unsqueeze(-1)).squeeze(-1)
    logprobs = logprobs * batch.response_mask.to(device)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):  # a second (B, R, V) in the graph
            entropy = -(logp_all.exp() * logp_all).sum(-1) * batch.response_mask.to(device)
    return logprobs, entropy


class ChunkedLogProbs(torch.autograd.Function):
    """log softmax(h·Wᵀ + b)/T at the target ids, and the entropy, `chunk` tokens at a time.

    Forward keeps only h (N, H), the targets and log Z per token; backward recomputes each
    chunk's logits z and p = exp(z − log Z):
        ∂ log p_y / ∂z = (onehot(y) − softmax(z)) / T
        ∂h = g·(onehot − p)/T · W        ∂W = Σ_chunks ((onehot − p)/T · g)ᵀ · h
    Logits are formed in the compute dtype (autocast's, else h's) and reduced in float32
    (float64 inputs stay float64). Entropy H = log Z − Σ p·z comes from the same exp pass;
    when a loss uses it (entropy bonus), backward adds ∂H/∂z = −p·(log p + H)/T.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        ctx.compute, ctx.temperature, ctx.chunk = compute, temperature, chunk
        accumulate = torch.promote_types(compute, torch.float32)
        logprobs = torch.empty(hidden.shape[0], dtype=accumulate, device=hidden.device)
        entropy = torch.zeros_like(logprobs)
        normaliser = torch.empty_like(logprobs)  # log Z per token, kept for backward's softmax
        w, b = weight.to(compute), None if bias is None else bias.to(compute)  # cast once, not per chunk
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = _chunk_logits(hidden[rows], w, b, temperature)
            if with_entropy:  # one exp pass gives both log Z and H = log Z − Σ p·z
                peak = logits.amax(-1, keepdim=True)
                unnormalised = (logits - peak).exp_()
                total = unnormalised.sum(-1)
                normaliser[rows] = peak.squeeze(-1) + total.log()
                entropy[rows] = normaliser[rows] - (unnormalised * logits).sum(-1) / total
            else:
                normaliser[rows] = logits.logsumexp(-1)
            logprobs[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - normaliser[rows]
        ctx.save_for_backward(hidden, weight, bias, targets, normaliser, entropy)
        ctx.set_materialize_grads(False)  # an unused output gets None: no entropy term in backward
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_logprobs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[Any, ...]:
        hidden, weight, bias, targets, normaliser, entropy = ctx.saved_tensors
        compute, temperature, chunk = ctx.compute, ctx.temperature, ctx.chunk
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_bias else None
        w, b = weight.to(compute), None if bias is None else bias.to(compute)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            n = min(chunk, hidden.shape[0] - start)
            if grad_logprobs is None:  # only the entropy is in the loss
                g = torch.zeros(n, dtype=accumulate, device=hidden.device)
            else:
                g = grad_logprobs[rows].to(accumulate) / temperature
            log_p = _chunk_logits(hidden[rows], w, b, temperature).sub_(normaliser[rows, None])  # from the saved log Z
            if grad_entropy is None:  # ∂/∂z of g·log p_y: g·(onehot − p)
                grad_logits = log_p.exp_().mul_(-g[:, None])
            else:  # … plus gH·∂H/∂z = −gH·p·(log p + H)
                gh = grad_entropy[rows].to(accumulate) / temperature
                factor = (log_p + entropy[rows, None]).mul_(gh[:, None]).add_(g[:, None])
                grad_logits = log_p.exp_().mul_(factor).neg_()
            grad_logits[torch.arange(n, device=g.device), targets[rows]] += g
            grad_compute = grad_logits.to(compute)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_compute @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_compute.T @ hidden[rows].to(compute)).to(accumulate)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None,
        )  # fmt: skip


def _chunk_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """(chunk, V) logits / T: formed in the dtype of `weight` (the compute dtype), reduced in ≥ float32."""
    logits = hidden.to(weight.dtype) @ weight.T
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(weight.dtype, torch.float32))
    return logits / temperature if temperature != 1.0 else logits
