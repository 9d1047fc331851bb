"""Hook names: where in a model an SAE reads its activations.

A hook is written `layers.{L}.{site}` with one of four sites, the same for every architecture:

- `resid_pre`: the residual stream entering block L (the block's input),
- `resid_post`: the residual stream leaving block L (the block's output),
- `attn_out`: what block L's attention adds to the residual stream,
- `mlp_out`: what block L's MLP adds to the residual stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mistudio_core.errors import MistudioError

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_HOOK_PATTERN = re.compile(r"^layers\.(\d+)\.([a-z_]+)$")
_EVERY_LAYER = re.compile(r"^layers\.\*\.([a-z_]+)$")


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    site: str

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        match = _HOOK_PATTERN.match(name.strip())
        if not match or match.group(2) not in SITES:
            raise MistudioError(
                f"unknown hook {name!r}",
                hint="write it as layers.L.SITE with SITE one of " + ", ".join(SITES)
                + " (for example layers.6.resid_post)",
            )
        return cls(layer=int(match.group(1)), site=match.group(2))

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.site}"

    def __str__(self) -> str:
        return self.name


def parse_hooks(spec: str | list[str], n_layers: int | None = None) -> list[HookPoint]:
    """Parse one hook name or a comma-separated list of them, keeping their order, no repeats.

    `layers.*.SITE` stands for that site of every layer: it needs the model's `n_layers` (without
    it, only its syntax is checked and it stands for layer 0)."""
    names = spec.split(",") if isinstance(spec, str) else spec
    hooks: list[HookPoint] = []
    for name in names:
        every_layer = _EVERY_LAYER.match(name.strip())
        if every_layer:
            site = HookPoint.parse(f"layers.0.{every_layer.group(1)}").site
            expanded = [HookPoint(layer, site) for layer in range(n_layers or 1)]
        else:
            expanded = [HookPoint.parse(name)]
        hooks += [hook for hook in expanded if hook not in hooks]
    if not hooks:
        raise MistudioError("no hook given", hint="pass --hook layers.L.resid_post")
    return hooks
