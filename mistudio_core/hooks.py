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


def parse_hooks(spec: str | list[str]) -> list[HookPoint]:
    """Parse one hook name or a comma-separated list of them, keeping their order, no repeats."""
    names = spec.split(",") if isinstance(spec, str) else spec
    hooks: list[HookPoint] = []
    for name in names:
        hook = HookPoint.parse(name)
        if hook not in hooks:
            hooks.append(hook)
    if not hooks:
        raise MistudioError("no hook given", hint="pass --hook layers.L.resid_post")
    return hooks
