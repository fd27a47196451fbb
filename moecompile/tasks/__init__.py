"""A small suite of synthetic tasks plus a held-out text corpus, to judge compressed models.

A compression pass (pruning or merging experts, quantizing) is only as good as what it keeps:
each task needs a different skill, so experts that specialise on one task show up as a drop in
exactly that task. Everything is generated locally and deterministically (no downloads).

    from moecompile.tasks import TASKS, examples, score
    for ex in examples("add", "test", 200):
        ok = score(ex, model_completion(ex.prompt))
"""

from .calibration import load_calibration
from .corpus import corpus_files, corpus_texts
from .examples import TASKS, Example, completion_answer, examples, score
from .generators import GENERATORS, SPLITS, split_of

__all__ = ["TASKS", "SPLITS", "Example", "examples", "score", "corpus_texts", "corpus_files",
           "load_calibration", "completion_answer", "GENERATORS", "split_of"]
