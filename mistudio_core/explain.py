"""A short explanation of each feature, from its top examples (the Explain service).

Two explainers, both reading only a feature's `top` examples (the `quantile` and `negative` sets
stay unseen: the scorers test explanations on them):
- `stats` (offline, deterministic, seconds for thousands of features): which token texts carry
  the activation mass, which token precedes them when one does, and which tokens the feature
  promotes. Its explanation is one line such as
  `fires on " return" (62%), " yield" (21%) after "\\n"; promotes " None", " self"`, and its
  `details["rule"]` is a `TokenRule` that the rule scorer can simulate.
- `hf:MODEL` / `openai:URL[#MODEL]` (an LLM): a delphi-style prompt with the top examples, the
  activating tokens marked `<<like this>>`, their activations and the promoted tokens; the
  answer's last `[EXPLANATION]:` line is the explanation.

An explainer's name (`stats` or the LLM spec as given) is the key its explanations are stored
under, so `explain` resumes: features already explained by the same explainer are skipped unless
`overwrite`. Results are saved every batch, so an interruption loses at most one batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import Example, FeatureStore
from mistudio_core.llm import ChatBackend, Message, UnparseableAnswer, ask, chat_backend
from mistudio_core.progress import silent

STATS = "stats"
EXPLAINER_FORMS = "stats, hf:MODEL or openai:URL[#MODEL]"
# A token matched only after stripping surrounding whitespace predicts this share of its weight.
STRIPPED_MATCH_WEIGHT = 0.5
_MAX_NAMED_TOKENS = 3  # tokens a stats explanation names
_MIN_TOKEN_SHARE = 0.10  # of the activation mass, for a token to be named
_NAMED_MASS = 0.8  # naming stops once the named tokens cover this share of the mass
_MIN_CONTEXT_SHARE = 0.6  # of the named tokens' mass that the previous tokens must precede
_MAX_PROMOTED = 3
_MAX_QUOTED_CHARS = 20
_EXPLANATION_TAG = "[EXPLANATION]:"
_MAX_EXPLANATION_CHARS = 300
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)+)"|“([^”]+)”')


# ----- the rule an explanation states -----------------------------------------------------

@dataclass
class TokenRule:
    """What a token-level explanation predicts: the activation (0..1 of the feature's max) on
    each named token text, optionally only where the previous token is one of `previous`.

    Token texts match exactly (`" cat"` is GPT-2's token for "cat" after a space); a token that
    matches only once surrounding whitespace is stripped on both sides (`"cat"` in an LLM's
    explanation against the token `" cat"`) predicts `STRIPPED_MATCH_WEIGHT` of the weight, since
    the explanation did not say which of the tokenizer's variants it meant."""

    tokens: dict[str, float]
    previous: dict[str, float] = field(default_factory=dict)

    def simulate(self, tokens: list[str]) -> list[float]:
        """The predicted activation at each position of a tokenized text."""
        exact, stripped = self.tokens, _stripped_weights(self.tokens)
        context, stripped_context = set(self.previous), {t.strip() for t in self.previous}
        stripped_context.discard("")
        predictions = []
        for position, token in enumerate(tokens):
            weight = _weight(token, exact, stripped)
            if weight and self.previous:
                before = tokens[position - 1] if position > 0 else ""
                if before not in context and (not before or before.strip()
                                              not in stripped_context):
                    weight = 0.0
            predictions.append(weight)
        return predictions

    def to_details(self) -> dict:
        return {"tokens": dict(self.tokens), "previous": dict(self.previous)}

    @classmethod
    def from_details(cls, details: dict) -> TokenRule | None:
        """The rule stored in an explanation's details (`details["rule"]`), if it has one."""
        rule = details.get("rule") if isinstance(details, dict) else None
        if not isinstance(rule, dict) or not rule.get("tokens"):
            return None
        return cls({str(t): float(w) for t, w in rule["tokens"].items()},
                   {str(t): float(w) for t, w in (rule.get("previous") or {}).items()})

    @classmethod
    def from_text(cls, text: str) -> TokenRule | None:
        """The tokens an explanation quotes (`"..."` with JSON escapes, or “...”), weight 1
        each; None when it quotes nothing. Every quoted string counts, so a stats line's
        context and promoted tokens would too: use `from_details` for those."""
        tokens = {}
        for plain, curly in _QUOTED.findall(text):
            token = _unescape(plain) if plain else curly
            if token:
                tokens[token] = 1.0
        return cls(tokens) if tokens else None


def _stripped_weights(tokens: dict[str, float]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for token, weight in tokens.items():
        key = token.strip()
        if key:
            weights[key] = max(weights.get(key, 0.0), weight * STRIPPED_MATCH_WEIGHT)
    return weights


def _weight(token: str, exact: dict[str, float], stripped: dict[str, float]) -> float:
    if not token:
        return 0.0  # padding outside the text
    if token in exact:
        return exact[token]
    return stripped.get(token.strip(), 0.0)


def _unescape(text: str) -> str:
    try:
        return json.loads(f'"{text}"')
    except ValueError:
        return text


def quote_token(text: str) -> str:
    """A token text in double quotes with its whitespace visible (`" return"`, `"\\n"`)."""
    if len(text) > _MAX_QUOTED_CHARS:
        text = text[: _MAX_QUOTED_CHARS - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


# ----- explainers -------------------------------------------------------------------------

@dataclass
class Explanation:
    """One feature's explanation, or (text None) why there is none; `details` is stored."""

    feature: int
    text: str | None
    details: dict


class Explainer(Protocol):
    name: str
    batch_size: int  # features explained (and saved) together

    def explain(self, store: FeatureStore, features: list[int]) -> list[Explanation]: ...


# ----- the statistical explainer ----------------------------------------------------------

class StatsExplainer:
    """Token statistics of the top examples: which tokens carry the activation, after which
    token, and which tokens the feature promotes. Each batch's arrays are read once, and token
    texts are grouped through an id -> representative id table, so the work per feature is a
    few array operations (thousands of features take seconds)."""

    name = STATS
    batch_size = 256

    def __init__(self) -> None:
        self._representatives: tuple[list[str], np.ndarray] | None = None

    def explain(self, store: FeatureStore, features: list[int]) -> list[Explanation]:
        vocab = store.vocabulary
        if self._representatives is None or self._representatives[0] is not vocab:
            self._representatives = (vocab, _representative_ids(vocab))
        lookup = self._representatives[1]
        token_ids, acts, values = store.example_arrays("top", features)
        token_ids = token_ids.astype(np.int64)
        token_ids = lookup[np.where((token_ids >= 0) & (token_ids < len(vocab)), token_ids, -1)]
        promoted = _promoted_tokens(store, features)
        return [_explain_tokens(feature, token_ids[row], acts[row], values[row], promoted[row],
                                vocab)
                for row, feature in enumerate(features)]


def _representative_ids(vocab: list[str]) -> np.ndarray:
    """Each token id's representative, the first id with the same text (several ids can show
    the same text, e.g. byte tokens), and -1 for empty texts; one more -1 at the end for
    padding and ids outside the vocabulary (index -1)."""
    first: dict[str, int] = {}
    representatives = [first.setdefault(text, i) if text else -1 for i, text in enumerate(vocab)]
    return np.array([*representatives, -1], dtype=np.int64)


def _explain_tokens(feature: int, ids: np.ndarray, acts: np.ndarray, values: np.ndarray,
                    promoted: list[str], vocab: list[str]) -> Explanation:
    """The stats explanation of one feature from its top examples' representative token ids
    (`[n, width]`, -1 for padding) and activations."""
    filled = ~np.isnan(values)
    ids, acts = ids[filled], acts[filled]
    acts = np.where(ids >= 0, np.maximum(np.nan_to_num(acts), 0.0), 0.0)
    total = float(acts.sum())
    if total <= 0:
        return Explanation(feature, None, {"error": "no activation in the top examples"})
    shares = _shares(ids, acts, acts > 0, total)
    named = _covering(shares, _MAX_NAMED_TOKENS, _MIN_TOKEN_SHARE, _NAMED_MASS)
    broad = not named
    if broad:
        named = [token for token, _ in shares[:_MAX_NAMED_TOKENS]]
    previous = {} if broad else _context(ids, acts, np.isin(ids, named))
    in_context = np.isin(_previous_ids(ids), list(previous)) if previous else True
    feature_max = float(acts.max())
    rule_tokens = {}
    for token in named:  # the mean activation where the rule predicts, of the feature's max
        predicted = acts[(ids == token) & in_context]
        rule_tokens[vocab[token]] = round(float(predicted.mean()) / feature_max, 3) if (
            predicted.size) else 0.0
    rule = TokenRule(rule_tokens, {vocab[token]: share for token, share in previous.items()})
    share_of = dict(shares)
    line = _stats_line([(vocab[token], share_of[token]) for token in named],
                       [vocab[token] for token in previous], promoted, broad)
    mass = {"tokens": {vocab[token]: round(share, 3) for token, share in shares[:10]},
            "previous": rule.previous}
    return Explanation(feature, line, {"rule": rule.to_details(), "mass": mass,
                                       "n_examples": int(filled.sum())})


def _shares(ids: np.ndarray, weights: np.ndarray, where: np.ndarray,
            total: float) -> list[tuple[int, float]]:
    """Each token's share of `total` weight at `where`, largest first (ties by id)."""
    chosen = where & (ids >= 0)
    if not chosen.any():
        return []
    unique, inverse = np.unique(ids[chosen], return_inverse=True)
    per_token = np.bincount(inverse, weights=weights[chosen]) / total
    order = np.lexsort((unique, -per_token))
    return [(int(unique[i]), float(per_token[i])) for i in order]


def _covering(shares: list[tuple[int, float]], most: int, least_share: float,
              enough: float) -> list[int]:
    """The leading tokens, each with at least `least_share`, until they cover `enough`."""
    chosen, covered = [], 0.0
    for token, share in shares:
        if len(chosen) == most or covered >= enough or share < least_share:
            break
        chosen.append(token)
        covered += share
    return chosen


def _previous_ids(ids: np.ndarray) -> np.ndarray:
    before = np.full_like(ids, -1)
    before[:, 1:] = ids[:, :-1]
    return before


def _context(ids: np.ndarray, acts: np.ndarray, on_named: np.ndarray) -> dict[int, float]:
    """The tokens that precede the named tokens' activation, when a few precede most of it
    (>= 60%) and the named tokens fire at most half as much after other tokens: a bigram
    feature, not a token one. Returns `{previous token: share of the named tokens' mass}`."""
    before = _previous_ids(ids)
    known = on_named & (before >= 0)
    mass = float(acts[known].sum())
    if mass <= 0:
        return {}
    shares = _shares(before, acts, known & (acts > 0), mass)
    context = _covering(shares, _MAX_NAMED_TOKENS, _MIN_TOKEN_SHARE, 1.0)
    share_of = dict(shares)
    if sum(share_of[token] for token in context) < _MIN_CONTEXT_SHARE:
        return {}
    inside = known & np.isin(before, context)
    outside = known & ~inside
    if not outside.any() or acts[outside].mean() > 0.5 * acts[inside].mean():
        return {}  # no sign that the context matters: the simpler token rule stands
    return {token: round(share_of[token], 3) for token in context}


# Byte-level tokens that are part of a character decode to U+FFFD alone: unreadable in a line.
_UNREADABLE = "\ufffd"


def _promoted_tokens(store: FeatureStore, features: list[int]) -> list[list[str]]:
    ids, values = store.array("promoted_ids"), store.array("promoted_values")
    if ids is None:
        return [[] for _ in features]
    rows_ids = np.asarray(ids[features])[:, :_MAX_PROMOTED * 2]
    rows_values = (np.asarray(values[features])[:, :_MAX_PROMOTED * 2] if values is not None
                   else np.ones(rows_ids.shape))
    out = []
    for row_ids, row_values in zip(rows_ids, rows_values, strict=True):
        texts = [text for text, value in zip(store.token_texts(row_ids.tolist()),
                                             row_values.tolist(), strict=True)
                 if text and value > 0 and _UNREADABLE not in text]
        out.append(texts[:_MAX_PROMOTED])
    return out


def _stats_line(named: list[tuple[str, float]], previous: list[str], promoted: list[str],
                broad: bool) -> str:
    tokens = ", ".join(f"{quote_token(token)} ({share:.0%})" for token, share in named)
    line = ("fires broadly, most on " if broad else "fires on ") + tokens
    if previous:
        line += " after " + " or ".join(quote_token(token) for token in previous)
    if promoted:
        line += "; promotes " + ", ".join(quote_token(token) for token in promoted)
    return line


# ----- the LLM explainer --------------------------------------------------------------------

EXPLAINER_SYSTEM_PROMPT = """\
You are a meticulous AI researcher studying the features of a sparse autoencoder trained on a \
language model's activations. Each feature fires on some tokens of some texts; your task is to \
say, in one short sentence, what it responds to.

You are given the texts where the feature fires most strongly. In each text the tokens where it \
fires are marked between delimiters <<like this>>; consecutive firing tokens share one pair of \
delimiters. After each text, the firing tokens are listed with their activation, from 0 to 10. \
You may also be told which tokens the feature makes more likely to come next.

- Look for what the marked tokens have in common and for the context before them.
- Be concise: describe the pattern, do not list the examples or several alternatives.
- When the feature fires on particular words or symbols, quote them in double quotes, e.g. \
"cat" or "(".
- Do not mention the << >> delimiters.
- Think briefly if you need to, then end your answer with one last line of the form
[EXPLANATION]: <your explanation>"""


def example_line(example: Example, marked: bool = True, threshold: float = 0.0) -> str:
    """An example's text on one line (newlines shown as \\n), its firing runs marked."""
    text = example.marked_text(threshold) if marked else example.text
    return text.replace("\r", "\\r").replace("\n", "\\n")


def activation_list(example: Example, scale: float, most: int = 8) -> str:
    """The firing tokens (the strongest `most`, in text order) with activations 0..10."""
    firing = [(position, token, act) for position, (token, act)
              in enumerate(zip(example.tokens, example.acts, strict=True)) if act > 0 and token]
    strongest = sorted(sorted(firing, key=lambda item: -item[2])[:most])
    return ", ".join(f"{quote_token(token)} ({round(10 * act / scale)})"
                     for _, token, act in strongest)


def explanation_messages(examples: list[Example], promoted: list[str]) -> list[Message]:
    """The conversation that asks an LLM to explain a feature from its top examples."""
    scale = max((e.value for e in examples), default=1.0) or 1.0
    lines = []
    for number, example in enumerate(examples, start=1):
        lines.append(f"Example {number}: {example_line(example)}")
        lines.append(f"Activations: {activation_list(example, scale)}")
    if promoted:
        lines.append("")
        lines.append("Tokens the feature makes more likely next: "
                     + ", ".join(quote_token(t) for t in promoted))
    lines.append("")
    lines.append(f"End with the line {_EXPLANATION_TAG} <your explanation>")
    return [{"role": "system", "content": EXPLAINER_SYSTEM_PROMPT},
            {"role": "user", "content": "\n".join(lines)}]


def parse_explanation(answer: str) -> str:
    """The text after the answer's last `[EXPLANATION]:` (ValueError when absent, empty or
    too long, for `ask` to retry), without wrapping quotes or markdown emphasis."""
    at = answer.upper().rfind(_EXPLANATION_TAG)
    if at < 0:
        raise ValueError(f"there is no line starting with {_EXPLANATION_TAG}")
    text = answer[at + len(_EXPLANATION_TAG):].strip().splitlines()
    text = text[0].strip() if text else ""
    text = text.strip("*`_ ").strip()
    for left, right in (('"', '"'), ("'", "'"), ("“", "”")):
        inner = text[1:-1]
        if len(text) >= 2 and text[0] == left and text[-1] == right and left not in inner:
            text = inner.strip()
    if not text:
        raise ValueError(f"the explanation after {_EXPLANATION_TAG} is empty")
    if len(text) > _MAX_EXPLANATION_CHARS:
        raise ValueError(f"the explanation is {len(text)} characters long; keep it under "
                         f"{_MAX_EXPLANATION_CHARS}")
    return text


class LLMExplainer:
    """Asks a chat backend to explain each feature from its top examples (delphi's recipe)."""

    batch_size = 8

    def __init__(self, backend: ChatBackend, n_examples: int = 20, max_tokens: int = 400,
                 retries: int = 2) -> None:
        self.backend = backend
        self.name = backend.name
        self.n_examples = n_examples
        self.max_tokens = max_tokens
        self.retries = retries

    def explain(self, store: FeatureStore, features: list[int]) -> list[Explanation]:
        return [self._explain_one(store, feature) for feature in features]

    def _explain_one(self, store: FeatureStore, feature: int) -> Explanation:
        examples = store.examples(feature, "top")[: self.n_examples]
        if not examples:
            return Explanation(feature, None, {"error": "no top examples"})
        promoted = [text for text, value in store.logit_effects(feature).get("promoted", [])
                    if text and value > 0][:10]
        try:
            text = ask(self.backend, explanation_messages(examples, promoted), parse_explanation,
                       retries=self.retries, max_tokens=self.max_tokens)
        except UnparseableAnswer as exc:
            return Explanation(feature, None, {"error": exc.reason, "answer": exc.text[-300:]})
        return Explanation(feature, text, {"n_examples": len(examples)})


# ----- the job ------------------------------------------------------------------------------

def explainer_name(spec: str) -> str:
    """The name explanations are stored under (the spec without stray spaces, as the chat
    backend names itself), checked before any model is loaded."""
    kind, _, target = spec.strip().partition(":")
    if spec.strip() == STATS:
        return STATS
    if kind in ("hf", "openai") and target.strip():
        return f"{kind}:{target.strip()}"
    raise MistudioError(f"unknown explainer {spec!r}", hint=f"use {EXPLAINER_FORMS}",
                        code="bad_request", field="explainer")


def make_explainer(spec: str, device: str = "auto", quantization: str = "auto") -> Explainer:
    """The explainer a spec names (an `hf:` one loads its model here)."""
    if explainer_name(spec) == STATS:
        return StatsExplainer()
    return LLMExplainer(chat_backend(spec, device=device, quantization=quantization))


def explain_features(sae_dir, explainer: str = STATS, features: list[int] | None = None,
                     callback=silent, overwrite: bool = False, device: str = "auto",
                     quantization: str = "auto") -> dict:
    """Explain the features that fired (or the `features` chosen) with `explainer` and store
    the explanations; already explained ones are skipped unless `overwrite`."""
    name = explainer_name(explainer)
    return _explain(sae_dir, name, lambda: make_explainer(explainer, device, quantization),
                    features, callback, overwrite)


def explain_with(sae_dir, explainer: Explainer, features: list[int] | None = None,
                 callback=silent, overwrite: bool = False) -> dict:
    """`explain_features` with an explainer object already built (e.g. an LLMExplainer with
    other settings)."""
    return _explain(sae_dir, explainer.name, lambda: explainer, features, callback, overwrite)


def _explain(sae_dir, name: str, build: Callable[[], Explainer], features: list[int] | None,
             callback, overwrite: bool) -> dict:
    store = FeatureStore(sae_dir)
    try:
        if store.array("top_tokens") is None:
            raise MistudioError(f"the features of {store.sae_dir} have no top examples",
                                hint=f"run `mistudio find {store.sae_dir} ...` again",
                                code="not_found")
        chosen = (range(store.d_sae) if features is None
                  else sorted({store.check_feature(f) for f in features}))
        fired = set(store.fired_features())
        alive = [f for f in chosen if f in fired]
        done = set() if overwrite else store.explained(name)
        todo = [f for f in alive if f not in done]
        dead = len(chosen) - len(alive)
        callback("log", {"message": f"explaining {len(todo)} features with {name} "
                                    f"({len(alive) - len(todo)} already explained, "
                                    f"{dead} never fired)"})
        new, failed = _run(store, name, build if todo else None, todo, callback)
        explained = len(store.explained(name))
    finally:
        store.close()
    summary = (f"explained {len(new)} features with {name} ({explained} in all); "
               f"{dead} never fired (skipped); {len(failed)} failed")
    if new:
        summary += f"\nfeature {new[0].feature}: {new[0].text}"
    if failed:
        summary += "\nfailed features: " + _ids_text(failed)
    return {"path": str(Path(sae_dir).expanduser()), "explainer": name, "explained": explained,
            "new": len(new), "skipped_dead": dead, "failed": failed, "summary": summary}


def _run(store: FeatureStore, name: str, build: Callable[[], Explainer] | None,
         todo: list[int], callback) -> tuple[list[Explanation], list[int]]:
    """Explain `todo` batch by batch, saving each batch, reporting progress and failures."""
    new: list[Explanation] = []
    failed: list[int] = []
    callback("progress", {"done": 0, "total": len(todo)})
    if build is None:
        return new, failed
    explainer = build()
    for start in range(0, len(todo), explainer.batch_size):
        batch = todo[start:start + explainer.batch_size]
        results = explainer.explain(store, batch)
        store.save_explanations(name, [(e.feature, e.text, e.details) for e in results
                                       if e.text is not None])
        for result in results:
            if result.text is None:
                failed.append(result.feature)
                callback("log", {"message": f"feature {result.feature}: no explanation "
                                            f"({result.details.get('error')})"})
            else:
                new.append(result)
        callback("progress", {"done": start + len(batch), "total": len(todo)})
    return new, failed


def _ids_text(ids: list[int], most: int = 20) -> str:
    shown = ", ".join(map(str, ids[:most]))
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")
