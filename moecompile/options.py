"""What a user asked for, as one frozen object, checked before any model is read.

The command line builds it (cli.py); the job reads it (job.py); nothing mutates it. Checks that
need the target's knowledge (which flags its runtime can honour) are the target's
(`Target.configure`); checks that need the model are the passes' and the target's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .errors import UserError
from .sizes import parse_size
from .widths import WidthRequest, parse as parse_width

DEFAULT_EVALUATIONS = 400  # EEP's search length (the released config's total_iter)
# children EEP makes from one archive state: how many candidates workers can score at once
# (analysis/eep.py `search`); the same with and without --ray, so both find the same; the
# Python API's default too (EEPConfig.batch)
DEFAULT_SEARCH_BATCH = 8


@dataclass(frozen=True)
class Options:
    model: str
    target: str = "gguf"
    output: str | None = None
    onnx_moe: str = "auto"
    dtype: str = "auto"
    quant: str | None = None
    quant_map: str | None = None
    budget: str | None = None
    allow_prune: bool = False
    ctx: int | None = None
    gpu_mem: str | None = None
    ram: str | None = None
    print_ir: bool = False
    plan: bool = False
    experts: int | None = None
    prune_method: str = "eep"
    expert_width: str | None = None
    shared_width: str | None = None
    width_method: str = "wanda"
    width_refit: str = "lsq"
    width_data: str = "calib+mix"
    sensitivity: str = "auto"
    calib: str | None = None
    calib_n: int = 32
    search_budget: str | None = None
    search_batch: int | None = None
    seed: int = 0
    top_k: int | None = None
    topk_method: str = "search"
    drop_blocks: int = 0
    drop_moe_layers: int = 0
    no_verify: bool = False
    device: str | None = None
    ray: str | None = None
    quiet: bool = False
    debug: bool = False

    @classmethod
    def from_namespace(cls, ns) -> "Options":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})

    # ------------------------------------------------------------------ derived values
    @property
    def budget_bytes(self) -> int | None:
        return parse_size(self.budget) if self.budget else None

    @property
    def widths_fit_the_mix(self) -> bool:
        """--width-data calib+mix: widths fitted to the calibration and the general text mix."""
        return self.width_data == "calib+mix"

    @property
    def expert_widths(self) -> WidthRequest | None:
        return parse_width(self.expert_width) if self.expert_width else None

    @property
    def shared_widths(self) -> WidthRequest | None:
        return parse_width(self.shared_width, "--shared-width") if self.shared_width else None

    @property
    def slimmed(self) -> bool:
        return bool(self.expert_width or self.shared_width)

    @property
    def searched(self) -> bool:
        """Does a pass search (EEP or top-k search) on calibration data?"""
        return (self.experts is not None or self.allow_prune
                or (self.top_k is not None and self.topk_method == "search"))

    @property
    def search_length(self) -> tuple[int, float | None]:
        """--search-budget: '400' (evaluations) or '90s' / '2m' (time) -> (evaluations,
        seconds)."""
        return parse_search_budget(self.search_budget)

    @property
    def batch(self) -> int:
        """--search-batch, or its default."""
        return DEFAULT_SEARCH_BATCH if self.search_batch is None else self.search_batch

    @property
    def calibrated(self) -> bool:
        """Does some flag run the model on calibration data?"""
        return bool(self.searched or self.slimmed or self.drop_blocks or self.drop_moe_layers
                    or self.quant == "auto" or (self.budget and not self.quant
                                                 and not self.quant_map))

    def validate(self) -> "Options":
        """Refuse inconsistent flags; returns self."""
        quantized = bool(self.quant or self.quant_map)
        if not self.calibrated and not quantized and (self.calib or self.search_budget):
            raise UserError("--calib/--search-budget only apply with --experts, --expert-width, "
                            "--top-k, --drop-blocks, --drop-moe-layers, --budget or "
                            "--quant/--quant-map (importance matrix)")
        if self.search_budget and not self.searched:
            raise UserError("--search-budget only applies to --experts, --allow-prune or --top-k "
                            "with search")
        if self.search_batch is not None and not self.searched:
            raise UserError("--search-batch only applies to --experts, --allow-prune or --top-k "
                            "with search")
        if self.search_batch is not None and not 1 <= self.search_batch <= 4096:
            raise UserError(f"--search-batch {self.search_batch}: must be between 1 and 4096")
        if self.ray is not None:
            if not (self.calibrated or (quantized and self.calib)):
                raise UserError("--ray only applies to work on calibration data: --experts, "
                                "--expert-width, --top-k, --drop-blocks, --drop-moe-layers, "
                                "--budget, --quant auto, or --quant/--quant-map with --calib")
            from .distributed.connect import check

            check(self.ray)  # the address's form, and Ray installed
        for flag, value in (("--budget", self.budget), ("--gpu-mem", self.gpu_mem),
                            ("--ram", self.ram)):
            if value is not None:
                parse_size(value, flag)  # malformed sizes fail before any model is read
        if self.ram and not self.gpu_mem:
            raise UserError("--ram only applies with --gpu-mem")
        if self.allow_prune and (not self.budget or self.quant not in (None, "auto")
                                 or self.quant_map or self.experts is not None
                                 or self.expert_width):
            raise UserError("--allow-prune applies to --budget (with --quant auto or no --quant) "
                            "without --experts or --expert-width (it chooses them)")
        self.expert_widths, self.shared_widths  # malformed widths fail here
        if (not self.slimmed and not self.allow_prune
                and (self.width_method != "wanda" or self.width_refit != "lsq"
                     or self.width_data != "calib+mix")):
            raise UserError("--width-method/--width-refit/--width-data apply to --expert-width, "
                            "--shared-width or --allow-prune")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k {self.top_k}: must be at least 1")
        if self.top_k is not None and self.experts is not None and self.top_k > self.experts:
            raise UserError(f"--top-k {self.top_k} exceeds the {self.experts} experts kept by "
                            "--experts")
        if self.drop_blocks < 0 or self.drop_moe_layers < 0:
            raise UserError("--drop-blocks/--drop-moe-layers must not be negative")
        if self.calib_n < 1:
            raise UserError(f"--calib-n {self.calib_n}: must be at least 1")
        if self.quant and self.quant_map:
            raise UserError("give --quant or --quant-map, not both")
        self.search_length  # a malformed --search-budget fails here
        if self.output is None and not self.print_ir and not self.plan:
            raise UserError(f"no output given: use -o OUT.{self.target} (or --plan / --print-ir "
                            "to see what would be written)")
        if self.output is not None:
            out, folder = output_place(self.output)
            if not folder and out.suffix != f".{self.target}":
                raise UserError(f"{out}: output for --target {self.target} must end in "
                                f".{self.target}")
        return self


def parse_search_budget(text: str | None) -> tuple[int, float | None]:
    """'400' (evaluations) or '90s' / '2m' (time) -> (evaluations, seconds)."""
    if text is None:
        return DEFAULT_EVALUATIONS, None
    t = text.strip().lower()
    try:
        if t.endswith("s"):
            return 10**9, float(t[:-1])
        if t.endswith("m"):
            return 10**9, 60 * float(t[:-1])
        value = int(t)
    except ValueError:
        value = 0
    if value < 1 or value > 10**7:
        raise UserError(f"--search-budget '{text}': expected a number of evaluations (e.g. 400) "
                        "or a time (e.g. 90s, 5m)")
    return value, None


def output_place(output: str) -> tuple[Path, bool]:
    """(path, is_folder) for `-o`: a file, or a folder (ending in / or existing) the file is
    named in; checked to be writable before any model is read."""
    out = Path(output)
    folder = output.endswith(("/", "\\")) or out.is_dir()
    parent = out.parent if not folder else out if out.exists() else out.parent
    if not parent.exists():
        raise UserError(f"{out}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a folder")
    return out, folder


def output_file(output: str, source: str, label: str, suffix: str, create: bool = True) -> Path:
    """OUT as given, or DIR/<model>-<label><suffix> for a folder (created, one level, like
    cp, unless `create` is false); the same rule on every target."""
    out, folder = output_place(output)
    if folder:
        if create and not out.exists():
            out.mkdir()
        out = out / f"{Path(source).name}-{label}{suffix}"
    if out.suffix != suffix:
        raise UserError(f"{out}: output for --target {suffix[1:]} must end in {suffix}")
    if out.is_dir():
        raise UserError(f"{out}: is a folder")
    return out
