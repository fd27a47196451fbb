"""A pass at real size scores the model it made in a layer-major pass of its own; stopped there,
the saved state must be resumed only by the same pass with the same settings.

While a pass runs, the model it made still carries the original's history (the manager records
the pass when it returns), so the resume key of that scoring pass must name the change itself:
otherwise a pass with other settings, or the same pass's scoring of the original, resumes a
state of another model and reports its numbers."""

from __future__ import annotations

import pytest

from moecompile import frontend
from moecompile.passes.base import apply
from moecompile.passes.drop import DropBlocks
from moecompile.passes.prune_experts import PruneExperts
from moecompile.passes.reduce_top_k import ReduceTopK
from moecompile.passes.slim_experts import SlimExperts
from moecompile.runtime import resume as resume_module
from moecompile.runtime import streaming

FITNESS = ("fitness_before", "fitness_unpruned", "fitness_plain", "fitness")

CASES = {
    # (the pass stopped while it scores its model, the pass run next)
    "top_k": (lambda: ReduceTopK(1, "plain"), lambda: ReduceTopK(1, "plain")),
    "drops": (lambda: DropBlocks(1), lambda: DropBlocks(2)),
    "experts": (lambda: PruneExperts(2, "frequency"), lambda: PruneExperts(3, "frequency")),
    "width": (lambda: SlimExperts(0.5, "weight", "none"), lambda: SlimExperts(0.25, "weight",
                                                                             "none")),
}


@pytest.fixture(scope="module")
def mixtral(tiny_model, calib_of):
    model = frontend.load(tiny_model("mixtral", num_hidden_layers=3))
    return model, calib_of(model, "default", 4)  # text: a fitness of continuous values


def scores(report: dict) -> dict:
    return {k: report[k] for k in FITNESS if k in report}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_pass_stopped_while_scoring_its_model_is_resumed_by_that_pass_only(
        mixtral, tmp_path, monkeypatch, case):
    model, calib = mixtral
    first, second = CASES[case]
    monkeypatch.setattr(streaming, "STREAM_ABOVE", 0)
    monkeypatch.setenv(resume_module.ENV, str(tmp_path / "resume"))
    save = resume_module.Resume.save
    saves = []

    def counting(self, state):
        saves.append(self.folder.name)
        save(self, state)

    monkeypatch.setattr(resume_module.Resume, "save", counting)
    clean = scores(apply(second(), model, calib)[1])
    saves.clear()
    apply(first(), model, calib)
    last_pass = saves[-1]
    stop_at = len(saves) - 1  # the scoring pass's last save: every block that differs is in it

    def stopping(self, state):
        save(self, state)
        if len(saves) == stop_at:
            raise KeyboardInterrupt
        saves.append(self.folder.name)

    saves.clear()
    monkeypatch.setattr(resume_module.Resume, "save", stopping)
    with pytest.raises(KeyboardInterrupt):
        apply(first(), model, calib)
    assert (resume_module.cache_root() / last_pass).exists()  # its progress was kept
    monkeypatch.setattr(resume_module.Resume, "save", save)
    assert scores(apply(second(), model, calib)[1]) == clean
