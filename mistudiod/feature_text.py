"""Feature listings and cards as text, for `mistudio features` and `mistudio feature`.

Activating tokens are marked bold yellow on a terminal and `«...»` otherwise (a pipe, a file,
`NO_COLOR`); tables are clipped to the terminal's width and never when stdout is not one.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

from mistudio_core.feature_store import Example


def features_table(document: dict, offset: int, sort: str) -> str:
    """`mistudio features`: a page of features, or the matches of a semantic search."""
    width = _line_width()
    if "results" in document:  # --semantic
        lines = [f"{'ID':>6}  {'MATCH':>6}  EXPLANATION"]
        lines += [_clip(f"{r['id']:>6}  {r['score']:>6.3f}  {one_line(r['explanation'])}", width)
                  for r in document["results"]]
        return "\n".join(lines if document["results"] else ["no explanation matches"])
    rows = document["features"]
    lines = [f"{'ID':>6}  {'DENSITY':>8}  {'MAX':>7}  {'MEAN':>7}  {'SCORE':>6}  EXPLANATION"]
    for row in rows:
        score = "-" if row["score"] is None else f"{row['score']:.3f}"
        explanation = one_line(row["explanation"]) if row["explanation"] else "-"
        lines.append(_clip(f"{row['id']:>6}  {_percent(row['density']):>8}  "
                           f"{row['max_act']:>7.3g}  {row['mean_act']:>7.3g}  {score:>6}  "
                           f"{explanation}", width))
    if not rows:
        return f"no features match (the SAE has {document['d_sae']})"
    lines.append(f"{offset + 1}-{offset + len(rows)} of {document['total']} features "
                 f"({document['d_sae']} in the SAE), by {sort}; "
                 f"`mistudio feature {document['path']} ID` shows one")
    return "\n".join(lines)


def feature_card(card: dict) -> str:
    """`mistudio feature`: everything about one feature (`FeatureStore.card`), as text."""
    mark = _marker()
    lines = [_statistics_line(card)]
    lines += _section("explanations", [f"{e['explainer']}: {one_line(e['text'])}"
                                       for e in card["explanations"]])
    lines += _section("scores", [f"{s['scorer']} of {s['explainer']}: "
                                 + ("-" if s["value"] is None else f"{s['value']:.3f}")
                                 for s in card["scores"]])
    lines += _section("top examples", [f"{e['value']:>8.3f}  "
                                       f"{one_line(Example(**e).marked_text(0.0, *mark))}"
                                       for e in card["top"]])
    lines += _section("across the activation range (one example per quantile group)", [
        f"{g['group'] + 1:>2} {g['low']:>8.3g} - {g['high']:<8.3g} "
        + (one_line(Example(**g["examples"][0]).marked_text(0.0, *mark))
           if g["examples"] else "-") for g in card["quantiles"]])
    lines += _section("activation histogram", _histogram_rows(card["histogram"]))
    logits = card["logits"]
    for side in ("promoted", "suppressed"):
        if logits.get(side):
            lines += _section(f"{side} tokens", ["  ".join(f"{text!r} {value:+.3f}"
                                                           for text, value in logits[side])])
    for key, title in (("similar", "similar features (decoder cosine)"),
                       ("cooccurring", "co-occurring features (Jaccard)")):
        lines += _section(title, [f"#{n['id']:<6} {n['value']:.3f}  "
                                  + one_line(n["explanation"] or "-") for n in card[key]])
    return "\n".join(lines)


def _statistics_line(card: dict) -> str:
    head = f"feature {card['id']} of {card['d_sae']}"
    if card.get("n_fired") is None:
        return head
    if not card["n_fired"]:
        return f"{head}: never fired on the tokens find read"
    return (f"{head}: fires on {_percent(card['density'])} of tokens ({card['n_fired']}), "
            f"max {card['max_act']:.3g}, mean {card['mean_act']:.3g} when firing")


def _section(title: str, rows: list[str]) -> list[str]:
    return ["", f"{title}:", *(f"  {row}" for row in rows)] if rows else []


def _histogram_rows(histogram: dict, bar_width: int = 40) -> list[str]:
    """One row per log-spaced bin, from the first to the last one with any count."""
    counts, edges = histogram.get("counts") or [], histogram.get("log10_edges") or []
    filled = [i for i, count in enumerate(counts) if count]
    if not filled:
        return []
    peak = max(counts)
    rows = []
    for i in range(filled[0], filled[-1] + 1):
        bar = "#" * math.ceil(bar_width * counts[i] / peak) if counts[i] else ""
        rows.append(f"{10 ** edges[i]:>9.3g} - {10 ** edges[i + 1]:<9.3g} "
                    f"{bar:<{bar_width}} {counts[i]}")
    return rows


def _marker() -> tuple[str, str]:
    """How activating tokens are marked: bold yellow on a terminal, «...» in plain text."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return "\x1b[1;33m", "\x1b[0m"
    return "«", "»"


def one_line(text: str | None) -> str:
    """`text` on one line: line breaks drawn as ⏎."""
    return (text or "").replace("\r", "").replace("\n", "⏎")


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.3g}%"


def _line_width() -> int | None:
    """The terminal's width; None (no clipping) when stdout is not a terminal."""
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _clip(line: str, width: int | None) -> str:
    return line if width is None or len(line) <= width else line[:max(width - 1, 0)] + "…"
