"""Monitor: which features fire, token by token, as a model reads or generates text.

A `Monitor` holds one loaded model (with its LM head, for generation) and one or more SAEs,
possibly at different hooks. Each call runs the model once over the tokens, captures every
SAE's hook in that same pass (forward hooks through `HookedModel.replaced`, one per distinct
hook, removed when the call ends, also after an exception), encodes, and reports for every
token the `top` strongest features of each SAE with their explanations (the most recent one
per feature from the SAE's feature store, when `mistudio explain` has run).

- `read(text)`: the text's tokens, opened with BOS when the SAEs were trained that way (as
  `correlate.features_on_text` and `corpus.pack_windows` do). Special tokens (BOS, pad) are
  left out of the report, as in training. By default the whole text goes through in one forward
  pass, stopped after the deepest hook: texts are at most the SAEs' context size, so that pass is
  short and the first token's report comes within one forward pass plus one encode. With
  `chunk_tokens=N` the text goes through in chunks of N tokens with the KV cache, so the first
  tokens are reported (`on_token`) before the rest of the text is read; the activations equal the
  one-pass ones up to float rounding. `cancelled()` is asked before each chunk: a cancelled
  read returns the tokens reported so far.
- `generate(prompt)`: token-by-token sampling with the KV cache. The prompt goes through in one
  pass and its tokens are streamed (`on_token`, `generated=False`) at once, so the first report
  comes after one forward pass, as in `read`. A generated token's activations exist only once it
  is fed back, so each step feeds the token just sampled, reports its features and samples the
  next from that same pass's logits: one forward pass per generated token, and a long generation
  shows its features live. Only the last position's logits are computed (`logits_to_keep`, where
  the model takes it): nothing else is sampled from. Sampling uses a private `torch.Generator`
  seeded with `seed` (on the CPU), so the same seed gives the same text; `temperature=0` is
  greedy. Generation stops at `max_new_tokens`, at the end-of-text token (which is not reported;
  `stop_at_eos=False` keeps going through it) or when `cancelled()`, asked before each new
  token, says so; `stopped` says which.

Limits: a text (or a prompt plus its new tokens) may be at most the smallest context size of the
SAEs and the model's number of positions: past the context an SAE was trained on its features
are not what they were found to be. BOS is prepended when any SAE was trained with it.
`position` in a report is the token's index in the sequence the model saw (BOS included).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import FeatureStore, has_features
from mistudio_core.hooks import HookPoint
from mistudio_core.models import HookedModel, ModelSpec, load_config, load_model, n_layers_of
from mistudio_core.sae import LoadedSAE, load_sae

MAX_WATCHED = 256  # features watched per SAE: each is reported on every token
TokenCallback = Callable[["TokenFeatures"], None]
Cancelled = Callable[[], bool]  # asked between passes: True stops the call


class FeatureHit(NamedTuple):
    """One active feature on one token (a tuple: `(id, activation, explanation)`)."""

    id: int
    activation: float
    explanation: str | None

    def to_dict(self) -> dict:
        return {"id": self.id, "activation": self.activation, "explanation": self.explanation}


@dataclass
class TokenFeatures:
    """A token and the strongest features of each SAE on it."""

    position: int  # index in the sequence the model saw (BOS included)
    token: str
    token_id: int
    features: dict[str, list[FeatureHit]]  # SAE name -> strongest first (positive only)
    generated: bool = False
    # SAE name -> the watched features, in the order asked, whatever their activation (0 too)
    watched: dict[str, list[FeatureHit]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"position": self.position, "token": self.token, "token_id": self.token_id,
                "generated": self.generated,
                "features": {name: [hit.to_dict() for hit in hits]
                             for name, hits in self.features.items()},
                "watched": {name: [hit.to_dict() for hit in hits]
                            for name, hits in self.watched.items()}}


@dataclass
class Generation:
    """What `Monitor.generate` returns: the prompt's and the new tokens' reports."""

    prompt: str
    text: str  # the generated continuation only
    token_ids: list[int]  # the generated tokens
    tokens: list[TokenFeatures]  # one per generated token, in order
    prompt_tokens: list[TokenFeatures] = field(default_factory=list)  # special tokens left out
    stopped: str = "length"  # "length", "eos" or "cancelled"

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "stopped": self.stopped, "tokens": [t.to_dict() for t in self.tokens],
                "prompt_tokens": [t.to_dict() for t in self.prompt_tokens]}


class _Wanted(NamedTuple):
    """What to report on each token: each SAE's `top` strongest features, and the `watch`ed ones
    (SAE name -> feature ids) whether they are among the strongest or not."""

    top: int
    watch: dict[str, list[int]]


@dataclass
class _Attached:
    name: str
    loaded: LoadedSAE
    hook: HookPoint
    explanations: dict[int, str]


class Monitor:
    """A model and its SAEs, ready to report features on what the model reads or writes."""

    def __init__(self, model: HookedModel,
                 saes: Sequence[LoadedSAE] | Mapping[str, LoadedSAE]) -> None:
        named = _named(saes)
        if not named:
            raise MistudioError("no SAE given", hint="pass at least one SAE directory",
                                field="sae")
        self.model = model
        self.saes: list[_Attached] = []
        for name, loaded in named.items():
            hook = check_fits(loaded, model.hidden_size, len(model.blocks), model.spec.model_id)
            loaded.sae.to(model.device)
            self.saes.append(_Attached(name, loaded, hook, {}))
        self.hooks = sorted({attached.hook for attached in self.saes})
        self.prepend_bos = any(a.loaded.metadata.prepend_bos for a in self.saes)
        self.max_tokens = context_limit(model, named.values())
        self._special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
        self._last_logits = last_logits_only(model)
        self.reload_explanations()

    @classmethod
    def load(cls, model: ModelSpec, sae_dirs: Sequence[str | Path]) -> Monitor:
        """A monitor of the model and SAEs `load_with_saes` loads."""
        return cls(*load_with_saes(model, sae_dirs))

    @property
    def names(self) -> list[str]:
        return [attached.name for attached in self.saes]

    def reload_explanations(self) -> None:
        """Read each SAE's explanations again (after `mistudio explain` has run)."""
        for attached in self.saes:
            attached.explanations = _explanations(attached.loaded.path)

    # ----- reading -----------------------------------------------------------------------------

    def read(self, text: str, top: int = 5, on_token: TokenCallback | None = None,
             chunk_tokens: int | None = None, cancelled: Cancelled | None = None,
             watch: Mapping[str, Sequence[int]] | None = None) -> list[TokenFeatures]:
        """The strongest `top` features of each SAE (and the `watch`ed ones: SAE name -> feature
        ids) on every non-special token of `text` (those read before a cancel, with
        `chunk_tokens`)."""
        wanted = self._wanted(top, watch)
        if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
            raise MistudioError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}",
                                hint="use 32, or leave it out to read the text in one pass",
                                field="chunk_tokens")
        ids = self.token_ids(text, "text")
        reports: list[TokenFeatures] = []
        if chunk_tokens is None:
            captured = self.model.activations(torch.tensor([ids]), self.hooks)
            self._report(ids, 0, captured, wanted, False, reports, on_token)
            return reports
        cache = None
        for start in range(0, len(ids), chunk_tokens):
            if cancelled is not None and cancelled():
                break
            chunk = ids[start:start + chunk_tokens]
            with self._capturing() as captured:
                output = self._step(chunk, cache, start)
            cache = output.past_key_values
            self._report(chunk, start, captured, wanted, False, reports, on_token)
        return reports

    # ----- generating --------------------------------------------------------------------------

    def generate(self, prompt: str, max_new_tokens: int = 40, seed: int = 0,
                 temperature: float = 1.0, top: int = 5,
                 on_token: TokenCallback | None = None, stop_at_eos: bool = True,
                 cancelled: Cancelled | None = None,
                 watch: Mapping[str, Sequence[int]] | None = None) -> Generation:
        """Sample up to `max_new_tokens` tokens after `prompt`, reporting the prompt's tokens
        after its pass and each new token's features as soon as it is generated (`on_token`).
        With `stop_at_eos` (the default) the end-of-text token ends the generation unreported;
        without, it is kept like any other. `cancelled()` is asked before each new token."""
        wanted = self._wanted(top, watch)
        check_generation(self.model, max_new_tokens, temperature, seed)
        ids = self.token_ids(prompt, "prompt")
        check_room(len(ids), max_new_tokens, self.max_tokens)
        generator = torch.Generator().manual_seed(seed)
        eos = self.model.tokenizer.eos_token_id
        prompt_tokens: list[TokenFeatures] = []
        with self._capturing() as captured:
            output = self._step(ids, None, 0)
        self._report(ids, 0, captured, wanted, False, prompt_tokens, on_token)
        tokens: list[TokenFeatures] = []
        generated: list[int] = []
        stopped = "length"
        for _ in range(max_new_tokens):
            if cancelled is not None and cancelled():
                stopped = "cancelled"
                break
            token = sample(output.logits[0, -1], temperature, generator)
            if stop_at_eos and eos is not None and token == eos:
                stopped = "eos"
                break
            position = len(ids) + len(generated)
            generated.append(token)
            with self._capturing() as captured:
                output = self._step([token], output.past_key_values, position)
            self._report([token], position, captured, wanted, True, tokens, on_token,
                         keep_special=True)
        text = self.model.tokenizer.decode(generated)
        return Generation(prompt, text, generated, tokens, prompt_tokens, stopped)

    # ----- the parts ---------------------------------------------------------------------------

    def token_ids(self, text: str, field_name: str = "text") -> list[int]:
        """The text's token ids as the model will see them (BOS first when the SAEs want it)."""
        return text_ids(self.model, text, self.prepend_bos, self.max_tokens, field_name)

    def _step(self, ids: list[int], cache, cached: int):
        """One forward pass over `ids` after the `cached` tokens in `cache`, keeping the cache.
        The all-ones attention mask says there is no padding (transformers warns without one)."""
        device = self.model.device
        mask = torch.ones(1, cached + len(ids), dtype=torch.long, device=device)
        with torch.no_grad():
            return self.model.model(input_ids=torch.tensor([ids], device=device),
                                    attention_mask=mask, past_key_values=cache, use_cache=True,
                                    **self._last_logits)

    @contextmanager
    def _capturing(self) -> Iterator[dict[HookPoint, torch.Tensor]]:
        """Within the block, every SAE's hook activation is kept (the last pass's)."""
        captured: dict[HookPoint, torch.Tensor] = {}

        def keeper(hook: HookPoint):
            def keep(tensor: torch.Tensor) -> torch.Tensor:
                captured[hook] = tensor.detach()
                return tensor
            return keep

        with ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(self.model.replaced(hook, keeper(hook)))
            yield captured

    def _wanted(self, top: int, watch: Mapping[str, Sequence[int]] | None) -> _Wanted:
        """`top` and `watch` checked: every watched SAE is loaded and every id is a feature."""
        _check_top(top)
        checked: dict[str, list[int]] = {}
        widths = {attached.name: attached.loaded.sae.config.d_sae for attached in self.saes}
        for name, ids in (watch or {}).items():
            if name not in widths:
                raise MistudioError(f"no SAE {name!r} to watch features of",
                                    hint="one of " + ", ".join(widths), field="watch")
            if not isinstance(ids, list | tuple):
                raise MistudioError(f"the features watched on {name} must be a list of ids, "
                                    f"not {ids!r}", hint='for example {"' + name + '": [7]}',
                                    field="watch")
            if len(ids) > MAX_WATCHED:
                raise MistudioError(f"{len(ids)} features watched on {name}; at most "
                                    f"{MAX_WATCHED}", hint="watch fewer features",
                                    field="watch")
            bad = [i for i in ids if not is_whole(i) or not 0 <= i < widths[name]]
            if bad:
                raise MistudioError(
                    f"cannot watch {bad[0]!r}: the SAE {name} has {widths[name]} features",
                    hint=f"watch features from 0 to {widths[name] - 1}", field="watch")
            checked[name] = list(ids)
        return _Wanted(top, checked)

    def _report(self, ids: list[int], start: int, captured: dict[HookPoint, torch.Tensor],
                wanted: _Wanted, generated: bool, into: list[TokenFeatures],
                on_token: TokenCallback | None, keep_special: bool = False) -> None:
        """Encode the captured activations of `ids` (at positions `start`...) and report."""
        shown = [i for i, token in enumerate(ids) if keep_special or token not in self._special]
        if not shown:
            return
        strongest: dict[str, tuple[list, list]] = {}
        watched: dict[str, tuple[list, list]] = {}
        for attached in self.saes:
            acts = captured[attached.hook][0, -len(ids):][shown]
            codes = attached.loaded.sae.encode(acts.float()).float()
            best = codes.topk(min(wanted.top, codes.shape[-1]), dim=-1)
            strongest[attached.name] = (best.values.tolist(), best.indices.tolist())
            if attached.name in wanted.watch:
                features = wanted.watch[attached.name]
                watched[attached.name] = (codes[:, features].tolist(), [features] * len(shown))
        tokenizer = self.model.tokenizer
        for row, index in enumerate(shown):
            features = {a.name: _hits(a, *strongest[a.name], row, firing_only=True)
                        for a in self.saes}
            watching = {a.name: _hits(a, *watched[a.name], row, firing_only=False)
                        for a in self.saes if a.name in watched}
            report = TokenFeatures(start + index, tokenizer.decode([ids[index]]), ids[index],
                                   features, generated, watching)
            into.append(report)
            if on_token is not None:
                on_token(report)


def _hits(attached: _Attached, values: list[list[float]], ids: list[list[int]], row: int,
          firing_only: bool) -> list[FeatureHit]:
    """Row `row`'s features (`ids`, with their `values`) as hits, with their explanations."""
    return [FeatureHit(feature, value, attached.explanations.get(feature))
            for value, feature in zip(values[row], ids[row], strict=True)
            if value > 0 or not firing_only]


def load_with_saes(model: ModelSpec,
                   sae_dirs: Sequence[str | Path]) -> tuple[HookedModel, dict[str, LoadedSAE]]:
    """Load the SAEs, check them against the model's config, then load the model (with its LM
    head): what a monitor or a steering reads with. The SAEs are named after their directories
    (made unique)."""
    loaded: dict[str, LoadedSAE] = {}
    for directory in sae_dirs:
        loaded[_unique(Path(directory).name or str(directory), loaded)] = load_sae(directory)
    config = load_config(model)
    for sae in loaded.values():
        check_fits(sae, int(config.hidden_size), n_layers_of(config), model.model_id)
    return load_model(model, with_lm_head=True, config=config), loaded


def context_limit(model: HookedModel, saes: Iterable[LoadedSAE]) -> int:
    """The most tokens a text (a prompt and its new tokens) may have: the smallest context the
    SAEs were trained on (past it their features are not what they were found to be) and the
    model's number of positions."""
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    limits = [int(loaded.metadata.context_size) for loaded in saes
              if loaded.metadata.context_size]
    return min([*limits, *([int(positions)] if positions else [])] or [2**31])


def text_ids(model: HookedModel, text: str, prepend_bos: bool, limit: int,
             field_name: str) -> list[int]:
    """`text`'s token ids as the model sees them (BOS first with `prepend_bos`), refused when
    empty or longer than `limit`."""
    if not isinstance(text, str) or not text.strip():
        raise MistudioError(f"the {field_name} is empty", hint="give some text",
                            field=field_name)
    tokenizer = model.tokenizer
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if prepend_bos:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (
            tokenizer.eos_token_id)
        if bos is not None:
            ids = [bos, *ids]
    if len(ids) > limit:
        raise MistudioError(
            f"the {field_name} is {len(ids)} tokens long, but at most {limit} fit "
            "(the SAEs' context size and the model's positions)",
            hint=f"shorten the {field_name} to at most {limit} tokens (split it)",
            field=field_name)
    return ids


def check_generation(model: HookedModel, max_new_tokens, temperature, seed,
                     top_k=None) -> None:
    """Refuse generation settings that are not what `generate` and `steer` take."""
    if not is_whole(max_new_tokens) or max_new_tokens < 1:
        raise MistudioError(f"max_new_tokens must be a positive integer, got "
                            f"{max_new_tokens!r}", hint="use 40", field="max_new_tokens")
    if not is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise MistudioError(f"temperature must be a number >= 0, got {temperature!r}",
                            hint="use 1.0 to sample, 0 for greedy", field="temperature")
    if not is_whole(seed):
        raise MistudioError(f"seed must be an integer, got {seed!r}", hint="use 0",
                            field="seed")
    if top_k is not None and (not is_whole(top_k) or top_k < 1):
        raise MistudioError(f"top_k must be a positive integer, got {top_k!r}",
                            hint="leave it out to sample from the whole vocabulary",
                            field="top_k")
    if not model.has_lm_head:
        raise MistudioError("this model was loaded without its LM head: it cannot generate",
                            hint="load it with with_lm_head=True", field="model")


def check_room(n_prompt: int, max_new_tokens: int, limit: int) -> None:
    """Refuse a prompt of `n_prompt` tokens whose new tokens would run past `limit`."""
    if n_prompt + max_new_tokens > limit:
        raise MistudioError(
            f"the prompt ({n_prompt} tokens) and {max_new_tokens} new tokens exceed the "
            f"{limit}-token context",
            hint=f"ask for at most {max(limit - n_prompt, 1)} new tokens or shorten the prompt",
            field="max_new_tokens")


def is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_fits(loaded: LoadedSAE, width: int, n_layers: int, model_id: str) -> HookPoint:
    """The hook `loaded` reads, once its width and hook layer are known to fit a model of that
    hidden `width` and `n_layers` layers (from the config: call it before loading weights).

    Monitor, steer and the CLI check SAEs the same way, and every refusal names the field "sae"
    (the SAE is what the user picked to go with the model), with its directory: a session may
    hold several SAEs."""
    try:
        hook = loaded.hook()
        loaded.check_width(width, model_id)
    except MistudioError as exc:
        where = "" if str(loaded.path) in exc.message else f"{loaded.path}: "
        raise MistudioError(where + exc.message, hint=exc.hint, code="bad_sae",
                            field="sae") from exc
    if hook.layer >= n_layers:
        raise MistudioError(
            f"the SAE in {loaded.path} reads {hook}, but {model_id} has {n_layers} layers",
            hint=f"use the model the SAE was trained on ({loaded.metadata.model_name or '?'})",
            code="bad_sae", field="sae")
    return hook


def last_logits_only(model: HookedModel) -> dict:
    """The forward keyword that computes the LM head on the last position only, where the
    model's forward takes it (transformers >= 4.50 for most architectures): generation samples
    from nothing else, and with a large vocabulary the head over a whole prompt costs more than
    several layers."""
    forward = inspect.signature(model.model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in forward else {}


def _named(saes: Sequence[LoadedSAE] | Mapping[str, LoadedSAE]) -> dict[str, LoadedSAE]:
    if isinstance(saes, Mapping):
        return dict(saes)
    named: dict[str, LoadedSAE] = {}
    for loaded in saes:
        named[_unique(loaded.path.name or str(loaded.path), named)] = loaded
    return named


def _unique(name: str, taken: Mapping[str, object]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _explanations(sae_dir: Path) -> dict[int, str]:
    if not has_features(sae_dir):
        return {}
    with suppress(MistudioError):
        store = FeatureStore(sae_dir)
        try:
            return store.latest_explanations()
        finally:
            store.close()
    return {}


def _check_top(top: int) -> None:
    if not is_whole(top) or top < 1:
        raise MistudioError(f"top must be an integer of at least 1, got {top!r}",
                            hint="use --top 5", field="top")


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator,
           top_k: int | None = None) -> int:
    """The next token: greedy at temperature 0, else drawn from softmax(logits / T) (over the
    `top_k` likeliest tokens when given). On the CPU, so a seed gives the same text anywhere."""
    logits = logits.float().cpu()
    if temperature == 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.numel():
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
