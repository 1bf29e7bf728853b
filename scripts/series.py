"""One way to name an attention setting everywhere: train.py's own Hydra overrides, optionally labelled.

A *series* is one string: the overrides, `model=<kind>` among them, after an optional label and a colon.

    model=full                                                      -> label "full"
    model=fma model.attention.block_size=32                         -> label "fma block_size=32"
    fma m=32 p=2: model=fma model.attention.block_size=32 model.attention.rank=2
                                                                    -> label "fma m=32 p=2"

The label ends at the first colon, so a label holds none (and an override whose value holds one needs
a label before it). Without a label, a series is named by its kind and its other overrides, `model.`
and `model.attention.` left out. The sweeps (runlib.py) and the benchmarks (benchlib.py) take their
`--series` in this form, so a setting reads the same as on train.py's command line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "e.g. model=full or 'fma m=32 p=2: model=fma model.attention.block_size=32 model.attention.rank=2'"


class UsageError(Exception):
    """A mistake on a script's command line: printed as one message, exit code 2."""


def override_key(override: str) -> str:
    """The config key an override sets: 'model.dim=32' -> 'model.dim', '~callbacks.x' -> 'callbacks.x'."""
    return override.split("=", 1)[0].lstrip("~+")


def available_kinds() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml"))


@dataclasses.dataclass(frozen=True)
class Series:
    """One attention setting: a label and the train.py overrides that select it."""

    label: str
    overrides: tuple[str, ...]

    @property
    def kind(self) -> str:
        return next(o.split("=", 1)[1] for o in self.overrides if override_key(o) == "model")

    def compose(self, *overrides: str):
        """train.py's configuration (configs/train.yaml) with this series' overrides, then `overrides`."""
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            return compose("train", overrides=[*self.overrides, *overrides])


def default_label(overrides: tuple[str, ...]) -> str:
    """('model=fma', 'model.attention.block_size=32') -> 'fma block_size=32'."""
    kind = [o.split("=", 1)[1] for o in overrides if override_key(o) == "model"]
    others = [o.removeprefix("model.attention.").removeprefix("model.") for o in overrides
              if override_key(o) != "model"]
    return " ".join(kind + others)


def parse_series(spec: str) -> Series:
    """'fma m=32: model=fma model.attention.block_size=32' -> Series('fma m=32', ('model=fma', ...))."""
    label, colon, text = spec.partition(":")
    if not colon:
        label, text = "", spec
    overrides = tuple(text.split())
    for override in overrides:
        if "=" not in override and not override.startswith("~"):
            raise UsageError(f"--series {spec!r}: {override!r} is not a Hydra override (key=value). Write a series "
                             f"as '[LABEL:] model=KIND [KEY=VALUE ...]', {EXAMPLE}.")
    kinds = [o.split("=", 1)[1] for o in overrides if override_key(o) == "model"]
    if len(kinds) != 1:
        raise UsageError(f"--series {spec!r}: name the attention kind once, as model=KIND, {EXAMPLE}.")
    if kinds[0] not in available_kinds():
        raise UsageError(f"Unknown attention kind {kinds[0]!r} in --series {spec!r}; known kinds: "
                         f"{', '.join(available_kinds())} (one file per kind in configs/model/).")
    return Series(label.strip() or default_label(overrides), overrides)


def parse_series_list(specs: list[str]) -> list[Series]:
    """Every --series, each with its own label and its own overrides."""
    series = [parse_series(spec) for spec in specs]
    for field in ("label", "overrides"):
        values = [getattr(one, field) for one in series]
        if len(set(values)) < len(values):
            raise UsageError(f"--series: two series have the same {field}; give each setting its own.")
    return series
