"""Calibration data as the passes see it: token ids with the positions that are scored.

Expert pruning, top-k search and quantization sensitivity all judge a candidate by running it
on the same small set of inputs; a job builds it once and hands it to whatever needs it. This
module turns a `--calib` spec (suite task names, a `.jsonl` of prompt/answer pairs, or a
`.txt`) into one right-padded batch, tokenized with the model's own tokenizer, and records
which next-token predictions count:

- task examples: the answer tokens (prompt and answer tokenized separately and concatenated,
  exactly what greedy generation after the prompt sees). A candidate's accuracy is the share of
  examples whose every answer token is the argmax under teacher forcing — which is precisely
  "greedy decoding reproduces the answer", at the cost of one forward pass;
- text: every token after the first; candidates are scored by their divergence from the
  original model's distributions on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompile import ir
from moecompile.errors import UserError
from moecompile.tasks import Example, load_calibration

TEXT_TOKENS = 128  # a .txt chunk is cut to this many tokens


@dataclass
class CalibSet:
    spec: str
    kind: str  # "tasks" (exact-match fitness) or "text" (divergence from the original)
    ids: torch.Tensor  # (B, T), right-padded
    mask: torch.Tensor  # (B, T), 1 on real tokens
    targets: torch.Tensor  # (B, T): the token predicted at t where scored, -100 elsewhere
    per_item: int = 0  # the n it was built with (examples per task, lines or chunks of a file)

    @property
    def n_examples(self) -> int:
        return self.ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def subset(self, rows: list[int]) -> "CalibSet":
        """The examples `rows`, in that order, at the same width (a shard of the set)."""
        return CalibSet(self.spec, self.kind, self.ids[rows], self.mask[rows], self.targets[rows],
                        self.per_item)

    def joined(self, other: "CalibSet") -> "CalibSet":
        """This set's examples, then `other`'s, padded to one width: inputs for activation
        statistics only (a fitness needs one kind of scoring: the result keeps this set's kind
        and is not meant to be scored)."""
        width = max(self.ids.shape[1], other.ids.shape[1])

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return CalibSet(f"{self.spec} + {other.spec}", self.kind,
                        torch.cat([pad(self.ids, 0), pad(other.ids, 0)]),
                        torch.cat([pad(self.mask, 0), pad(other.mask, 0)]),
                        torch.cat([pad(self.targets, -100), pad(other.targets, -100)]),
                        self.per_item)


def load_tokenizer(model: ir.Model):
    """The model's tokenizer (transformers' loader: tokenizer.json or tokenizer.model)."""
    from transformers import AutoTokenizer

    if model.tokenizer is None:
        raise UserError(f"{model.source}: no tokenizer files; calibration needs the model's "
                        "tokenizer (tokenizer.json or tokenizer.model)")
    return AutoTokenizer.from_pretrained(str(model.tokenizer.path))


def build_calib(model: ir.Model, spec: str, n: int = 32, skip: int = 0) -> CalibSet:
    """`n` examples per task (or `n` lines/chunks of a file), tokenized for `model`; `skip`
    leaves out the first ones (a held-out set of the same kind)."""
    items = load_calibration(spec, n, skip)
    tok = load_tokenizer(model)
    bos = [model.tokenizer.bos_id] if model.tokenizer.add_bos and model.tokenizer.bos_id is not None else []
    rows: list[tuple[list[int], int]] = []  # ids, first scored target position
    if items and isinstance(items[0], Example):
        kind = "tasks"
        for ex in items:
            p = bos + tok.encode(ex.prompt, add_special_tokens=False)
            a = tok.encode(ex.answer, add_special_tokens=False)
            if not a:
                raise UserError(f"calibration example with an empty answer: {ex.prompt!r}")
            rows.append((p + a, len(p)))
    else:
        kind = "text"
        for text in items:
            ids = (bos + tok.encode(text, add_special_tokens=False))[:TEXT_TOKENS]
            if len(ids) >= 2:
                rows.append((ids, 1))
    if not rows:
        raise UserError(f"calibration '{spec}' has no usable examples")
    width = max(len(r) for r, _ in rows)
    if width > model.context_length:
        raise UserError(f"calibration examples of {width} tokens exceed the model's context "
                        f"of {model.context_length}")
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, first) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        # position t predicts token t+1: scored targets are tokens first..len-1
        targets[i, first - 1:len(seq) - 1] = torch.tensor(seq[first:])
    return CalibSet(spec, kind, ids, mask, targets, n)


def spread_rows(calib: CalibSet, tokens: int) -> list[int]:
    """Calibration sequences holding `tokens` real tokens (at least one), spread evenly over
    the set: its items come grouped (task by task, or a text mix source by source), and the
    first ones hold only the first tasks — at --calib all --calib-n 24 the bundled model's
    first sequences holding 1024 tokens were add, sort, rev and two max examples, no brackets
    or shift. What a measurement too costly for every token (layer-local errors, every
    expert on a token) is taken on."""
    lengths = calib.mask.sum(1).tolist()
    n = len(lengths)
    for m in range(max(1, min(n, tokens // max(max(lengths), 1))), n + 1):
        rows = sorted({j * n // m for j in range(m)})
        if sum(lengths[i] for i in rows) >= tokens:
            return rows
    return list(range(n))


def held_out(model: ir.Model, calib: CalibSet) -> CalibSet | None:
    """The items of `calib`'s spec after the ones it holds, as many per task (or lines or
    chunks) as it took: data of the same kind that nothing was fitted to. None where the spec
    has nothing more."""
    try:
        return build_calib(model, calib.spec, calib.per_item, skip=calib.per_item)
    except UserError:
        return None
