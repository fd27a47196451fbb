"""A compiled file against its original, benchmark by benchmark: what tools/eval.py runs.

Every benchmark asked for (the bundled model's built-in tasks, the user's JSONL tasks, lm-eval
tasks) runs on the model and, given a base, on the base, over the same documents; each metric
that is a mean over documents gets the difference with a paired confidence interval (see
paired.py). A text (the user's, or the built-in held-out Python source) gets perplexity and,
against the base, the KL report in llama-perplexity's convention (kld.py). The result keeps
every document's outcome on both sides, for --json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .backends import Backend, open_backend
from .kld import text_chunks, text_report
from .memory import check_hf_fits
from .paired import mean_ci, paired_difference

BUILTIN_TEXT = "held-out Python stdlib source"
BUILTIN_TEXT_CHUNKS = 16  # 16 chunks of 512 tokens: 8192 tokens, 4080 of them scored


@dataclass
class Plan:
    """What to measure; the defaults are tools/eval.py's."""
    builtin_tasks: list[str] = field(default_factory=list)
    n: int = 200  # test prompts per built-in task
    user_tasks: Path | None = None
    lm_eval: list[str] = field(default_factory=list)
    lm_eval_include: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | float | None = None
    text: Path | None = None
    builtin_text: bool = False  # perplexity (and KL) on the held-out stdlib source
    ctx: int = 512  # tokens per chunk of the text report (llama-perplexity's -c)
    chunks: int | None = None  # at most this many chunks (llama-perplexity's --chunks)
    batch_size: int = 8
    max_length: int | None = None  # longest sequence given to a model (n_ctx of a .gguf)
    max_memory: int | None = None  # for an HF folder in transformers (default: MemAvailable)
    progress: bool = True
    verbose: bool = False


def open_model(path: str, plan: Plan) -> Backend:
    """A backend for the path, an HF folder only once check_hf_fits says it fits."""
    folder = Path(path)
    if folder.is_dir() and (folder / "config.json").exists():
        check_hf_fits(folder, plan.batch_size, plan.ctx, plan.max_memory)
    return open_backend(path, context=plan.max_length)


def benchmarks(backend: Backend, plan: Plan) -> dict:
    """{benchmark: {"metrics": {metric: {"value", "per_doc", …}}, "n", …}} for one model."""
    from .metrics import task_accuracy

    out: dict[str, dict] = {}
    for task in plan.builtin_tasks:
        r = task_accuracy(backend, task, plan.n, plan.batch_size, plan.progress)
        per_doc = {str(i): float(c) for i, c in enumerate(r["correct"])}
        out[task] = {"metrics": {"exact_match": {"value": r["accuracy"], "per_doc": per_doc}},
                     "n": r["n"]}
    if plan.user_tasks is not None:
        from .user_tasks import load_user_tasks, score_user_tasks

        docs = load_user_tasks(plan.user_tasks)
        for name, r in score_user_tasks(backend, docs, Path(plan.user_tasks).stem,
                                        plan.batch_size).items():
            out[name] = {**r, "n": len(next(iter(r["metrics"].values()))["per_doc"])}
    if plan.lm_eval:
        from .benchmarks import run_lm_eval

        out.update(run_lm_eval(backend, plan.lm_eval, plan.lm_eval_include, plan.num_fewshot,
                               plan.limit, plan.batch_size, plan.verbose))
    return out


def _text(plan: Plan) -> tuple[str, str, int | None] | None:
    """(name, text, chunk cap) of the text to report on, or None."""
    if plan.text is not None:
        try:
            return str(plan.text), Path(plan.text).read_text(encoding="utf-8"), plan.chunks
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--text {plan.text}: cannot read ({exc})") from None
    if plan.builtin_text:
        from ..tasks import corpus_texts

        return BUILTIN_TEXT, "\n".join(corpus_texts("test")), plan.chunks or BUILTIN_TEXT_CHUNKS
    return None


def compare(model: "str | Backend", base: "str | Backend | None", plan: Plan) -> dict:
    """Everything the plan asks for, on the model and (if given) the base, side by side."""
    mb = model if isinstance(model, Backend) else open_model(model, plan)
    bb = base if isinstance(base, Backend) or base is None else open_model(base, plan)
    result: dict = {"model": {"name": mb.name, "runtime": mb.runtime}, "tasks": {}}
    if bb is not None:
        result["base"] = {"name": bb.name, "runtime": bb.runtime}
    model_scores = benchmarks(mb, plan)
    base_scores = benchmarks(bb, plan) if bb is not None else {}
    for name, r in model_scores.items():
        result["tasks"][name] = _side_by_side(r, base_scores.get(name))
    text = _text(plan)
    if text is not None:
        name, body, cap = text
        reference = bb if bb is not None else mb
        ctx = min(plan.ctx, mb.context, reference.context)
        chunks = text_chunks(reference, body, ctx, cap, name)
        result["text"] = {"name": name, **text_report(mb, chunks, bb, progress=plan.progress)}
    return result


def _side_by_side(model: dict, base: dict | None) -> dict:
    """Per metric: the model's value (and CI), the base's, and the paired difference."""
    out = {"n": model["n"], "metrics": {}}
    if "subtasks" in model:
        out["subtasks"] = model["subtasks"]
    for key, m in model["metrics"].items():
        entry = {"model": _summary(m)}
        b = (base or {}).get("metrics", {}).get(key)
        if b is not None:
            entry["base"] = _summary(b)
            if m.get("per_doc") is not None and b.get("per_doc") is not None:
                shared = [d for d in m["per_doc"] if d in b["per_doc"]]
                if len(shared) >= 2:
                    entry["paired"] = paired_difference([m["per_doc"][d] for d in shared],
                                                        [b["per_doc"][d] for d in shared])
        out["metrics"][key] = entry
    for side, r in (("model", model), ("base", base)):
        if r and "outputs" in r:
            out.setdefault("outputs", {})[side] = r["outputs"]
    return out


def _summary(m: dict) -> dict:
    """Value with its 95% half-width where the metric is a mean over documents."""
    if m.get("per_doc"):
        ci = mean_ci(list(m["per_doc"].values()))
        return {"value": ci["mean"], "half_width": ci["half_width"], "n": ci["n"],
                "per_doc": m["per_doc"]}
    return {"value": m.get("value"), "half_width": None, "per_doc": None}
