"""Standard benchmarks through lm-evaluation-harness: `tools/eval.py MODEL --lm-eval TASKS`.

The harness's own task definitions (prompts, few-shot sampling, metrics, filters) run on
harness.MoeLM, so a score here is the score lm-eval would give the same model, computed in the
runtime the compiled file is meant for. lm-eval is an optional extra (`pip install -e
'.[eval]'`), imported only here and only when asked for.

A task is named as lm-eval knows it (arc_easy, hellaswag, mmlu, gsm8k, …), or is a YAML file of
the user's (e.g. a built-in task `include:`d with `dataset_path: json` and local files), or
lives in a folder given with `include` (lm-eval's --include_path). Every task is built before
anything is scored, one by one, so a task whose data cannot be had (no network and no cached
copy, a missing file) is refused by name with exit 2 instead of a traceback minutes later.

Each task comes back with every metric's value and, for the metrics that are means over
documents (acc, acc_norm, exact_match, …), each document's score by doc_id: what paired
comparison with the original needs.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..errors import UserError
from .backends import Backend

LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = (f"pip install -e '.[eval]' in the moecompile checkout (or pip install "
                f"lm-eval=={LM_EVAL_VERSION})")


def require_lm_eval():
    """The lm_eval module, or a UserError saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise UserError(f"--lm-eval needs lm-evaluation-harness, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return lm_eval


def _quiet(verbose: bool) -> None:
    """lm-eval and datasets log every step at INFO and draw progress bars: errors only, unless
    --verbose asks for lm-eval's own messages."""
    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def task_manager(specs: list[str], include: list[str]):
    """An lm-eval TaskManager that knows every spec: the user's folders and YAML files alone
    where they are enough (indexing lm-eval's ~15k built-in tasks takes seconds), with the
    built-in tasks otherwise."""
    from lm_eval.tasks import TaskManager

    for folder in include:
        if not Path(folder).is_dir():
            raise UserError(f"--lm-eval-include {folder}: not a folder")
    local = TaskManager(include_path=list(include) or None, include_defaults=False)
    if all(spec in local.all_tasks or _is_yaml(spec) for spec in specs):
        return local
    return TaskManager(include_path=list(include) or None, include_defaults=True)


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).is_file()


def check_tasks(manager, specs: list[str]) -> None:
    """Build each task (its dataset loaded) once, so the first one that cannot be had is
    named in a UserError."""
    for spec in specs:
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_file():
            raise UserError(f"--lm-eval {spec}: no such file")
        try:
            manager.load([spec])
        except KeyError:
            raise UserError(f"--lm-eval {spec}: not a task, group or tag of lm-eval "
                            f"{_version()}, nor a task YAML file (local task folders: "
                            "--lm-eval-include DIR)") from None
        except Exception as exc:  # noqa: BLE001 - datasets/hub/yaml failures, reported by name
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"lm-eval task {spec}: its data cannot be loaded "
                            f"({type(exc).__name__}: {first}); without network access a task "
                            "runs only from the Hugging Face cache or from local files "
                            "(dataset_path: json, see docs/eval.md)") from None


def _version() -> str:
    import lm_eval

    return lm_eval.__version__


def run_lm_eval(backend: Backend, specs: list[str], include: list[str] | None = None,
                num_fewshot: int | None = None, limit: int | float | None = None,
                batch_size: int = 8, verbose: bool = False) -> dict:
    """{task: {"metrics": {"metric[,filter]": {"value", "stderr", "per_doc"}}, "n"}}, the
    leaf tasks first, then groups (mmlu) with their subtasks' documents pooled."""
    lm_eval = require_lm_eval()
    _quiet(verbose)
    from .harness import MoeLM

    manager = task_manager(specs, include or [])
    check_tasks(manager, specs)
    out = lm_eval.simple_evaluate(model=MoeLM(backend, batch_size), tasks=list(specs),
                                  task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                  log_samples=True, bootstrap_iters=0)
    return collect(out)


def collect(out: dict) -> dict:
    """The harness's results and samples as {task: {"metrics": …, "n": …}}."""
    results, samples = out["results"], out.get("samples") or {}
    tasks: dict[str, dict] = {}
    for task, docs in samples.items():
        metrics: dict[str, dict] = {}
        outputs: dict[str, list] = {}  # what the model answered, per document (and filter)
        for doc in docs:
            filt = doc.get("filter", "none")
            doc_key = str(doc["doc_id"]) if filt == "none" else f"{doc['doc_id']},{filt}"
            outputs[doc_key] = _plain(doc.get("filtered_resps"))
            for metric in doc.get("metrics", []):
                key = metric if filt == "none" else f"{metric},{filt}"
                value = doc.get(metric)
                entry = metrics.setdefault(key, {"per_doc": {}})
                if isinstance(value, (bool, int, float)) and entry["per_doc"] is not None:
                    entry["per_doc"][str(doc["doc_id"])] = float(value)
                else:  # perplexity-style metrics aggregate tuples, not means of documents
                    entry["per_doc"] = None
        for key, entry in metrics.items():
            name = key if "," in key else f"{key},none"
            entry["value"] = _number(results.get(task, {}).get(name))
            entry["stderr"] = _number(results.get(task, {}).get(name.replace(",", "_stderr,", 1)))
        tasks[task] = {"metrics": metrics, "n": len({d["doc_id"] for d in docs}),
                       "outputs": outputs}
    for group, subtasks in (out.get("group_subtasks") or {}).items():
        members = [t for t in subtasks if t in tasks]
        if group in tasks or not members:
            continue
        metrics = {}
        for key in set.intersection(*(set(tasks[t]["metrics"]) for t in members)):
            parts = [tasks[t]["metrics"][key]["per_doc"] for t in members]
            per_doc = None if any(p is None for p in parts) else {
                f"{t}/{d}": v for t, p in zip(members, parts) for d, v in p.items()}
            value = (sum(per_doc.values()) / len(per_doc) if per_doc
                     else _number(results.get(group, {}).get(key if "," in key else key + ",none")))
            metrics[key] = {"per_doc": per_doc, "value": value, "stderr": None}
        tasks[group] = {"metrics": metrics, "n": sum(tasks[t]["n"] for t in members),
                        "subtasks": members}
    return tasks


def _plain(value):
    """Tuples as lists, numbers and strings as they are: JSON can hold it."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value
