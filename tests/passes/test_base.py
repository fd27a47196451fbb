"""The pass contract: the manager verifies the IR after every pass, names a pass that breaks
it (an internal error, exit 3, not bad input), records what changed the model, and passes
compose in any order."""

import dataclasses

import pytest

from moecompile import frontend
from moecompile.cli import main
from moecompile.errors import InternalError
from moecompile.passes.base import Pass, PassContext, PassManager, PassResult
from moecompile.passes.reduce_top_k import ReduceTopK


class BreaksTopK(Pass):
    name = "breaks_top_k"

    def run(self, model, ctx):
        block = model.blocks[0]
        bad = dataclasses.replace(block, ffn=dataclasses.replace(block.ffn, top_k=99))
        return PassResult(dataclasses.replace(model, blocks=(bad, *model.blocks[1:])), True, {})


def test_a_broken_ir_names_the_pass(tiny_model):
    model = frontend.load(tiny_model("mixtral"))
    with pytest.raises(InternalError, match="pass breaks_top_k left an invalid IR: .*top_k 99"):
        PassManager([BreaksTopK()]).run(model, PassContext())


def test_a_broken_ir_exits_3_with_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    from moecompile import job

    monkeypatch.setattr(job, "passes_for", lambda options, router_mode: [BreaksTopK()])
    assert main([str(tiny_model("mixtral")), "-o", str(tmp_path / "x.gguf"), "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error: pass breaks_top_k" in err[0]
    assert not list(tmp_path.iterdir())


def test_history_records_only_passes_that_changed_the_model(tiny_model):
    model = frontend.load(tiny_model("mixtral"))
    same, done = PassManager([ReduceTopK(2, "plain")]).run(model, PassContext())
    assert same is model and not done[0][1].changed and same.history == ()
    fewer, done = PassManager([ReduceTopK(1, "plain")]).run(model, PassContext())
    assert done[0][1].changed and [h["pass"] for h in fewer.history] == ["top_k"]


def test_calibration_is_built_once_per_job(tiny_model):
    from moecompile.analysis.calibration import build_calib

    model = frontend.load(tiny_model("mixtral"))
    built = []
    ctx = PassContext(calibrate=lambda m: built.append(1) or build_calib(m, "add", 2))
    first = ctx.calibration(model, "a pass")
    assert ctx.calibration(model, "another pass") is first and built == [1]
    with pytest.raises(Exception, match="needs calibration data"):
        PassContext().calibration(model, "--experts")
