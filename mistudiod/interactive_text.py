"""Monitor and steer results as text, for `mistudio monitor` and `mistudio steer`.

`monitor`: one line per token, its position, the token (quoted, so spaces and newlines show) and
its strongest features as `id:activation`, each with a short explanation when one exists; with
several SAEs each SAE's features are prefixed by its name. `steer`: the baseline and the steered
continuation side by side when the terminal is wide enough (one after the other otherwise), then
each steered feature's mean activation on either side.
"""

from __future__ import annotations

import shutil
import textwrap
from itertools import zip_longest

from mistudiod.feature_text import one_line

EXPLANATION_CHARS = 32  # how much of an explanation a monitor line shows
SIDE_BY_SIDE_MIN = 72  # the narrowest terminal that gets two columns
TOKEN_CHARS = 14


def token_line(token: dict, single_sae: bool = True) -> str:
    """One token's report (`TokenFeatures.to_dict()`) on one line."""
    mark = "+" if token.get("generated") else " "
    shown = repr(token["token"])
    if len(shown) > TOKEN_CHARS:
        shown = shown[:TOKEN_CHARS - 1] + "…"
    groups = []
    for name, hits in token["features"].items():
        text = "  ".join(_hit(hit) for hit in hits) or "-"
        groups.append(text if single_sae else f"[{name}] {text}")
    return f"{token['position']:>5}{mark} {shown:<{TOKEN_CHARS}}  " + "   ".join(groups)


def monitor_text(document: dict, skip: int = 0) -> str:
    """`mistudio monitor`: one line per token (the prompt's, then the generated ones), leaving
    out the first `skip` (already streamed), and a line on the generated text."""
    single = len(document.get("saes") or []) <= 1
    lines = [token_line(token, single) for token in document["tokens"][skip:]]
    if document.get("mode") == "generate":
        generated = sum(1 for token in document["tokens"] if token["generated"])
        lines.append(f"generated ({generated} tokens, + above, stopped at "
                     f"{document['stopped']}): {one_line(document['text'])}")
    if not document["tokens"]:
        lines.append("no tokens to report")
    return "\n".join(lines)


def steer_text(document: dict, width: int | None = None) -> str:
    """`mistudio steer`: baseline and steered continuations, and the steered features' mean
    activation on each side. `width` defaults to the terminal's (or $COLUMNS, or 80)."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    steerings = document["steerings"]
    described = ", ".join(_steering(s) for s in steerings)
    titles = ("baseline", f"steered ({described})")
    texts = [one_line(document["prompt"]) + " ▸ " + one_line(document[side]["text"])
             for side in ("baseline", "steered")]
    lines = [f"prompt: {one_line(document['prompt'])} ({document['prompt_tokens']} tokens), "
             f"seed {document['seed']}, temperature {document['temperature']:g}"
             + (" (cancelled)" if document.get("cancelled") else ""), ""]
    if width >= SIDE_BY_SIDE_MIN:
        column = (width - 3) // 2
        left = [titles[0], "-" * min(column, len(titles[0]))] + _wrap(texts[0], column)
        right = [titles[1], "-" * min(column, len(titles[1]))] + _wrap(texts[1], column)
        lines += [f"{a[:column]:<{column}} │ {b[:column]}".rstrip()
                  for a, b in zip_longest(left, right, fillvalue="")]
    else:
        for title, text in zip(titles, texts, strict=True):
            lines += [title + ":", *(f"  {row}" for row in _wrap(text, max(width - 2, 20))), ""]
        lines.pop()
    lines += ["", "mean activation of the steered features on the generated tokens:"]
    means = document.get("mean_activation") or {}
    for index, steering in enumerate(steerings):
        base, steered = (means.get(side, [None] * len(steerings))[index]
                         for side in ("baseline", "steered"))
        lines.append(f"  feature {steering['label']}: baseline {_number(base)}, "
                     f"steered {_number(steered)}")
    return "\n".join(lines)


def _hit(hit: dict) -> str:
    text = f"{hit['id']}:{hit['activation']:.3g}"
    explanation = one_line(hit.get("explanation"))
    if explanation:
        if len(explanation) > EXPLANATION_CHARS:
            explanation = explanation[:EXPLANATION_CHARS - 1] + "…"
        text += f" ({explanation})"
    return text


def _steering(steering: dict) -> str:
    where = ", from the prompt's end" if steering.get("from_prompt_end") else ""
    if steering["mode"] == "clamp":
        return f"{steering['label']} clamped to {steering['strength']:g}{where}"
    return f"{steering['label']} {steering['strength']:+g}{where}"


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width=max(width, 10), drop_whitespace=False,
                         replace_whitespace=False) or [""]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
