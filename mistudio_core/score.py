"""Scoring explanations: how well does what was said about a feature predict where it fires?

An explanation is written from a feature's `top` examples only; it is scored on the examples it
has not seen, its held-out set: the `quantile` examples (activating, sampled across the whole
activation range) and the `negative` ones (spans where the feature is silent). Five scorers,
after delphi (Paulo et al., 2024) and OpenAI's automated-interpretability (Bills et al., 2023):

- `rule` (offline): the explanation's token rule (`TokenRule`, from the explainer's details or
  the tokens quoted in its text) is run on every token of the held-out examples; the value is
  Pearson's r between predicted and true activations over all those tokens, with the precision
  and recall of "fires here" (predicted > 0 vs true > 0) beside it.
- `embedding:MODEL` (offline with `embedding:hashing`, else any HF encoder): the cosine
  similarity of the explanation's embedding to each example's; the value is the ROC-AUC of that
  similarity separating activating from non-activating examples.
- `detection` (LLM): the LLM reads the explanation and a shuffled batch of plain excerpts and
  says which ones the explanation applies to; the value is balanced accuracy, (TPR + TNR) / 2.
- `fuzzing` (LLM): the excerpts have tokens highlighted `<<...>>`, correctly on activating
  examples, on random tokens of non-activating ones; the LLM says whether each highlighting
  fits the explanation; the value is balanced accuracy.
- `simulation` (LLM): OpenAI's simulator with one call per example: the LLM predicts an
  activation from 0 to 10 for every token; the value is Pearson's r between predictions and true
  activations over all the examples' tokens together ("all at once"; r is scale-free, so the
  true activations need no rescaling to the 0-10 range).

Undefined values are reported, not guessed: a correlation against a constant (a rule that
predicts nothing, say) is 0.0 with `details["constant"]` saying which side was constant; a
precision with nothing predicted is None. A feature without held-out activating examples gets a
None value with `details["reason"]`; one that could not be scored (no rule in its explanation,
no parseable LLM answer) a None value with `details["error"]`, and is listed in `failed`.

Scores are saved per batch of features, so an interrupted job keeps what it did and a rerun
resumes with the features not yet scored by that (scorer, explainer).
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np

from mistudio_core.errors import MistudioError
from mistudio_core.explain import TokenRule, _ids_text, example_line
from mistudio_core.feature_store import PAD_TOKEN, Example, FeatureStore
from mistudio_core.llm import ChatBackend, UnparseableAnswer, ask, chat_backend
from mistudio_core.progress import Callback, silent

SCORER_KINDS = ("rule", "embedding", "detection", "fuzzing", "simulation")
LLM_SCORERS = ("detection", "fuzzing", "simulation")
SEED = 0  # shuffles and fake highlights: the same prompts for the same feature on every run
OFFLINE_BATCH = 256  # features read, scored and saved together by the offline scorers
LLM_BATCH = 4  # ... by the LLM scorers (an interrupt loses at most this many features' calls)
EXAMPLES_PER_SIDE = {"detection": 10, "fuzzing": 10, "simulation": 5}
EXAMPLES_PER_PROMPT = 10  # detection and fuzzing excerpts shown in one call

Score = tuple[float | None, dict]


class Vocabulary:
    """Token texts by id, shared by every feature of a job."""

    def __init__(self, texts: list[str]) -> None:
        self.size = len(texts)
        self.texts = np.asarray([*texts, ""], dtype=object)  # the last one stands for padding

    def text(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < self.size else ""

    def text_array(self, token_ids: np.ndarray) -> np.ndarray:
        known = (token_ids >= 0) & (token_ids < self.size)
        return self.texts[np.where(known, token_ids, self.size)]

    @cached_property
    def _ids_by_stripped_text(self) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = defaultdict(list)
        for token_id, text in enumerate(self.texts[:self.size].tolist()):
            ids[text.strip()].append(token_id)
        return ids

    def ids_like(self, texts) -> list[int]:
        """The ids of every token whose text equals one of `texts` once both are stripped of
        surrounding whitespace (the widest match a `TokenRule` makes)."""
        return [i for text in texts for i in self._ids_by_stripped_text.get(text.strip(), [])]


class HeldOut:
    """The examples of one feature that its explanation was not written from: the activating
    (quantile, lowest group first) then the non-activating (negative) ones, as arrays of token
    ids and activations `[n, width]` for scorers that work on every token, and as `Example`s
    (made when first asked for) for those that show text."""

    def __init__(self, token_ids: np.ndarray, acts: np.ndarray, values: np.ndarray,
                 n_activating: int, vocabulary: Vocabulary) -> None:
        self.token_ids = token_ids
        self.acts = acts
        self.values = values
        self.n_activating = n_activating
        self.vocabulary = vocabulary

    @cached_property
    def all(self) -> list[Example]:
        texts = self.vocabulary.text_array(self.token_ids).tolist()
        center = self.token_ids.shape[1] // 2
        return [Example(ids, tokens, acts, value, center) for ids, tokens, acts, value
                in zip(self.token_ids.tolist(), texts, self.acts.tolist(), self.values.tolist(),
                       strict=True)]

    @property
    def activating(self) -> list[Example]:
        return self.all[:self.n_activating]

    @property
    def negative(self) -> list[Example]:
        return self.all[self.n_activating:]


def held_out_examples(store: FeatureStore, features: Sequence[int],
                      vocabulary: Vocabulary) -> dict[int, HeldOut]:
    """The held-out examples of several features, from one read of each array (so scoring
    thousands of features reads the arrays in a few large slices, not example by example).

    A quantile sample can be the very span a top example shows (always so for a feature that
    fired a handful of times): such samples are left out, so that an explanation is never
    scored on the text it was written from."""
    sets = [(*arrays, ~np.isnan(arrays[2])) for arrays in
            (store.example_arrays(name, features) for name in ("quantile", "negative"))]
    top = store.example_arrays("top", features)
    if top is None:
        width = sets[0][0].shape[-1]
        top_tokens = np.zeros((len(features), 0, width), dtype=np.int32)
        top_filled = np.zeros((len(features), 0), dtype=bool)
    else:
        top_tokens, top_filled = top[0], ~np.isnan(top[2])
    held_out = {}
    for row, feature in enumerate(features):
        quantile_tokens, _, _, quantile_filled = sets[0]
        shown = top_tokens[row][top_filled[row]]
        seen = (quantile_tokens[row][:, None, :] == shown[None]).all(-1).any(-1)
        unseen = [quantile_filled[row] & ~seen, sets[1][3][row]]
        parts = [(tokens[row][keep], acts[row][keep], values[row][keep])
                 for (tokens, acts, values, _), keep in zip(sets, unseen, strict=True)]
        held_out[feature] = HeldOut(*(np.concatenate(column) for column in zip(*parts,
                                                                                strict=True)),
                                    n_activating=len(parts[0][2]), vocabulary=vocabulary)
    return held_out


def rule_predictions(rule: TokenRule, token_ids: np.ndarray, vocabulary: Vocabulary
                     ) -> np.ndarray:
    """`rule.simulate` at every position of the examples `token_ids` `[n, width]`, computed
    once per distinct (previous token, token) pair where the rule could fire.

    A TokenRule predicts from a token and the one before it (padding reads as ""), and only on
    tokens that equal one it names once whitespace is stripped; running it on just those pairs
    instead of on every token is what lets a whole SAE be scored in seconds."""
    previous = np.full_like(token_ids, PAD_TOKEN)
    previous[:, 1:] = token_ids[:, :-1]
    candidates = np.isin(token_ids, vocabulary.ids_like(rule.tokens))
    predicted = np.zeros(token_ids.shape, dtype=np.float64)
    if not candidates.any():
        return predicted
    stride = vocabulary.size + 1  # ids from PAD_TOKEN (-1) to size - 1, shifted by one
    keys = (previous[candidates].astype(np.int64) + 1) * stride + token_ids[candidates] + 1
    pairs, inverse = np.unique(keys, return_inverse=True)
    weights = [rule.simulate([vocabulary.text(int(key // stride) - 1),
                              vocabulary.text(int(key % stride) - 1)])[1]
               for key in pairs.tolist()]
    predicted[candidates] = np.asarray(weights, dtype=np.float64)[inverse]
    return predicted


# ----- statistics --------------------------------------------------------------------------------


def pearson(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, str | None]:
    """Pearson's r, and which side was constant when it is undefined (then r is 0.0: such a
    prediction carries no information about the activations)."""
    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(actual, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0:
        return 0.0, "prediction"
    if syy == 0.0:
        return 0.0, "activations"
    # sqrt of the product, not a product of sqrts: identical inputs then give exactly 1.0
    return max(-1.0, min(1.0, float(dx @ dy) / math.sqrt(sxx * syy))), None


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """The probability that a random positive scores above a random negative (ties count a
    half), from the rank-sum formula with tied scores given their average rank. None when
    either class is empty."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    start = 0
    while start < len(scores):  # runs of equal scores share the mean of their 1-based ranks
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(judged: Sequence[tuple[bool, bool]]) -> tuple[float | None, dict]:
    """(TPR + TNR) / 2 of `(is_positive, said_positive)` pairs, with the counts."""
    tp = sum(1 for truth, said in judged if truth and said)
    fn = sum(1 for truth, said in judged if truth and not said)
    tn = sum(1 for truth, said in judged if not truth and not said)
    fp = sum(1 for truth, said in judged if not truth and said)
    counts = {"true_positives": tp, "false_negatives": fn, "true_negatives": tn,
              "false_positives": fp}
    if tp + fn == 0 or tn + fp == 0:
        return None, counts
    return (tp / (tp + fn) + tn / (tn + fp)) / 2, counts


def distribution(values) -> dict:
    """count, mean, median, quartiles and range of the values that are not None."""
    present = sorted(float(v) for v in values if v is not None)
    if not present:
        return {"count": 0, "mean": None, "median": None, "p25": None, "p75": None,
                "min": None, "max": None}
    p25, median, p75 = np.percentile(present, [25, 50, 75]).tolist()
    return {"count": len(present), "mean": statistics.fmean(present), "median": median,
            "p25": p25, "p75": p75, "min": present[0], "max": present[-1]}


# ----- the scorers -------------------------------------------------------------------------------


Task = tuple[int, dict, HeldOut]  # a feature, its explanation, its held-out examples


class _OneByOne:
    """A scorer that scores a batch's features one after the other."""

    def score_batch(self, tasks: list[Task]) -> list[Score]:
        return [self.score(*task) for task in tasks]


class RuleScorer(_OneByOne):
    """Runs the explanation's token rule over the held-out tokens (no model needed)."""

    name = "rule"
    batch = OFFLINE_BATCH

    def score(self, feature: int, explanation: dict, held_out: HeldOut) -> Score:
        rule = (TokenRule.from_details(explanation.get("details") or {})
                or TokenRule.from_text(explanation["text"]))
        if rule is None:
            return None, {"error": "the explanation names no tokens to simulate"}
        real = held_out.token_ids != PAD_TOKEN
        predicted = rule_predictions(rule, held_out.token_ids, held_out.vocabulary)[real]
        actual = held_out.acts[real]
        predicted_fires, fires = predicted > 0, actual > 0
        hits = int((predicted_fires & fires).sum())
        r, constant = pearson(predicted, actual)
        details = {"pearson_r": r,
                   "precision": hits / int(predicted_fires.sum()) if predicted_fires.any()
                   else None,
                   "recall": hits / int(fires.sum()) if fires.any() else None,
                   "n_positions": len(actual), "n_activating": int(fires.sum())}
        if constant:
            details["constant"] = constant
        return r, details


class EmbeddingScorer:
    """ROC-AUC of the explanation-to-example cosine similarity (activating vs not)."""

    batch = OFFLINE_BATCH

    def __init__(self, model: str, device: str) -> None:
        from mistudio_core.embeddings import text_embedder

        self.name = f"embedding:{model}"
        self.embedder = text_embedder(model, device=device)

    def score_batch(self, tasks: list[Task]) -> list[Score]:
        """One `embed` call for the whole batch: an encoder on a GPU wants large batches."""
        texts = [text for _, explanation, held_out in tasks
                 for text in (explanation["text"], *(e.text for e in held_out.all))]
        vectors = self.embedder.embed(texts)
        scores, start = [], 0
        for _, _, held_out in tasks:
            end = start + 1 + len(held_out.all)
            scores.append(self._auc(vectors[start], vectors[start + 1:end], held_out))
            start = end
        return scores

    @staticmethod
    def _auc(explanation: np.ndarray, examples: np.ndarray, held_out: HeldOut) -> Score:
        if not held_out.negative:
            return None, {"reason": "no held-out non-activating examples"}
        similarity = examples @ explanation
        labels = [True] * len(held_out.activating) + [False] * len(held_out.negative)
        auc = roc_auc(similarity, labels)
        return auc, {"auc": auc, "n_activating": len(held_out.activating),
                     "n_negative": len(held_out.negative),
                     "mean_similarity_activating": float(similarity[:len(held_out.activating)]
                                                         .mean()),
                     "mean_similarity_negative": float(similarity[len(held_out.activating):]
                                                       .mean())}


class _LLMScorer(_OneByOne):
    """What the three LLM scorers share: the backend and the choice of examples to show."""

    batch = LLM_BATCH

    def __init__(self, name: str, backend: ChatBackend) -> None:
        self.name = name
        self.backend = backend
        self.per_side = EXAMPLES_PER_SIDE[name]

    def shown(self, feature: int, held_out: HeldOut) -> list[tuple[Example, bool]]:
        """Up to `per_side` activating examples spread over the quantile groups and as many
        non-activating ones, shuffled the same way on every run."""
        activating = held_out.activating
        if len(activating) > self.per_side:
            picks = np.linspace(0, len(activating) - 1, self.per_side).round().astype(int)
            activating = [activating[i] for i in picks]
        chosen = ([(e, True) for e in activating]
                  + [(e, False) for e in held_out.negative[:self.per_side]])
        random.Random(f"{SEED}:{feature}").shuffle(chosen)
        return chosen


class _JudgingScorer(_LLMScorer, ABC):
    """Detection and fuzzing: the LLM says 1 or 0 for each excerpt of a batch."""

    system: str

    @abstractmethod
    def excerpt(self, example: Example, activating: bool, rng: random.Random,
                typical_count: int) -> str:
        """How `example` is shown (`typical_count`: tokens an activating example highlights)."""

    def score(self, feature: int, explanation: dict, held_out: HeldOut) -> Score:
        shown = self.shown(feature, held_out)
        if not any(not activating for _, activating in shown):
            return None, {"reason": "no held-out non-activating examples"}
        rng = random.Random(f"{SEED}:{feature}:highlights")
        typical = _typical_active_count([e for e, activating in shown if activating])
        excerpts = [self.excerpt(e, activating, rng, typical) for e, activating in shown]
        judged, unparsed = [], 0
        for start in range(0, len(shown), EXAMPLES_PER_PROMPT):
            batch = excerpts[start:start + EXAMPLES_PER_PROMPT]
            truth = [activating for _, activating in shown[start:start + EXAMPLES_PER_PROMPT]]
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": _judging_prompt(explanation["text"], batch)}]
            try:
                answers = ask(self.backend, messages, _binary_list_parser(len(batch)),
                              max_tokens=200 + 4 * len(batch))
            except UnparseableAnswer:
                unparsed += len(batch)
                continue
            judged.extend(zip(truth, answers, strict=True))
        value, counts = balanced_accuracy(judged)
        details = {"balanced_accuracy": value, **counts, "n_examples": len(shown),
                   "unparsed": unparsed, "llm": self.backend.name}
        if not judged:
            details["error"] = "none of the LLM's answers could be parsed"
        return value, details


class DetectionScorer(_JudgingScorer):
    system = (
        "You are a meticulous interpretability researcher. A feature of a language model has "
        "been explained in a few words. You will see numbered text excerpts. For each one, "
        "decide whether the feature, as explained, fires somewhere in it: 1 if it does, 0 if "
        "not. Think briefly if you need to, then end your answer with one line holding a list "
        "of 0s and 1s, one per excerpt in order, for example [1, 0, 0, 1].")

    def excerpt(self, example, activating, rng, typical_count):
        return example_line(example, marked=False)


class FuzzingScorer(_JudgingScorer):
    system = (
        "You are a meticulous interpretability researcher. A feature of a language model has "
        "been explained in a few words. You will see numbered text excerpts in which some "
        "tokens are highlighted between << and >>. For each excerpt, decide whether the "
        "highlighted tokens are where the feature, as explained, would fire: 1 if the "
        "highlighting is correct, 0 if it is not. Think briefly if you need to, then end your "
        "answer with one line holding a list of 0s and 1s, one per excerpt in order, for "
        "example [1, 0, 0, 1].")

    def excerpt(self, example, activating, rng, typical_count):
        if activating:
            return example_line(example)
        positions = [i for i, t in enumerate(example.token_ids) if t != PAD_TOKEN]
        marked = set(rng.sample(positions, min(typical_count, len(positions))))
        fake = Example(example.token_ids, example.tokens,
                       [1.0 if i in marked else 0.0 for i in range(len(example.tokens))],
                       example.value, example.center)
        return example_line(fake)


class SimulationScorer(_LLMScorer):
    system = (
        "You are a meticulous interpretability researcher simulating a feature of a language "
        "model from its explanation. You will see a text excerpt split into numbered tokens. "
        "For every token, predict how strongly the feature fires on it, as an integer from 0 "
        "(not at all) to 10 (as strongly as it ever does). Answer with a JSON list of the "
        "integers, one per token in order, or with one 'index: value' line per token.")

    def score(self, feature: int, explanation: dict, held_out: HeldOut) -> Score:
        predicted, actual, unparsed, used = [], [], 0, 0
        for example, _ in self.shown(feature, held_out):
            positions = [i for i, t in enumerate(example.token_ids) if t != PAD_TOKEN]
            if not positions:
                continue
            tokens = [example.tokens[i] for i in positions]
            messages = [{"role": "system", "content": self.system},
                        {"role": "user", "content": _simulation_prompt(explanation["text"],
                                                                       tokens)}]
            try:
                guesses = ask(self.backend, messages, _activation_parser(len(tokens)),
                              max_tokens=32 + 6 * len(tokens))
            except UnparseableAnswer:
                unparsed += 1
                continue
            used += 1
            predicted.extend(guesses)
            actual.extend(example.acts[i] for i in positions)  # r is scale-free: no rescaling
        details = {"n_examples": used, "n_tokens": len(actual), "unparsed": unparsed,
                   "llm": self.backend.name}
        if not used:
            return None, {**details, "error": "none of the LLM's answers could be parsed"}
        r, constant = pearson(np.asarray(predicted), np.asarray(actual))
        details["pearson_r"] = r
        if constant:
            details["constant"] = constant
        return r, details


def _typical_active_count(examples: list[Example]) -> int:
    """How many tokens an activating example usually has highlighted (at least one)."""
    counts = [sum(1 for a in e.acts if a > 0) for e in examples]
    return max(1, round(statistics.median(counts))) if counts else 1


def _judging_prompt(explanation: str, excerpts: list[str]) -> str:
    lines = [f"Feature explanation: {explanation}", "", "Excerpts:"]
    lines += [f"Example {i}: {text}" for i, text in enumerate(excerpts, start=1)]
    lines += ["", f"End with a list of {len(excerpts)} values (1 or 0), one per excerpt."]
    return "\n".join(lines)


def _simulation_prompt(explanation: str, tokens: list[str]) -> str:
    lines = [f"Feature explanation: {explanation}", "", "Tokens:"]
    lines += [f"{i}: {json.dumps(token)}" for i, token in enumerate(tokens)]
    lines += ["", f"Give {len(tokens)} integers from 0 to 10, one per token."]
    return "\n".join(lines)


_LIST = re.compile(r"\[([^\[\]]*)\]")
_INDEXED = re.compile(r"^\s*(\d+)\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.MULTILINE)


def _binary_list_parser(n: int) -> Callable[[str], list[bool]]:
    """Reads the last `[...]` of an answer as n 0/1 values; ValueError otherwise (so `ask`
    asks again)."""

    def parse(answer: str) -> list[bool]:
        lists = _LIST.findall(answer)
        if not lists:
            raise ValueError("no [..] list in the answer")
        items = [item.strip() for item in lists[-1].split(",") if item.strip()]
        if len(items) != n or any(item not in ("0", "1") for item in items):
            raise ValueError(f"expected a list of {n} values, each 0 or 1")
        return [item == "1" for item in items]

    return parse


def _activation_parser(n: int) -> Callable[[str], list[float]]:
    """Reads n predictions from 0 to 10 from a JSON list or from `index: value` lines."""

    def parse(answer: str) -> list[float]:
        for found in reversed(_LIST.findall(answer)):
            try:
                values = [float(item) for item in found.split(",") if item.strip()]
            except ValueError:
                continue
            if len(values) == n:
                return [min(10.0, max(0.0, v)) for v in values]
        indexed = {int(i): float(v) for i, v in _INDEXED.findall(answer)}
        if set(range(n)) <= indexed.keys():
            return [min(10.0, max(0.0, indexed[i])) for i in range(n)]
        raise ValueError(f"expected {n} integers from 0 to 10, one per token")

    return parse


# ----- the job -----------------------------------------------------------------------------------


def scorer_name(spec: str) -> str:
    """The name a scorer's scores are stored under (`embedding:MODEL` with the model as
    given), checked before anything is loaded."""
    kind, _, model = (part.strip() for part in spec.strip().partition(":"))
    if kind not in SCORER_KINDS or (kind == "embedding") != bool(model):
        raise MistudioError(
            f"unknown scorer {spec!r}",
            hint="use rule, embedding:MODEL (embedding:hashing works offline), detection, "
                 "fuzzing or simulation", code="bad_request", field="scorer")
    return f"{kind}:{model}" if model else kind


def make_scorer(spec: str, llm: str | ChatBackend | None = None, device: str = "auto",
                quantization: str = "auto"):
    """The scorer a spec names, its model loaded (an LLM scorer needs `llm`: a backend spec
    such as `hf:MODEL` or `openai:URL#model`, or a backend already made)."""
    kind, _, model = scorer_name(spec).partition(":")
    if kind == "rule":
        return RuleScorer()
    if kind == "embedding":
        return EmbeddingScorer(model, device)
    backend = chat_backend(llm, device=device, quantization=quantization) \
        if isinstance(llm, str) else llm
    return {"detection": DetectionScorer, "fuzzing": FuzzingScorer,
            "simulation": SimulationScorer}[kind](kind, backend)


def score_features(sae_dir, scorer: str = "rule", explainer: str = "stats",
                   features: list[int] | None = None, callback: Callback = silent,
                   overwrite: bool = False, device: str = "auto", quantization: str = "auto",
                   llm: str | ChatBackend | None = None) -> dict:
    """Score the explanations of `explainer` (of all explained features, or of `features`)
    with `scorer`, skipping features already scored by that pair unless `overwrite` (those
    that failed are tried again)."""
    scorer = scorer_name(scorer)
    kind = scorer.partition(":")[0]
    if kind in LLM_SCORERS and not llm:
        raise MistudioError(f"the {kind} scorer needs an LLM to ask",
                            hint="pass --llm hf:MODEL or --llm openai:URL[#model]",
                            code="bad_request", field="llm")
    store = FeatureStore(sae_dir)
    try:
        todo, skipped = _features_to_score(store, scorer, explainer, features, overwrite)
        callback("log", {"message": f"scoring {len(todo)} {explainer} explanations with "
                                    f"{scorer}" + (f" ({skipped} already scored)"
                                                   if skipped else "")})
        new, failed = 0, []
        callback("progress", {"done": 0, "total": len(todo)})
        if todo:
            engine = make_scorer(scorer, llm, device, quantization)
            vocabulary = Vocabulary(store.vocabulary)
            for start in range(0, len(todo), engine.batch):
                batch = todo[start:start + engine.batch]
                rows = _score_batch(store, engine, explainer, batch, vocabulary)
                store.save_scores(scorer, explainer, rows)
                new += len(rows)
                failed += [f for f, _, details in rows if "error" in details]
                callback("progress", {"done": new, "total": len(todo)})
        numbers = distribution(store.score_values(scorer, explainer).values())
        return {"path": str(store.sae_dir), "scorer": scorer, "explainer": explainer,
                "scored": len(store.scored(scorer, explainer)), "new": new, "failed": failed,
                "distribution": numbers,
                "summary": _summary(kind, scorer, explainer, numbers, new, failed)}
    finally:
        store.close()


def _features_to_score(store: FeatureStore, scorer: str, explainer: str,
                       features: list[int] | None, overwrite: bool) -> tuple[list[int], int]:
    if any(store.array(f"{name}_{part}") is None for name in ("quantile", "negative")
           for part in ("tokens", "acts", "values")):
        raise MistudioError(f"the features of {store.sae_dir} have no held-out examples "
                            "(quantile and negative) to score explanations on",
                            hint=f"run `mistudio find {store.sae_dir} ...` again",
                            code="not_found")
    explained = store.explained(explainer)
    if not explained:
        raise MistudioError(f"no {explainer} explanations to score in {store.sae_dir}",
                            hint=f"run `mistudio explain {store.sae_dir} --explainer "
                                 f"{explainer}` first", code="not_found", field="explainer")
    chosen = explained if features is None else \
        explained & {store.check_feature(int(f)) for f in features}
    if not chosen:
        raise MistudioError(f"none of the chosen features has a {explainer} explanation",
                            hint=f"explain them first: `mistudio explain {store.sae_dir} "
                                 f"--explainer {explainer} --features ...`",
                            code="not_found", field="features")
    done = set() if overwrite else _settled(store, scorer, explainer)
    return sorted(chosen - done), len(chosen & done)


def _settled(store: FeatureStore, scorer: str, explainer: str) -> set[int]:
    """The features with a stored score that need no new try: all but the failed ones (one
    query, not one per unscored feature)."""
    rows = store.db.execute("SELECT feature, value, details FROM scores WHERE scorer = ? AND "
                            "explainer = ?", (scorer, explainer))
    return {feature for feature, value, details in rows
            if value is not None or "error" not in json.loads(details)}


def _score_batch(store: FeatureStore, engine, explainer: str, batch: list[int],
                 vocabulary: Vocabulary) -> list[tuple[int, float | None, dict]]:
    held_out = held_out_examples(store, batch, vocabulary)
    unscorable = {f for f in batch if not held_out[f].n_activating}
    tasks = [(f, store.explanation(f, explainer), held_out[f]) for f in batch
             if f not in unscorable]
    scores = dict(zip([f for f, _, _ in tasks], engine.score_batch(tasks), strict=True))
    return [(f, None, {"reason": "no held-out activating examples"}) if f in unscorable
            else (f, *scores[f]) for f in batch]


_METRICS = {"rule": "r", "embedding": "AUC", "detection": "balanced accuracy",
            "fuzzing": "balanced accuracy", "simulation": "r"}


def _summary(kind: str, scorer: str, explainer: str, numbers: dict, new: int,
             failed: list[int]) -> str:
    head = f"{scorer} scores of {numbers['count']} {explainer} explanations"
    if numbers["count"]:
        low, high = numbers["p25"], numbers["p75"]
        spread = f"{low:.2f}-{high:.2f}" if low >= 0 else f"{low:.2f} to {high:.2f}"
        head += (f": median {_METRICS[kind]} {numbers['median']:.2f} (IQR {spread}), "
                 f"mean {numbers['mean']:.2f}")
    lines = [head, f"{new} scored in this run, {len(failed)} could not be scored"]
    if failed:
        lines.append("could not score features " + _ids_text(failed))
    return "\n".join(lines)
