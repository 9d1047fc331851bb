"""Snapshots of the features screens at 80x24 (pytest-textual-snapshot), from fixed data.

The app runs without a link, filled as in tests/test_tui_snapshots.py, and its link's `request`
is replaced by a fake daemon that answers `feature.sources`, `feature.list` (sorting, filtering
and paging the fixed rows as the daemon would), `feature.search` and `feature.show` from the
documents below: the screens run their real request code, only the daemon is pretend.
Update the SVGs after an intended change with `pytest tests/test_tui_features_snapshots.py
--snapshot-update`, and look at them before committing.
"""

from __future__ import annotations

from test_tui_snapshots import NOW, fill, frozen_clocks, job  # noqa: F401  (autouse fixture)
from textual.containers import VerticalScroll
from textual.widgets import Input

from mistudio_core.errors import MistudioError
from tui.app import MistudioApp

SAE_DIR = "/var/lib/mistudiod/runs/pythia-l6-topk"
META = {"d_sae": 12288, "model_id": "EleutherAI/pythia-160m", "hook": "layers.6.resid_post",
        "corpus": "/var/lib/mistudiod/corpora/pile-10k.jsonl", "n_tokens": 1_000_000}
SORT_KEYS = {"id": "id", "density": "density", "max": "max_act", "mean": "mean_act",
             "score": "score"}


def row(feature_id: int, density: float, max_act: float, score: float | None,
        explanation: str | None) -> dict:
    return {"id": feature_id, "n_fired": round(density * 1e6), "density": density,
            "max_act": max_act, "mean_act": max_act / 3, "explainer": "stats" if explanation
            else None, "explanation": explanation, "score": score}


FEATURES = [
    row(0, 0.0312, 4.1, 0.81, 'fires on " the" (71%) after " of"; promotes " first", " same"'),
    row(1, 0.1210, 2.7, 0.64, 'fires on "\\n" (88%); promotes " The", " In"'),
    row(2, 0.0000, 0.0, None, None),
    row(3, 0.0041, 6.3, 0.55, 'fires on " (" (64%), "(" (20%); promotes " e", " i"'),
    row(4, 0.0008, 12.9, 0.92, 'fires on " return" (81%) after "\\n"; promotes " None"'),
    row(5, 0.0530, 1.9, 0.12, 'fires on "," (41%), " and" (18%)'),
    row(6, 0.0002, 8.8, None, 'fires on " def" (93%) after "\\n"; promotes " __", " get"'),
    row(7, 0.0071, 10.2, 0.74, 'fires on " return" (62%), " yield" (21%) after "\\n"; '
                               'promotes " None", " self"'),
    row(8, 0.0190, 3.3, 0.33, 'fires on " is" (52%), " was" (30%)'),
    row(9, 0.0003, 15.4, 0.88, 'fires on " import" (97%); promotes " os", " sys", " re"'),
]


def example(tokens: list[str], acts: list[float], pads: int = 0) -> dict:
    """An example as `feature.show` sends it, the peak in the middle, `pads` leading pads."""
    ids = [-1] * pads + list(range(100, 100 + len(tokens) - pads))
    return {"tokens": tokens, "token_ids": ids, "acts": acts, "value": max(acts),
            "center": len(tokens) // 2}


TOP = [
    example(["    ", " if", " not", " x", ":\n", " return", " None", "\n", "    ", " return",
             " x"], [0, 0, 0, 0, 0.4, 9.8, 1.2, 0, 0, 6.1, 0]),
    example(["", "", " self", ".", "_cache", " return", " self", ".", "_value", "\n", "\n"],
            [0, 0, 0, 0, 0, 8.7, 0.9, 0, 0, 0, 0], pads=2),
    example([" for", " item", " in", " items", ":\n", " yield", " item", "\n", "\n", "def",
             " main"], [0, 0, 0, 0, 0.3, 7.4, 0.5, 0, 0, 0, 0]),
    example(["result", " =", " compute", "()", "\n", " return", " result", "\t", "#", " done",
             "\n"], [0, 0, 0, 0, 1.1, 6.9, 0, 0, 0, 0, 0]),
]
QUANTILE_TEXT = ["    ", " x", " =", " y", "\n", " return", " x", "\n", "\n", "class", " A"]
EDGES = [0.0, 0.2, 0.5, 0.9, 1.4, 2.0, 2.8, 3.7, 4.9, 6.6, 10.2]
CARD = {
    "id": 7, "n_fired": 7100, "density": 0.0071, "max_act": 10.2, "mean_act": 3.4,
    "d_sae": 12288, "top": TOP,
    "quantiles": [{"group": group, "low": EDGES[group], "high": EDGES[group + 1],
                   "examples": [example(QUANTILE_TEXT, [0, 0, 0, 0, 0, (EDGES[group]
                                                         + EDGES[group + 1]) / 2, 0, 0, 0, 0, 0])]}
                  for group in range(10)],
    "histogram": {"log10_edges": [-2 + 0.2 * i for i in range(17)],
                  "counts": [0, 0, 3, 12, 40, 95, 160, 210, 180, 120, 70, 30, 12, 4, 0, 0]},
    "logits": {"promoted": [[" None", 0.91], [" self", 0.74], [" result", 0.52],
                            [" True", 0.48], [" False", 0.41]],
               "suppressed": [[" the", -0.62], [",", -0.55], [" and", -0.43], ["\n", -0.31],
                              [" of", -0.27]]},
    "explanations": [{"explainer": "stats", "created_at": NOW, "details": {},
                      "text": 'fires on " return" (62%), " yield" (21%) after "\\n"; '
                              'promotes " None", " self"'}],
    "scores": [{"scorer": "embedding:hashing", "explainer": "stats", "value": 0.41,
                "details": {}},
               {"scorer": "rule", "explainer": "stats", "value": 0.74, "details": {}}],
    "similar": [{"id": 4, "value": 0.83, "explanation": FEATURES[4]["explanation"]},
                {"id": 1204, "value": 0.61, "explanation": None},
                {"id": 6, "value": 0.44, "explanation": FEATURES[6]["explanation"]}],
    "cooccurring": [{"id": 1, "value": 0.38, "explanation": FEATURES[1]["explanation"]},
                    {"id": 3, "value": 0.21, "explanation": FEATURES[3]["explanation"]}],
}
SOURCES = [
    {"path": SAE_DIR, "d_sae": 12288, "model": "EleutherAI/pythia-160m",
     "hook": "layers.6.resid_post", "has_features": True, "n_explained": 12288,
     "created_at": NOW},
    {"path": "/var/lib/mistudiod/runs/demo-l2", "d_sae": 1024, "model": "demo",
     "hook": "layers.2.resid_post", "has_features": True, "n_explained": 0,
     "created_at": NOW - 60},
    {"path": "/home/ada/saes/phi-2-l16", "d_sae": 40960, "model": "microsoft/phi-2",
     "hook": "layers.16.resid_post", "has_features": False, "n_explained": 0,
     "created_at": NOW - 3600},
]


def feature_list(content: dict) -> dict:
    """`feature.list` over FEATURES, as FeatureStore.list answers (missing values last)."""
    search = content.get("search")
    rows = [f for f in FEATURES if not search or search in (f["explanation"] or "")
            or search.strip() == str(f["id"])]
    key = SORT_KEYS[content.get("sort", "id")]
    present = sorted((f for f in rows if f[key] is not None), key=lambda f: (f[key], f["id"]),
                     reverse=content.get("descending", False))
    rows = present + [f for f in rows if f[key] is None]
    offset, limit = content.get("offset", 0), content.get("limit", 100)
    return {"features": rows[offset:offset + limit], "total": len(rows), "d_sae": 12288,
            "meta": META}


ANSWERS = {
    "feature.sources": lambda _: {"saes": SOURCES},
    "feature.list": feature_list,
    "feature.search": lambda content: {"results": [
        {"id": 7, "score": 0.71, "explanation": FEATURES[7]["explanation"]},
        {"id": 4, "score": 0.66, "explanation": FEATURES[4]["explanation"]},
        {"id": 6, "score": 0.35, "explanation": FEATURES[6]["explanation"]}]},
    "feature.show": lambda content: {"feature": {**CARD, "id": content["id"]}},
    "job.submit": lambda content: {"job": job(12, "running", kind=content["kind"],
                                              params=content["params"], progress=0.4,
                                              total_steps=None)},
}


def pretend_daemon(app: MistudioApp, refuse: str | None = None) -> None:
    """Answer the app's requests from the documents above; `refuse` one type as a daemon
    that is gone would."""

    async def request(msg_type: str, content: dict | None = None, **_) -> dict:
        if msg_type == refuse:
            raise MistudioError("not connected to the daemon", code="no_daemon",
                                hint="the TUI reconnects by itself once mistudiod is running")
        return ANSWERS[msg_type](content or {})

    app.link.request = request


def snapshot(snap_compare, steps, *, refuse: str | None = None, theme="textual-dark") -> bool:
    """The app after `steps(app, pilot)` (async), its requests answered, its workers done."""
    app = MistudioApp(connect=False, theme=theme)

    async def before(pilot):
        fill(app)
        pretend_daemon(app, refuse)
        await steps(app, pilot)
        await pilot.pause()
        await app.workers.wait_for_complete()
        for field in app.screen.query(Input):  # a blinking cursor is drawn or not by the clock
            field.cursor_blink = False
        await pilot.pause(0.3)

    return snap_compare(app, terminal_size=(80, 24), run_before=before)


async def open_browser(app, pilot):
    app.open_features(SAE_DIR)
    await pilot.pause()
    await app.workers.wait_for_complete()


async def open_card(app, pilot):
    app.open_feature(SAE_DIR, 7)
    await pilot.pause()
    await app.workers.wait_for_complete()


def test_sae_picker(snap_compare):
    async def steps(app, pilot):
        await pilot.press("f")

    assert snapshot(snap_compare, steps)


def test_features_browser(snap_compare):
    assert snapshot(snap_compare, open_browser)


def test_features_browser_sorted_by_max_and_searched(snap_compare):
    async def steps(app, pilot):
        await open_browser(app, pilot)
        await pilot.press("s", "s")  # id -> density -> max
        await app.workers.wait_for_complete()
        await pilot.press("slash", *"return", "enter")

    assert snapshot(snap_compare, steps)


def test_features_browser_semantic_search(snap_compare):
    async def steps(app, pilot):
        await open_browser(app, pilot)
        await pilot.press("slash", *"~code returns", "enter")

    assert snapshot(snap_compare, steps)


def test_features_browser_when_the_daemon_is_away(snap_compare):
    assert snapshot(snap_compare, open_browser, refuse="feature.list")


def test_feature_card(snap_compare):
    """Statistics, the explanation and its scores, top examples shaded by activation."""
    assert snapshot(snap_compare, open_card)


def test_feature_card_while_explaining_it_again(snap_compare):
    """`e` submits an explain job for this feature; the card says how it is doing."""
    async def steps(app, pilot):
        await open_card(app, pilot)
        await pilot.press("e")

    assert snapshot(snap_compare, steps)


def test_feature_card_in_the_light_theme(snap_compare):
    assert snapshot(snap_compare, open_card, theme="textual-light")


def test_feature_card_histogram_and_logits(snap_compare):
    async def steps(app, pilot):
        await open_card(app, pilot)
        card = app.screen.query_one("#card", VerticalScroll)
        card.scroll_to_widget(app.screen.query_one("#card-histogram"), top=True, animate=False)

    assert snapshot(snap_compare, steps)


def test_feature_card_similar_features(snap_compare):
    """Tab goes to the similar features' list, scrolled into view."""
    async def steps(app, pilot):
        await open_card(app, pilot)
        await pilot.press("tab")

    assert snapshot(snap_compare, steps)
