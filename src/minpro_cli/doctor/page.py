"""`minpro doctor --html`: one self-contained page (no script, no external file) with the
verdicts and, per response, its tokens coloured by |Δ log p| (sampler vs trainer) and by the
on-policy ρ̲_t. Only response tokens are coloured: the prompt is shown plain, padding never."""

from __future__ import annotations

import html
from dataclasses import dataclass

from minpro_cli.doctor.findings import Finding, worst

COLOURS = {"ok": "#2e7d32", "warn": "#ef6c00", "fail": "#c62828"}


@dataclass(frozen=True)
class ResponseView:
    prompt: str
    tokens: list[str]
    abs_delta: list[float]  # |log μ − log π_trainer| per token
    min_prefix: list[float]  # on-policy ρ̲_t per token
    reward: float


def shade(strength: float, rgb: tuple[int, int, int]) -> str:
    """White at strength 0, `rgb` at 1."""
    s = min(max(strength, 0.0), 1.0)
    r, g, b = (round(255 - (255 - c) * s) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def token_spans(tokens: list[str], values: list[float], strength: list[float], rgb: tuple[int, int, int]) -> str:
    return "".join(
        f'<span class="t" style="background:{shade(s, rgb)}" title="{v:.3g}">{html.escape(t) or "∅"}</span>'
        for t, v, s in zip(tokens, values, strength)
    )


def render(title: str, findings: list[Finding], views: list[ResponseView], delta_scale: float) -> str:
    """The page: a verdict table, then each response twice (|Δ log p| in red up to `delta_scale`,
    1 − ρ̲_t in blue up to 0.5)."""
    rows = "".join(
        f'<tr><td>{html.escape(f.title)}</td><td style="color:{COLOURS[f.verdict]};font-weight:bold">{f.verdict}</td>'
        f"<td>{'' if f.value is None else f'{f.value:.4g}'}</td><td>{html.escape(f.threshold)}</td>"
        f"<td>{html.escape(f.advice)}</td></tr>"
        for f in findings
    )
    blocks = "".join(
        f'<div class="r"><div class="p">{html.escape(v.prompt)}</div>'
        f'<div><span class="k">|Δ log p|</span>{token_spans(v.tokens, v.abs_delta, [d / delta_scale for d in v.abs_delta], (198, 40, 40))}</div>'
        f'<div><span class="k">ρ̲_t</span>{token_spans(v.tokens, v.min_prefix, [(1 - m) / 0.5 for m in v.min_prefix], (21, 101, 192))}</div>'
        f'<div class="k">reward {v.reward:g}</div></div>'
        for v in views
    )  # fmt: skip
    verdict = worst(findings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:1.5em;max-width:80em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;font-size:.9em}}
.r{{border-top:1px solid #ddd;padding:.5em 0}} .p{{color:#777;white-space:pre-wrap;font-size:.85em}}
.t{{font-family:monospace;white-space:pre-wrap;border-right:1px solid #eee}} .k{{color:#555;font-size:.8em;margin-right:.6em}}
</style></head><body>
<h1>{html.escape(title)}: <span style="color:{COLOURS[verdict]}">{verdict}</span></h1>
<table><tr><th>check</th><th>verdict</th><th>value</th><th>threshold</th><th>what to do</th></tr>{rows}</table>
<h2>Responses</h2>
<p>Response tokens only (the prompt in grey, never coloured; no padding). Red: |log μ − log π| of the
sampler's record against the trainer's forward, full at {delta_scale:g}. Blue: on-policy ρ̲_t = min over
earlier tokens of π/μ, full at 0.5. Hover a token for its value.</p>
{blocks}
</body></html>
"""
