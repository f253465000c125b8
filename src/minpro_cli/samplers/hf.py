"""`hf` sampler: batched ancestral sampling with a transformers model and its KV cache.

Written as a plain loop rather than `model.generate` so that the recorded log-prob is
exactly the one of the distribution the token was drawn from (no hidden top-k = 50
default, no processed-vs-raw score ambiguity).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from minpro_cli.modeling import Policy, positions_from_mask
from minpro_cli.samplers import Generation


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


class HFSampler(BaseModel):
    """Transformers model with a KV cache; records log μ of the distribution actually sampled.

    The fields are the `hf` sampler's options (defaults: plain temperature sampling, no truncation).
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k")
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(256, ge=1, description="prompts per generation batch")

    def generate(self, policy: Policy, prompts: list[list[int]], seed: int) -> list[Generation]:
        generator = torch.Generator(device=policy.model.device).manual_seed(seed)
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self._generate_batch(policy, prompts[start : start + self.batch_size], generator))
        return out

    @torch.no_grad()
    def _generate_batch(
        self, policy: Policy, prompts: list[list[int]], generator: torch.Generator
    ) -> list[Generation]:
        model, device = policy.model, policy.model.device
        batch, prompt_len = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((batch, prompt_len), policy.pad_token_id, dtype=torch.long, device=device)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, prompt_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention[i, prompt_len - len(p) :] = 1
        positions = positions_from_mask(attention)

        tokens = torch.full((batch, self.max_new_tokens), policy.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, self.max_new_tokens), device=device)
        lengths = torch.full((batch,), self.max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        past = None
        step_ids, step_pos = input_ids, positions
        for t in range(self.max_new_tokens):
            output = model(
                input_ids=step_ids,
                attention_mask=attention,
                position_ids=step_pos,
                cache=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = output.cache
            logits = truncate_logits(output.logits[:, -1].float() / self.temperature, self.top_k, self.top_p)
            logp = torch.log_softmax(logits, dim=-1)
            next_tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            next_tok = torch.where(done, policy.pad_token_id, next_tok)
            tokens[:, t] = next_tok
            logprobs[:, t] = logp.gather(-1, next_tok.unsqueeze(-1)).squeeze(-1)
            hit_eos = (next_tok == policy.eos_token_id) & ~done
            lengths = torch.where(hit_eos, t + 1, lengths)  # the first EOS is part of the response
            done |= hit_eos
            if bool(done.all()):
                break
            step_ids = next_tok.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            attention = torch.cat([attention, torch.ones_like(step_ids)], dim=-1)

        results = []
        for i in range(batch):
            n = int(lengths[i])
            ended = n <= self.max_new_tokens and bool(done[i])
            results.append(
                Generation(
                    token_ids=tokens[i, :n].tolist(),
                    logprobs=logprobs[i, :n].tolist(),
                    finish_reason="stop" if ended else "length",
                )
            )
        return results
