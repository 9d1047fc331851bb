"""The TUI's features browser and feature card.

The pure parts first (a histogram's bars, a token's shade, the request a query makes, the SAE
a job names), then the screens against a real daemon: a feature store written by hand beside a
minimal SAE config under the daemon's runs directory, browsed from the dashboard as a person
would (pick the SAE, sort, search, open a card, jump to a similar feature, explain it again).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from rich.style import Style
from test_tui import until
from textual.color import Color
from textual.widgets import DataTable, Input, Static

from mistudio_core import feature_store
from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import PAD_TOKEN, FeatureStore
from tui.app import MistudioApp
from tui.screens.feature_card import FeatureCardScreen
from tui.screens.features import PAGE, SORTS, FeatureQuery, FeaturesScreen, sae_dir_of
from tui.screens.sae_picker import SaePickerScreen
from tui.widgets.activation_histogram import bar, histogram_rows
from tui.widgets.features_table import FeaturesTable
from tui.widgets.neighbour_list import NeighbourList
from tui.widgets.request_error import RequestError
from tui.widgets.token_text import ExampleList, shaded_tokens, token_style

BLACK, ORANGE = Color(0, 0, 0), Color(255, 160, 0)


# ----- the pure parts ------------------------------------------------------------------------

def test_histogram_rows_leave_out_the_empty_ends_and_merge_bins_to_fit():
    edges = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert histogram_rows(edges, [0, 2, 0, 3, 0]) == [(10.0, 100.0, 2), (100.0, 1000.0, 0),
                                                     (1000.0, 10000.0, 3)]
    # six non-empty bins in at most four rows: pairs of bins
    edges = [float(i) for i in range(8)]
    assert histogram_rows(edges, [0, 1, 2, 3, 4, 5, 6], max_rows=4) == [
        (10.0, 1000.0, 3), (1000.0, 1e5, 7), (1e5, 1e7, 11)]
    assert histogram_rows(edges, [0] * 7) == []


def test_bars_are_drawn_to_an_eighth_of_a_cell():
    assert bar(1.0, 4) == "████"
    assert bar(0.5, 4) == "██"
    assert bar(0.25, 1) == "▎"  # two eighths
    assert bar(0.0, 4) == ""


def test_tokens_are_shaded_by_activation_with_the_peak_marked_and_whitespace_visible():
    example = {"tokens": ["", "a", "\n", "b", "c"], "token_ids": [PAD_TOKEN, 1, 2, 3, 4],
               "acts": [0.0, 0.0, 1.0, 4.0, 2.0], "value": 4.0, "center": 3}
    text = shaded_tokens(example, 4.0, BLACK, ORANGE)
    assert text.plain == "a⏎bc"  # the padding left out, the newline drawn
    styles = {text.plain[span.start:span.end]: span.style for span in text.spans}
    assert "a" not in styles  # it did not fire: no shade
    assert styles["b"].bold and styles["b"].underline  # the peak
    assert styles["b"].bgcolor.triplet == (255, 160, 0)  # at the scale: the full colour
    assert not styles["c"].bold
    # the floor: a weak activation is still visibly shaded, and weaker ones are darker
    assert token_style(0.0, BLACK, ORANGE) == Style()
    weak = token_style(0.01, BLACK, ORANGE).bgcolor.triplet
    assert weak.red >= 0.2 * 255 - 1
    assert (token_style(0.25, BLACK, ORANGE).bgcolor.triplet.red
            < token_style(0.5, BLACK, ORANGE).bgcolor.triplet.red)


def test_a_query_asks_for_a_page_a_filtered_page_or_a_semantic_search():
    assert FeatureQuery("max", True).request("/s", 200) == ("feature.list", {
        "sae_dir": "/s", "sort": "max", "descending": True, "limit": PAGE, "offset": 200})
    assert FeatureQuery(search="comma").request("/s", 0)[1]["search"] == "comma"
    assert FeatureQuery(search="~ a comma ").request("/s", 0) == ("feature.search", {
        "sae_dir": "/s", "query": "a comma", "limit": 50})
    assert "search" not in FeatureQuery(search="~").request("/s", 0)[1]  # nothing to mean yet


def test_the_sorts_cycled_are_the_stores_in_its_order():
    assert tuple(feature_store.SORTS) == SORTS


def test_the_sae_of_a_job():
    train = {"kind": "train", "state": "succeeded", "params": {}, "result": {"path": "/r/a"}}
    assert sae_dir_of(train) == "/r/a"
    assert sae_dir_of({**train, "state": "running"}) is None  # not saved yet
    assert sae_dir_of({"kind": "find", "state": "queued", "params": {"sae_dir": "/r/b"}}) == "/r/b"


# ----- paging and retrying, against a pretend daemon ----------------------------------------

def test_the_list_is_read_a_page_at_a_time_and_failed_reads_are_retried():
    rows = [{"id": i, "n_fired": 1, "density": 0.001, "max_act": 1.0, "mean_act": 0.5,
             "explainer": None, "explanation": None, "score": None} for i in range(250)]
    offsets = []  # of the pages asked for
    failures = [True]  # the first request fails, as with no daemon

    async def request(msg_type, content=None, **_):
        assert msg_type == "feature.list"
        offsets.append(content["offset"])
        if failures.pop(0) if failures else False:
            raise MistudioError("not connected to the daemon", code="no_daemon")
        return {"features": rows[content["offset"]:content["offset"] + content["limit"]],
                "total": len(rows), "d_sae": len(rows), "meta": {}}

    async def scenario():
        app = MistudioApp(connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            app.link.request = request
            app.open_features("/runs/s")
            await pilot.pause()
            await until(pilot, lambda: isinstance(app.screen, FeaturesScreen)
                        and app.screen.query_one(RequestError).display, what="the failure")
            screen = app.screen
            app.state.set_connection(True, "connected")  # the daemon is back: read again
            await until(pilot, lambda: len(screen.features) == PAGE, what="the first page")
            assert not screen.query_one(RequestError).display
            assert offsets == [0, 0]

            failures.append(True)
            await pilot.press("ctrl+end")  # near the end of the rows read: the next page, failing
            await until(pilot, lambda: screen.query_one(RequestError).display, what="failure")
            assert offsets == [0, 0, PAGE] and len(screen.features) == PAGE  # the rows stay
            await pilot.press("r")
            await until(pilot, lambda: len(screen.features) == 2 * PAGE, what="page two")
            await pilot.press("ctrl+end")
            await until(pilot, lambda: len(screen.features) == len(rows), what="the last page")
            assert offsets == [0, 0, PAGE, PAGE, 2 * PAGE]
            assert feature_ids(screen) == list(range(len(rows)))
            await pilot.press("ctrl+home", "ctrl+end")
            await pilot.pause(0.2)
            assert offsets == [0, 0, PAGE, PAGE, 2 * PAGE]  # all read: nothing more asked

    asyncio.run(scenario())


# ----- against a real daemon -----------------------------------------------------------------

VOCAB = ["the", " cat", " sat", ",", " dog", " ran", "\n", " and"]
# id: (max activation, n_fired, explanation or None); sorted by max: 3, 0, 5, 1, 4, 2
FEATURES = {0: (8.0, 40, "commas in lists"), 1: (4.0, 90, "the word cat"),
            2: (1.0, 10, "a comma after a clause"), 3: (9.5, 5, "line breaks"),
            4: (2.0, 60, "the word dog"), 5: (6.0, 30, None)}
D_SAE, WIDTH, TOP, PER_QUANTILE = 6, 5, 2, 1
SIMILAR = {0: [2, 4], 2: [0], 1: [4], 3: [], 4: [1], 5: []}


def write_features(sae_dir) -> None:
    """A small SAE's features as `find`, `explain`, `score` and `correlate` store them."""
    sae_dir.mkdir(parents=True)
    (sae_dir / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": 8, "d_sae": D_SAE, "k": 2, "dtype": "float32",
        "metadata": {"model_name": "tiny-gpt2", "hook_name": "layers.1.resid_post"}}))
    store = FeatureStore.create(sae_dir, {
        "d_sae": D_SAE, "model_id": "tiny-gpt2", "hook": "layers.1.resid_post",
        "per_quantile": PER_QUANTILE, "histogram_log10_edges": [-1.0, 0.0, 1.0, 2.0]})
    maxes = np.array([FEATURES[f][0] for f in range(D_SAE)])
    fired = np.array([FEATURES[f][1] for f in range(D_SAE)])
    store.write_statistics(fired, maxes, fired * maxes / 2, n_tokens=1000)
    store.write_vocabulary(VOCAB)
    # top examples: " cat sat , dog ran" around the peak (the comma), the second one weaker
    tokens = np.tile(np.array([1, 2, 3, 4, 5], np.int32), (D_SAE, TOP, 1))
    tokens[:, 1, 0] = PAD_TOKEN
    acts = np.zeros((D_SAE, TOP, WIDTH), np.float32)
    acts[:, 0, WIDTH // 2] = maxes
    acts[:, 1, WIDTH // 2] = maxes / 2
    store.write_examples("top", tokens, acts, acts.max(axis=2))
    groups = 10 * PER_QUANTILE
    store.write_examples("quantile", np.tile(tokens[:, :1], (1, groups, 1)),
                         np.tile(acts[:, 1:], (1, groups, 1)), np.tile(maxes[:, None] / 2,
                                                                       (1, groups)))
    store.write_array("quantile_edges", np.linspace(0, maxes, 11).T.astype(np.float32))
    store.write_array("histogram", np.tile(np.array([3, 7, 1], np.int64), (D_SAE, 1)))
    ids = np.tile(np.array([4, 0], np.int32), (D_SAE, 1))
    store.write_array("promoted_ids", ids)
    store.write_array("promoted_values", np.full((D_SAE, 2), 0.5, np.float32))
    store.write_array("suppressed_ids", ids[:, ::-1].copy())
    store.write_array("suppressed_values", np.full((D_SAE, 2), -0.5, np.float32))
    similar = np.full((D_SAE, 2), -1, np.int32)
    for feature, neighbours in SIMILAR.items():
        similar[feature, :len(neighbours)] = neighbours
    store.write_neighbours("decoder", similar, np.where(similar >= 0, 0.9, 0.0))
    store.write_neighbours("cooccurrence", similar, np.where(similar >= 0, 0.3, 0.0))
    store.save_explanations("stats", [(f, text, {}) for f, (_, _, text) in FEATURES.items()
                                      if text])
    store.save_scores("rule", "stats", [(0, 0.75, {}), (1, 0.5, {})])
    store.close()


def feature_ids(screen: FeaturesScreen) -> list[int]:
    table = screen.query_one(FeaturesTable)
    return [int(key.value) for key in table.rows]


def rendered(widget) -> str:
    """The text a widget draws, as the terminal shows it."""
    return "\n".join(line.text for line in widget.render_lines(widget.region.reset_offset))


@pytest.mark.slow
def test_browse_sort_search_open_jump_and_explain_against_a_daemon(start_daemon, tmp_path):
    sae_dir = tmp_path / "state" / "runs" / "tiny-sae"
    write_features(sae_dir)
    daemon = start_daemon()

    async def scenario():
        app = MistudioApp(daemon.runtime_dir)
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: app.state.connection.connected, what="the connection")

            # The dashboard's `f`: the SAEs under runs/, then Enter opens the browser.
            await pilot.press("f")
            assert isinstance(app.screen, SaePickerScreen)
            picker = app.screen
            await until(pilot, lambda: picker.query_one(DataTable).row_count == 1,
                        what="the SAE in the picker")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, FeaturesScreen), what="browser")
            browser = app.screen
            assert browser.sae_dir == str(sae_dir)
            await until(pilot, lambda: feature_ids(browser) == [0, 1, 2, 3, 4, 5],
                        what="the features by id")
            assert "tiny-gpt2 · L1 resid_post · 6 features · 1K tokens" in str(
                browser.query_one("#features-sae", Static).render())

            # `s` twice: by density, then by max activation, strongest first.
            await pilot.press("s", "s")
            await until(pilot, lambda: feature_ids(browser) == [3, 0, 5, 1, 4, 2],
                        what="the features by max")
            await pilot.press("S")  # reversed
            await until(pilot, lambda: feature_ids(browser) == [2, 4, 1, 5, 0, 3],
                        what="the features by max, weakest first")

            # A search filters the explanations as it is typed (debounced), in the sort chosen.
            await pilot.press("slash", *"comma")
            assert browser.focused is browser.query_one(Input)
            await until(pilot, lambda: feature_ids(browser) == [2, 0], what="the search")
            # A search by meaning needs `correlate`'s index: the error line says so.
            browser.query_one(Input).value = "~lists"
            await until(pilot, lambda: browser.query_one(RequestError).display,
                        what="the error line")
            assert "correlate" in str(browser.query_one(RequestError).render())
            browser.query_one(Input).value = "comma"
            await until(pilot, lambda: not browser.query_one(RequestError).display
                        and feature_ids(browser) == [2, 0], what="the plain search again")

            # Escape leaves the search box; Enter on the first row opens its card.
            await pilot.press("escape")
            assert isinstance(app.screen, FeaturesScreen)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, FeatureCardScreen), what="card")
            card = app.screen
            assert card.feature_id == 2
            await until(pilot, lambda: card.card is not None, what="the card's data")
            assert "a comma after a clause" in rendered(card.query_one("#card-explanations"))
            assert "rule" not in rendered(card.query_one("#card-explanations"))  # not scored
            top = rendered(card.query_one("#card-top", ExampleList))
            assert " cat sat, dog ran" in top and "1 " in top.splitlines()[0]  # value 1.0

            # Tab to the similar features, Enter jumps to feature 0's card; escape comes back.
            await pilot.press("tab")
            assert card.focused is card.query_one("#card-similar", NeighbourList)
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, FeatureCardScreen)
                        and app.screen.feature_id == 0, what="the similar feature's card")
            similar = app.screen
            await until(pilot, lambda: similar.card is not None, what="its data")
            assert "rule 0.75" in rendered(similar.query_one("#card-explanations"))

            # `e` explains it again with the stats explainer; the card follows the job and
            # reads the feature again when it is done.
            await pilot.press("e")
            await until(pilot, lambda: "explain" in similar.jobs, what="the submitted job")
            job_id = similar.jobs["explain"]
            assert f"job {job_id}" in str(similar.query_one("#card-jobs", Static).render())
            await until(pilot, lambda: app.state.jobs[job_id]["state"] == "succeeded",
                        timeout=120, what="the explain job")
            await until(pilot, lambda: "fires on" in rendered(
                similar.query_one("#card-explanations")), what="the new explanation")
            assert f"explained (job {job_id})" in str(
                similar.query_one("#card-jobs", Static).render())
            job = app.state.jobs[job_id]
            assert job["kind"] == "explain" and job["params"]["features"] == "0"

            await pilot.press("escape")
            assert app.screen is card

    asyncio.run(scenario())
