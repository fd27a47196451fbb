"""The printed form of compare.compare()'s result: model and base side by side.

One table for every benchmark metric (value ± 95% half-width on each side, the difference
with its paired 95% interval), then the text report with llama-perplexity's names (Mean
PPL(Q)/PPL(base), Mean KLD, percentiles, Same top p, RMS Δp), so a reader can put it next to
numbers from llama.cpp.
"""

from __future__ import annotations

from .kld import PERCENTILES


def _value(s: dict | None) -> str:
    if not s or s.get("value") is None:
        return "–"
    if s.get("half_width") is None or s["half_width"] != s["half_width"]:  # none, or NaN (n=1)
        return f"{s['value']:.4f}"
    return f"{s['value']:.4f} ± {s['half_width']:.4f}"


def _diff(entry: dict) -> str:
    p = entry.get("paired")
    if p:
        return (f"{p['diff']:+.4f} [{p['low']:+.4f}, {p['high']:+.4f}] "
                f"({p['a_only']} / {p['b_only']})")
    m, b = entry.get("model", {}).get("value"), entry.get("base", {}).get("value")
    return f"{m - b:+.4f}" if m is not None and b is not None else "–"


def format_report(result: dict) -> str:
    base = result.get("base")
    lines = [f"model: {result['model']['name']} ({result['model']['runtime']})"]
    if base:
        lines.append(f"base:  {base['name']} ({base['runtime']})")
    if result["tasks"]:
        lines.append("")
        if base:
            lines += ["| benchmark | metric | n | model (± 95% CI) | base (± 95% CI) | "
                      "model − base [95% CI, paired] "
                      "(docs only model / only base scored higher) |",
                      "|---|---|---:|---:|---:|---|"]
        else:
            lines += ["| benchmark | metric | n | model (± 95% CI) |", "|---|---|---:|---:|"]
        for name, bench in result["tasks"].items():
            for metric, entry in bench["metrics"].items():
                row = f"| {name} | {metric} | {bench['n']} | {_value(entry['model'])} |"
                if base:
                    row += f" {_value(entry.get('base'))} | {_diff(entry)} |"
                lines.append(row)
    if "text" in result:
        lines += [""] + text_lines(result["text"], bool(base))
    return "\n".join(lines)


def _kl(x: float) -> str:
    """Six decimals as llama-perplexity prints them; tiny values (an F32 file) in e-notation."""
    return f"{x:.6f}" if x == 0 or abs(x) >= 1e-4 else f"{x:.3e}"


def text_lines(t: dict, with_base: bool) -> list[str]:
    head = (f"text: {t['name']}: {t['chunks']} chunks of {t['n_ctx']} tokens, second half of "
            f"each scored ({t['tokens']} tokens; llama-perplexity's convention)")
    if not with_base:
        return [head, f"  PPL(model)                 {t['ppl']:.4f}"]
    kl = t["kl"]
    lines = [head,
             f"  Mean PPL(model)            {t['ppl']:.4f}",
             f"  Mean PPL(base)             {t['base_ppl']:.4f}",
             f"  Mean PPL(model)/PPL(base)  {t['ppl_ratio']:.4f}",
             f"  Mean KLD(base‖model)       {_kl(kl['mean'])} ± {_kl(kl['stderr'])}",
             f"  Maximum KLD                {_kl(kl['max'])}"]
    for q in PERCENTILES:
        label = "Median KLD" if q == 50.0 else f"{q:g}% KLD"
        lines.append(f"  {label:<27}{_kl(kl[f'p{q:g}'])}")
    same = t["same_top"]
    lines += [f"  Minimum KLD                {_kl(kl['min'])}",
              f"  RMS Δp                     {100 * t['rms_delta_p']:.3f} %",
              f"  Same top p                 {100 * same['p']:.3f} ± {100 * same['stderr']:.3f} %"]
    return lines
