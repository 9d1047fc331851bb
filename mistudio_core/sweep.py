"""Several SAEs from one extraction: every hook asked for, times every configuration of a sweep.

`mistudio train --hook layers.4.resid_post,layers.8.resid_post --sweep k=16,32,64` trains six
SAEs on one pass of the model over the corpus (the extraction, most of a run's time, is shared),
each with its own optimizer, checkpoints and output directory:

    OUT/                          one hook, no sweep (as ever)
    OUT/k-16, OUT/k-32, ...       one hook, a sweep
    OUT/layers.4.resid_post/      several hooks
    OUT/layers.4.resid_post/k-16  several hooks and a sweep

Several `--sweep` options make a grid (`--sweep k=16,32 --sweep expansion=8,16`: four SAEs per
hook). A swept `expansion` sets the width (a `--d-sae` given as well is then ignored).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mistudio_core.errors import MistudioError
from mistudio_core.hooks import HookPoint

if TYPE_CHECKING:  # the daemon checks sweeps (`parse_sweep`) without importing torch
    from mistudio_core.sae import SAEConfig

# What a sweep may vary, and how a value is read.
SWEEPABLE = {"k": int, "expansion": int, "d_sae": int, "architecture": str,
             "l1_coefficient": float, "l0_coefficient": float}
MAX_SAES = 256  # in one run: each holds its weights, Adam moments and a checkpoint


@dataclass(frozen=True)
class PlannedSAE:
    """One SAE of a run: where it reads, what it is, where it goes."""

    hook: HookPoint
    config: SAEConfig
    out: Path
    variant: dict  # the swept settings ({} without a sweep)

    @property
    def label(self) -> str:
        """`layers.4.resid_post k=16`, for logs."""
        return " ".join([self.hook.name, *(f"{name}={value}" for name, value in
                                           self.variant.items())])


def parse_sweep(specs: list[str] | None) -> dict[str, list]:
    """`["k=16,32,64", "expansion=8,16"]` -> `{"k": [16, 32, 64], "expansion": [8, 16]}`."""
    sweep: dict[str, list] = {}
    for spec in specs or ():
        name, _, values = spec.partition("=")
        name = name.strip()
        if name not in SWEEPABLE or not values.strip():
            raise MistudioError(f"cannot sweep {spec!r}",
                                hint="write NAME=V1,V2,... with NAME one of "
                                     + ", ".join(SWEEPABLE) + " (for example k=16,32,64)",
                                field="sweep")
        if name in sweep:
            raise MistudioError(f"{name} is swept twice", hint="give each name once",
                                field="sweep")
        try:
            parsed = [SWEEPABLE[name](value.strip()) for value in values.split(",")]
        except ValueError:
            raise MistudioError(f"the values of {spec!r} must be {SWEEPABLE[name].__name__}s",
                                hint="for example k=16,32,64", field="sweep") from None
        sweep[name] = list(dict.fromkeys(parsed))
    return sweep


def plan_saes(hooks: list[HookPoint], base: dict, sweep: dict[str, list], d_in: int,
              out: Path) -> list[PlannedSAE]:
    """The SAEs of a run. `base` holds SAEConfig's settings as `mistudio train` takes them
    (architecture, k, expansion, d_sae, l1_coefficient, l0_coefficient)."""
    from mistudio_core.sae import SAEConfig

    variants = [dict(zip(sweep, values, strict=True))
                for values in itertools.product(*sweep.values())]
    if len(hooks) * len(variants) > MAX_SAES:
        raise MistudioError(f"{len(hooks)} hooks x {len(variants)} configurations make "
                            f"{len(hooks) * len(variants)} SAEs; at most {MAX_SAES} in one run",
                            hint="split the run", field="sweep")
    planned = []
    for hook in hooks:
        for variant in variants:
            settings = {**base, **variant}
            if "expansion" in variant and "d_sae" not in variant:
                settings["d_sae"] = None
            config = SAEConfig(
                architecture=settings["architecture"], d_in=d_in,
                d_sae=settings["d_sae"] or settings["expansion"] * d_in, k=settings["k"],
                l1_coefficient=settings["l1_coefficient"],
                l0_coefficient=settings["l0_coefficient"])
            directory = out / hook.name if len(hooks) > 1 else out
            if variant:
                directory /= "_".join(f"{name}-{value}" for name, value in variant.items())
            planned.append(PlannedSAE(hook, config, directory, variant))
    return planned
