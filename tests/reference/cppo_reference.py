"""CPPO's mask and loss as its authors check them: a test fixture, not part of minpro.

Vendored from the tests of CPPO's official verl PR (verl-project/verl#6731, by a CPPO author),
as the fork ugadiarov-la-phystech-edu/custom_vcpo holds them at commit
f7aa93d20dcbd551aac9878fce68cf3a81e15228: tests/trainer/ppo/test_cppo_loss_on_cpu.py (Apache
License 2.0, Copyright 2024 Bytedance Ltd. and/or its affiliates;
https://www.apache.org/licenses/LICENSE-2.0). `_reference_mask` and `_reference_loss` are the
PR's "independent per-token loop implementation of the CPPO mask, written directly from the
paper's recurrences"; the PR's vectorized `compute_policy_loss_cppo` is not in any public
snapshot reachable here. Verbatim; `config` builds the OmegaConf object they read.
"""

# ruff: noqa
import math

import numpy as np
import torch


class _Node(dict):
    def __getattr__(self, name):
        return self[name]


def config(delta=0.15, clip_ratio_c=20.0, w_min=0.8, delta_b=0.02, delta_b_q=0.9, delta_b_k=1.0,
           delta_b_max_mult=5.0, w_len_mode="sequence"):
    """The PR's `_config`, without OmegaConf (attribute access and `.get` are all it uses)."""
    cppo = _Node(cppo_w_min=w_min, cppo_delta_b=delta_b, cppo_delta_b_q=delta_b_q, cppo_delta_b_k=delta_b_k,
                 cppo_delta_b_max_mult=delta_b_max_mult, cppo_w_len_mode=w_len_mode)
    return _Node(clip_ratio=delta, clip_ratio_c=clip_ratio_c, policy_loss=_Node(loss_mode="cppo", cppo=cppo))


def _reference_mask(log_prob, old_log_prob, advantages, response_mask, cfg):
    """Independent per-token loop implementation of the CPPO mask, written
    directly from the paper's recurrences (not from the vectorized code)."""
    delta = float(cfg.clip_ratio)
    w_min = float(cfg.policy_loss.cppo.cppo_w_min)
    db_floor = float(cfg.policy_loss.cppo.cppo_delta_b)
    q = float(cfg.policy_loss.cppo.cppo_delta_b_q)
    k = float(cfg.policy_loss.cppo.cppo_delta_b_k)
    db_mult = float(cfg.policy_loss.cppo.get("cppo_delta_b_max_mult", 5.0))
    w_len_mode = str(cfg.policy_loss.cppo.get("cppo_w_len_mode", "sequence"))
    lp = log_prob.detach().numpy()
    olp = old_log_prob.detach().numpy()
    adv = advantages.detach().numpy()
    m = response_mask.numpy().astype(float)
    b, t_len = m.shape
    out = np.zeros_like(m)
    for i in range(b):
        d_row = np.abs(np.exp(lp[i]) - np.exp(olp[i])) * m[i]
        valid = m[i] > 0
        if valid.any():
            db_seq = float(np.clip(k * np.quantile(d_row[valid], q), db_floor, db_mult * db_floor))
        else:
            db_seq = db_floor
        # "sequence" spans this row's own valid length (paper Eq. 9); "padded" spans the
        # padded response width (reference implementation).
        t_span = float(m[i].sum()) if w_len_mode == "sequence" else float(t_len)
        s_prev, w_prev = 0.0, 0.0
        for t in range(t_len):
            pos = t + 1  # 1-based absolute token position
            # Algorithm 1 line 3 verbatim: w_t = 1 - (1 - w_min)(t - 1)/(T - 1)
            elapsed = min(max((pos - 1.0) / max(t_span - 1.0, 1.0), 0.0), 1.0)
            w_t = (1.0 - (1.0 - w_min) * elapsed) * m[i, t]
            z_t = w_t * d_row[t]
            c_t = min(delta, delta + db_seq * w_prev - s_prev)
            ratio = math.exp(min(max(lp[i, t] - olp[i, t], -20.0), 20.0))
            toward_mu = adv[i, t] * (ratio - 1.0) <= 0.0
            keep = (toward_mu or z_t <= c_t) and m[i, t] > 0
            out[i, t] = 1.0 if keep else 0.0
            s_prev += z_t
            w_prev += w_t
    return torch.from_numpy(out).float()


def _reference_loss(log_prob, old_log_prob, advantages, response_mask, cfg, rollout_is_weights=None):
    """Closed-form loss from the reference mask (seq-mean-token-mean over the
    full response_mask, matching agg_loss semantics)."""
    mask = _reference_mask(log_prob, old_log_prob, advantages, response_mask, cfg)
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0)).detach()
    w = torch.clamp(ratio, max=float(cfg.clip_ratio_c))
    pg = -advantages * w * log_prob * mask
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    m = response_mask.float()
    per_seq = (pg * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)
    return per_seq.mean()
