"""`hf` sampler: batched ancestral sampling with a transformers model and its KV cache.

Written as a plain loop rather than `model.generate` so that the recorded log-prob is
exactly the one of the distribution the token was drawn from (no hidden top-k = 50
default, no processed-vs-raw score ambiguity).
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr
from transformers.cache_utils import DynamicCache, DynamicLayer

from minpro_cli.console import console, warn
from minpro_cli.hardware import emulated_bf16_advice
from minpro_cli.logprobs import positions_from_mask
from minpro_cli.modeling import Policy, eager, weights_written
from minpro_cli.samplers import Generation, SamplingParams, WeightSwitch


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k set and outside the smallest top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class HFSampler(SamplingParams):
    """Transformers model with a KV cache; records log μ of the distribution actually sampled.

    The fields are the `hf` sampler's options: the shared sampling options and its batch size.
    """

    switches_weights: ClassVar[bool] = True  # generate(…, switches=…): partial rollouts

    batch_size: int = Field(256, ge=1, description="prompts per generation batch")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="sample with the sampler's own copy of the weights in this dtype, refreshed when the policy's "
        "weights change (not cast per token), while training keeps its precision: an inference engine's "
        "sampler–trainer mismatch; null: the policy's own weights",
    )
    # one copy in `dtype`, reused for whichever policy model samples (training, stale, eval):
    # (the model it copies, the copy, that model's weight versions when copied)
    _copy: tuple[torch.nn.Module, torch.nn.Module, tuple[int, ...]] | None = PrivateAttr(default=None)

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The precision this sampler holds weights in (None: the policy's): copies made only for
        sampling (stale weights, LoRA merges, FSDP2) are kept in it."""
        return getattr(torch, self.dtype) if self.dtype else None

    def sampling_model(self, policy: Policy) -> torch.nn.Module:
        """The module that samples: the policy's, or this sampler's `dtype` copy of it, reloaded
        only when another model samples or a weight was written since (every in-place write bumps
        a tensor's version): a cast per weights version, not per token."""
        dtype = self.weights_dtype
        if dtype is None or next(policy.model.parameters()).dtype == dtype:
            return policy.model
        written = weights_written(policy.model)
        held = self._copy
        if held is not None and held[0] is policy.model and held[2] == written:
            return held[1]
        if held is not None and same_shapes(held[1], policy.model):
            held[1].load_state_dict(policy.model.state_dict())  # cast into the copy's dtype, in place
            copied = held[1]
        else:
            self._copy = None  # release the old copy before making one of another shape
            copied = copy.deepcopy(policy.model).to(dtype)
            console.print(f"hf sampler: a {self.dtype} copy of the weights ({self.held_bytes(copied) / 2**20:.0f} MB)")
            if dtype == torch.bfloat16 and (advice := emulated_bf16_advice("sampler.options.dtype", policy.model.device)):
                warn(advice)
        self._copy = (policy.model, copied, written)
        return copied

    @staticmethod
    def held_bytes(model: torch.nn.Module) -> int:
        """Bytes of a sampling copy's weights and buffers."""
        return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))

    def generate(
        self, policy: Policy, prompts: list[list[int]], seed: int, switches: Sequence[WeightSwitch] = ()
    ) -> list[Generation]:
        """`switches`: the weights change at these response tokens; every batch of `batch_size`
        prompts replays them (a switch at token 0 sets the weights each batch starts with)."""
        return self._decode(policy, prompts, seed, None, switches)

    def replay(self, policy: Policy, prompts: list[list[int]], responses: list[list[int]]) -> list[Generation]:
        """Teacher-forced: the log-prob this sampler's decode path gives each of `responses`'
        tokens, batched as `generate` batched them. Same weights, precision and kernels, so a
        recorded log μ comes back (within 1e-4, tested): the check that it is the distribution
        sampled, which a different forward of low-precision weights cannot make."""
        return self._decode(policy, prompts, 0, responses)

    def _decode(
        self, policy: Policy, prompts: list[list[int]], seed: int, forced: list[list[int]] | None,
        switches: Sequence[WeightSwitch] = (),
    ) -> list[Generation]:  # fmt: skip
        generator = torch.Generator(device=policy.model.device).manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            window = slice(start, start + self.batch_size)
            out.extend(self._generate_batch(policy, prompts[window], generator,
                                            None if forced is None else forced[window], switches))  # fmt: skip
        return out

    @torch.no_grad()
    def _generate_batch(
        self, policy: Policy, prompts: list[list[int]], generator: torch.Generator,
        forced: list[list[int]] | None = None, switches: Sequence[WeightSwitch] = (),
    ) -> list[Generation]:  # fmt: skip
        """Decode until every row has ended. Rows that ended leave the batch (and the KV cache)
        once they are 1/COMPACT_EVERY of it, so the cost follows the tokens actually sampled.
        `forced`: take these tokens instead of drawing (each ends at its EOS or the length limit).
        At a switch's token the new weights re-read prompt and response so far into a new cache
        (as an engine that resumes an aborted request does), then decoding goes on."""
        pending = sorted(switches, key=lambda s: s.at)
        while pending and pending[0].at == 0:
            pending.pop(0).load()
        model = self.sampling_model(policy)
        device = model.device
        batch, prompt_len = len(prompts), max(len(p) for p in prompts)
        width = prompt_len + self.max_new_tokens
        input_ids, attention = left_padded(prompts, width, policy.pad_token_id, device)
        step_pos = positions_from_mask(attention[:, :prompt_len])

        tokens = torch.full((batch, self.max_new_tokens), policy.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, self.max_new_tokens), device=device)
        lengths = torch.full((batch,), self.max_new_tokens, dtype=torch.long, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)  # original index of each row still in the batch
        cache = preallocated_cache(model, width)
        step_ids = input_ids
        given = None if forced is None else padded_tokens(forced, self.max_new_tokens, policy.pad_token_id, device)
        with eager(model):  # blocks compiled for training (train.compile) would recompile at every cache length
            for t in range(self.max_new_tokens):
                if pending and pending[0].at == t:
                    pending.pop(0).load()
                    model = self.sampling_model(policy)
                    cache = preallocated_cache(model, width)
                    step_ids = torch.cat([input_ids[rows], tokens[rows, :t]], dim=1)
                    step_pos = positions_from_mask(attention[:, : prompt_len + t])
                output = model(input_ids=step_ids, attention_mask=attention[:, : prompt_len + t], position_ids=step_pos,
                               cache=cache, use_cache=True, logits_to_keep=1)
                logp = self.sampling_logprobs(output.logits[:, -1])
                # one uniform per original row, drawn whether or not it is still in the batch:
                # a row's tokens do not depend on when the others end
                uniform = torch.rand(batch, generator=generator, device=device)[rows]
                next_tok = inverse_cdf_draw(logp, uniform) if given is None else given[rows, t]
                done = ended[rows]
                next_tok = torch.where(done, policy.pad_token_id, next_tok)
                tokens[rows, t] = next_tok
                logprobs[rows, t] = torch.where(done, 0.0, logp.gather(-1, next_tok[:, None]).squeeze(-1))
                hit_eos = (next_tok == policy.eos_token_id) & ~done
                lengths[rows] = torch.where(hit_eos, t + 1, lengths[rows])  # the first EOS is part of the response
                still_running = ~(done | hit_eos)
                ended[rows] = ~still_running
                running = int(still_running.sum())  # the one host sync per step: stop, or drop ended rows
                if running == 0:
                    break
                step_ids, step_pos = next_tok[:, None], step_pos[:, -1:] + 1
                if (len(rows) - running) * COMPACT_EVERY >= len(rows):
                    keep = still_running.nonzero().squeeze(-1)
                    rows, step_ids, step_pos, attention = rows[keep], step_ids[keep], step_pos[keep], attention[keep]
                    cache.batch_select_indices(keep)

        return generations(tokens, logprobs, lengths, ended)

    def sampling_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """log μ over the vocabulary (B, V): the temperature, then top-k / top-p truncation."""
        logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.log_softmax(truncate_logits(logits, self.top_k, self.top_p), dim=-1)


def generations(
    tokens: torch.Tensor, logprobs: torch.Tensor, lengths: torch.Tensor, ended: torch.Tensor
) -> list[Generation]:
    """Each row's first `length` tokens and log-probs; rows that never ended hit the length limit."""
    tokens_host, logprobs_host = tokens.cpu(), logprobs.cpu()
    return [
        Generation(tokens_host[i, :n].tolist(), logprobs_host[i, :n].tolist(), "stop" if end else "length")
        for i, (n, end) in enumerate(zip(lengths.tolist(), ended.tolist()))
    ]


def padded_tokens(rows: list[list[int]], width: int, pad_token_id: int, device: torch.device) -> torch.Tensor:
    """(B, width) token ids, right-padded with `pad_token_id` (rows longer than width are cut)."""
    out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : min(len(row), width)] = torch.tensor(row[:width], dtype=torch.long)
    return out.to(device)


def left_padded(
    prompts: list[list[int]], width: int, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one left-padded batch, and an attention mask with every column the decode
    will need (`width`), allocated once: step t attends to the first prompt_len + t."""
    prompt_len = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), prompt_len), pad_token_id, dtype=torch.long)
    attention = torch.ones((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, prompt_len - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention[i, : prompt_len - len(p)] = 0
    return input_ids.to(device), attention.to(device)


COMPACT_EVERY = 8  # drop ended rows once they are 1/8 of the batch: each drop copies the KV cache


def inverse_cdf_draw(logp: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax-normalised `logp` (B, V), given one U[0, 1) per row.

    Token v is drawn when C_{v−1} ≤ u·C_V < C_v, C the cumulative probabilities: probability
    p_v exactly (up to float rounding of C), tokens with p = 0 never. One cumsum and one
    binary search, far cheaper than `torch.multinomial`."""
    cdf = logp.exp().cumsum(-1)
    total = cdf[:, -1:]
    # keep u·C_V below C_V even at u = 1, or a trailing token of probability 0 (truncated, or
    # underflowed) would be drawn
    target = torch.minimum(uniform[:, None].to(cdf.dtype) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """One attention layer's keys and values in a buffer of the final width, written in place:
    no `torch.cat` per step. Dropping rows (`batch_select_indices`) copies the buffer once."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, key_states.shape[-1]))
        self.value_buffer = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]


def same_shapes(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether b's state dict loads into a: the same names and shapes."""
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def preallocated_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """The model's own dynamic cache, with every plain attention layer preallocated to
    `capacity` tokens (sliding-window and other special layers keep transformers' own)."""
    cache = DynamicCache(config=model.config)
    if cache.layers:
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    else:
        cache.layer_class_to_replicate = functools.partial(PreallocatedLayer, capacity)
    return cache
