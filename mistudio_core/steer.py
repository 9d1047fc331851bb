"""Steer generation with SAE features, beside the unsteered generation of the same prompt.

Two edits of the activation `h` at an SAE's hook, through forward hooks on the real model
(quantized ones included, as the hooks sit on the decoder blocks, not on the weights):

- `add`:   `h <- h + s * a_max(i) * W_dec[i]`. `a_max(i)` is the feature's maximum activation
  recorded by `mistudio find` (the feature store's `max_act`), so a strength means the same for
  every feature: s = 1 adds exactly what the feature contributes to `h` at the strongest it was
  ever seen firing. With unit-norm decoder rows (SAELens's convention) this is the textbook
  `s * a_max(i) * W_dec[i] / ||W_dec[i]||`; miStudio folds the input scaling into the decoder
  when it saves an SAE, so its rows are not unit-norm, and dividing by the norm would make s = 1
  add a vector `1 / ||W_dec[i]||` times (6x on the demo SAE) longer than the feature ever writes.
  When find has not run (or never saw the feature fire), the default is
  `a_max = mean ||h|| / ||W_dec[i]||`, with the mean over the prompt's (non-special) tokens at
  that hook, unedited: strength 1 then adds a vector as long as a typical activation vector
  there. It is measured in the
  generation's own first pass, on the baseline row (never edited) just before the steered row is
  edited, so it costs no extra forward pass. The value used and where it came from (`find`,
  `prompt_norm` or `given`) are in the result (a prompt-norm a_max stays None when the run is
  cancelled before its first pass).
- `clamp`: encode, set `f_i := c` (c = the strength), decode, keep the SAE's error term:
  `h <- dec(f') + (h - dec(f))`. The decoder is linear, so this is computed exactly as
  `h + (c - f_i) * W_dec[i]`; several clamps on one SAE share one encoding of `h`.

`add` and `clamp` edits at one hook are all computed from the unedited `h` and summed, so their
order does not matter. With `from_prompt_end` an edit touches only the prompt's last position and
the generated ones; otherwise every position, the prompt's included.

Generation is token by token with the KV cache, the baseline and the steered continuation in
lockstep as one batch of two rows (row 0 never edited), each row sampled with its own
`torch.Generator` seeded with `seed` (the LM head runs on the last position only, where the model
takes `logits_to_keep`): the same seed and settings give the same baseline, and a
steering that changes nothing (add with strength 0) gives the baseline's tokens (the two rows of
one batch may differ in the last float bit, so the activations agree up to rounding). Sampling runs
on the CPU, so it does not depend on the device. `temperature=0` is greedy.

Reported activations: for each generated token and each steering, the steered feature's
activation at the position the token was predicted from (the prompt's last token for the first
generated token, then each generated token in turn), on that side's forward pass. On the steered
side that is `encode(h_edited)[i]` for `add`, and `c` for `clamp` (the value the clamped code
had; re-encoding `dec(f') + error` need not give exactly `c`, e.g. under TopK). On the baseline
side it is `encode(h)[i]`.

The hooks live only inside `steer` and are removed on every exit: return, exception (from the
model, an `on_token` callback or a cancel) and KeyboardInterrupt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import FeatureStore
from mistudio_core.hooks import HookPoint
from mistudio_core.models import HookedModel
from mistudio_core.monitor import (
    check_fits,
    check_generation,
    check_room,
    context_limit,
    is_number,
    is_whole,
    last_logits_only,
    sample,
    text_ids,
)
from mistudio_core.sae import LoadedSAE

MODES = ("add", "clamp")
A_MAX_SOURCES = ("given", "find", "prompt_norm")
BASELINE, STEERED = "baseline", "steered"

# on_token(side, token_text, activations): side is "baseline" or "steered", activations one
# float per steering, in the order the steerings were given.
TokenCallback = Callable[[str, str, list[float]], None]
# a_max lookup: the feature's max activation for (sae, feature), or None when unknown.
AMaxLookup = Callable[[LoadedSAE, int], "float | None"]


@dataclass
class Steering:
    """One feature to steer. `sae` names the SAE (a key of the dict given to `steer`, or its
    index); it may be left out when only one SAE is given. `a_max` overrides the lookup."""

    feature: int
    strength: float
    mode: str = "add"
    sae: str | int | None = None
    from_prompt_end: bool = False
    a_max: float | None = None


@dataclass
class ResolvedSteering:
    """A checked steering, with the SAE it uses and the a_max it was scaled by (add)."""

    label: str  # "feature" with one SAE, "sae/feature" with several
    sae: str
    hook: str
    feature: int
    strength: float
    mode: str
    from_prompt_end: bool
    a_max: float | None  # add only
    a_max_source: str | None  # "given", "find" or "prompt_norm" (add only)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """One side's continuation: its text, tokens and per-token activations of the steered
    features (one list per generated token, one value per steering)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    activations: list[list[float]] = field(default_factory=list)
    stopped_at_eos: bool = False
    # With keep_logits: the next-token logits [vocab] (float32, CPU) each token was sampled from.
    logits: list[torch.Tensor] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "tokens": self.tokens,
                "activations": self.activations, "stopped_at_eos": self.stopped_at_eos}


@dataclass
class SteerResult:
    prompt: str
    prompt_tokens: int
    steerings: list[ResolvedSteering]
    baseline: Generation
    steered: Generation
    seed: int
    temperature: float
    top_k: int | None
    cancelled: bool = False

    @property
    def features(self) -> list[str]:
        return [s.label for s in self.steerings]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "prompt_tokens": self.prompt_tokens,
                "steerings": [s.to_dict() for s in self.steerings],
                "features": self.features, "baseline": self.baseline.to_dict(),
                "steered": self.steered.to_dict(), "seed": self.seed,
                "temperature": self.temperature, "top_k": self.top_k,
                "cancelled": self.cancelled}


def stored_a_max(loaded: LoadedSAE, feature: int) -> float | None:
    """The feature's max activation from find's feature store, or None when unknown."""
    try:
        store = FeatureStore(loaded.path)
    except MistudioError:
        return None  # find never ran on this SAE
    try:
        if store.d_sae != loaded.sae.config.d_sae:
            return None  # a stale store of another SAE
        value = store.statistics(feature).get("max_act")
    finally:
        store.close()
    if value is None or not math.isfinite(float(value)) or float(value) <= 0:
        return None
    return float(value)


def steer(
    model: HookedModel,
    saes: Mapping[str, LoadedSAE] | Sequence[LoadedSAE] | LoadedSAE,
    prompt: str,
    steerings: Sequence[Steering],
    *,
    max_new_tokens: int = 40,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    keep_logits: bool = False,
    a_max_lookup: AMaxLookup = stored_a_max,
    on_token: TokenCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> SteerResult:
    """Generate the baseline and the steered continuation of `prompt` side by side.

    `model` must be loaded with its LM head (`load_model(spec, with_lm_head=True)`). A list of
    SAEs is named by index ("0", "1", ...). `on_token` is called for each new token, baseline
    first, then steered, as it is generated; `cancelled()` is asked before each step, and a
    cancelled run returns what it has with `cancelled=True`. Raises MistudioError (with `field`
    set) for bad input, before the model runs.
    """
    named = _named_saes(saes)
    check_generation(model, max_new_tokens, temperature, seed, top_k)
    resolved = [_resolve(model, named, steering) for steering in steerings]
    prompt_ids = _prompt_ids(model, named, resolved, prompt, max_new_tokens)
    run = _Run(_add_vectors(model, named, resolved, a_max_lookup), len(prompt_ids),
               _norm_rows(model, prompt_ids), [[0.0] * len(resolved), [0.0] * len(resolved)])
    hooks = sorted({HookPoint.parse(s.hook) for s in resolved})
    result = SteerResult(prompt, len(prompt_ids), resolved, Generation(), Generation(), seed,
                         temperature, top_k)
    sides = (result.baseline, result.steered)
    generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
    eos = model.tokenizer.eos_token_id
    finished = [False, False]
    last_logits = last_logits_only(model)

    with ExitStack() as stack, torch.inference_mode():
        for hook in hooks:
            stack.enter_context(model.replaced(hook, _hook_edit(hook, named, resolved, run)))
        chunk = torch.tensor([prompt_ids, prompt_ids], device=model.device)
        past = None
        for _step in range(max_new_tokens):
            if cancelled is not None and cancelled():
                result.cancelled = True
                break
            output = model.model(input_ids=chunk, past_key_values=past, use_cache=True,
                                 attention_mask=torch.ones(2, run.offset + chunk.shape[1],
                                                           dtype=torch.long, device=model.device),
                                 **last_logits)
            past = output.past_key_values
            run.offset += chunk.shape[1]
            logits = output.logits[:, -1].float().cpu()
            next_ids = []
            for row, side in enumerate(sides):
                token = sample(logits[row], temperature, generators[row], top_k)
                next_ids.append(token)
                if finished[row]:
                    continue
                if stop_at_eos and eos is not None and token == eos:
                    finished[row] = True
                    side.stopped_at_eos = True
                    continue
                text = model.tokenizer.decode([token])
                side.token_ids.append(token)
                side.tokens.append(text)
                side.activations.append(list(run.measured[row]))
                if keep_logits:
                    side.logits.append(logits[row].clone())
                if on_token is not None:
                    on_token(BASELINE if row == 0 else STEERED, text, list(run.measured[row]))
            if all(finished):
                break
            chunk = torch.tensor([[next_ids[0]], [next_ids[1]]], device=model.device)
    for side in sides:
        side.text = model.tokenizer.decode(side.token_ids)
    return result


# ----- checks ----------------------------------------------------------------------------------


def _named_saes(saes) -> dict[str, LoadedSAE]:
    if isinstance(saes, LoadedSAE):
        return {"0": saes}
    if isinstance(saes, Mapping):
        named = {str(name): loaded for name, loaded in saes.items()}
    else:
        named = {str(index): loaded for index, loaded in enumerate(saes)}
    if not named:
        raise MistudioError("no SAE given", hint="pass the SAE directory to steer with",
                            field="sae")
    return named


def _resolve(model: HookedModel, named: dict[str, LoadedSAE],
             steering: Steering) -> ResolvedSteering:
    name = _sae_name(named, steering.sae)
    loaded = named[name]
    config = loaded.sae.config
    hook = check_fits(loaded, model.hidden_size, len(model.blocks), model.spec.model_id)
    if not is_whole(steering.feature) or not 0 <= steering.feature < config.d_sae:
        raise MistudioError(
            f"feature {steering.feature!r} does not exist: the SAE {name} has {config.d_sae} "
            "features", hint=f"pick a feature from 0 to {config.d_sae - 1}",
            code="not_found", field="feature")
    if not is_number(steering.strength) or not math.isfinite(steering.strength):
        raise MistudioError(f"strength must be a finite number, got {steering.strength!r}",
                            hint="use e.g. --strength 4 (add) or --strength 0 (clamp)",
                            field="strength")
    if steering.mode not in MODES:
        raise MistudioError(f"unknown steering mode {steering.mode!r}",
                            hint="use add or clamp", field="mode")
    if steering.a_max is not None and (not is_number(steering.a_max)
                                       or not math.isfinite(steering.a_max)
                                       or steering.a_max <= 0):
        raise MistudioError(f"a_max must be a positive number, got {steering.a_max!r}",
                            hint="leave it out to use find's max activation", field="a_max")
    label = str(steering.feature) if len(named) == 1 else f"{name}/{steering.feature}"
    given = None if steering.a_max is None else float(steering.a_max)
    return ResolvedSteering(label, name, hook.name, int(steering.feature),
                            float(steering.strength), steering.mode,
                            bool(steering.from_prompt_end), given,
                            None if given is None else "given")


def _sae_name(named: dict[str, LoadedSAE], which: str | int | None) -> str:
    if which is None:
        if len(named) == 1:
            return next(iter(named))
        raise MistudioError(f"{len(named)} SAEs are loaded: say which one to steer with",
                            hint="one of " + ", ".join(named), field="sae")
    if is_whole(which) and not isinstance(which, str):
        names = list(named)
        if 0 <= which < len(names):
            return names[which]
    elif str(which) in named:
        return str(which)
    raise MistudioError(f"no SAE {which!r} is loaded", hint="one of " + ", ".join(named),
                        field="sae")


def _prompt_ids(model: HookedModel, named: dict[str, LoadedSAE],
                resolved: list[ResolvedSteering], prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt's tokens, opened with BOS when a steered SAE was trained that way; the prompt
    and its new tokens must fit the steered SAEs' context and the model's positions."""
    used = [named[name] for name in dict.fromkeys(s.sae for s in resolved)] or list(
        named.values())
    limit = context_limit(model, used)
    ids = text_ids(model, prompt, any(loaded.metadata.prepend_bos for loaded in used), limit,
                   "prompt")
    check_room(len(ids), max_new_tokens, limit)
    return ids


# ----- the edit --------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the edit hooks share with the generation loop."""

    vectors: dict[int, torch.Tensor]  # per add steering (`_add_vectors`)
    n_prompt: int
    norm_rows: list[int]  # the prompt's positions whose mean ||h|| is the default a_max
    measured: list[list[float]]  # [row][steering]: the steered features at the last position
    offset: int = 0  # absolute position of the chunk now running through the model


def _add_vectors(model: HookedModel, named: dict[str, LoadedSAE],
                 resolved: list[ResolvedSteering], lookup: AMaxLookup) -> dict[int, torch.Tensor]:
    """Each add steering's vector `s * a_max * W_dec[i]` (float32, model device), filling in the
    steerings' a_max and its source. Where neither a given a_max nor find's is known, the vector
    is left at `s * W_dec[i] / ||W_dec[i]||` with source "prompt_norm", for the first pass to
    scale (`_scale_by_prompt_norm`)."""
    for loaded in {id(named[s.sae]): named[s.sae] for s in resolved}.values():
        loaded.sae.to(model.device)
    vectors: dict[int, torch.Tensor] = {}
    for index, steering in enumerate(resolved):
        if steering.mode != "add":
            continue
        loaded = named[steering.sae]
        if steering.a_max is None:
            found = lookup(loaded, steering.feature)
            if found is not None and math.isfinite(found) and found > 0:
                steering.a_max, steering.a_max_source = float(found), "find"
            else:
                steering.a_max_source = "prompt_norm"
        row = loaded.sae.W_dec.detach()[steering.feature].float()
        if steering.a_max is None:  # scaled to the prompt's norm in the first pass
            norm = row.norm()
            row = row / norm if norm > 0 else row
        else:
            row = row * steering.a_max
        vectors[index] = (steering.strength * row).to(model.device)
    return vectors


def _norm_rows(model: HookedModel, prompt_ids: list[int]) -> list[int]:
    """The prompt's positions the default a_max averages ||h|| over: its non-special tokens
    (all of them for a prompt of special tokens only)."""
    special = set(model.tokenizer.all_special_ids)
    return [i for i, token in enumerate(prompt_ids) if token not in special] or list(
        range(len(prompt_ids)))


def _scale_by_prompt_norm(h: torch.Tensor, here: list[int], named: dict[str, LoadedSAE],
                          resolved: list[ResolvedSteering], run: _Run) -> None:
    """In the first pass, before any edit at this hook: scale the add vectors still waiting
    for their a_max (unit directions) by the prompt's mean ||h|| over its non-special tokens,
    taken on row 0 (the baseline, never edited, so upstream hooks have not touched it either).
    The a_max reported is that length in the feature's units, mean ||h|| / ||W_dec[i]||."""
    waiting = [i for i in here if resolved[i].mode == "add" and resolved[i].a_max is None]
    if not waiting:
        return
    mean_norm = float(h[0, run.norm_rows].float().norm(dim=-1).mean())
    for i in waiting:
        decoder_norm = float(named[resolved[i].sae].sae.W_dec[resolved[i].feature].norm())
        resolved[i].a_max = mean_norm / decoder_norm if decoder_norm > 0 else mean_norm
        run.vectors[i] = run.vectors[i] * mean_norm


def _hook_edit(hook: HookPoint, named: dict[str, LoadedSAE], resolved: list[ResolvedSteering],
               run: _Run) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that edits row 1 (steered) of the activation at `hook` and records both
    rows' activations of the steered features at the chunk's last position."""
    here = [i for i, s in enumerate(resolved) if s.hook == hook.name]
    sae_names = list(dict.fromkeys(resolved[i].sae for i in here))
    vectors, measured = run.vectors, run.measured

    def edit(h: torch.Tensor) -> torch.Tensor:
        _scale_by_prompt_norm(h, here, named, resolved, run)
        length = h.shape[1]
        positions = torch.arange(run.offset, run.offset + length, device=h.device)
        everywhere = torch.ones(length, 1, device=h.device)
        from_end = (positions >= run.n_prompt - 1).float()[:, None]
        steered = h[1].float()
        delta = torch.zeros_like(steered)
        for name in sae_names:
            sae = named[name].sae
            codes = None
            for i in here:
                steering = resolved[i]
                if steering.sae != name:
                    continue
                where = from_end if steering.from_prompt_end else everywhere
                if steering.mode == "add":
                    delta += where * vectors[i]
                    continue
                if codes is None:
                    codes = sae.encode(steered)
                change = steering.strength - codes[:, steering.feature].float()
                delta += where * change[:, None] * sae.W_dec[steering.feature].float()
        edited = steered + delta
        for name in sae_names:
            sae = named[name].sae
            base_codes = sae.encode(h[0, -1:].float())[0]
            steer_codes = sae.encode(edited[-1:])[0]
            for i in here:
                steering = resolved[i]
                if steering.sae != name:
                    continue
                measured[0][i] = float(base_codes[steering.feature])
                # The measured position is always edited (from_prompt_end starts at the
                # prompt's last token), so a clamped feature's code there is c.
                measured[1][i] = steering.strength if steering.mode == "clamp" else float(
                    steer_codes[steering.feature])
        return torch.stack([h[0], edited.to(h.dtype)])

    return edit
