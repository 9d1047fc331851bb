"""Snapshots of the monitor and steer screens at 80x24 (pytest-textual-snapshot), from fixed data.

As in tests/test_tui_features_snapshots.py, the app runs without a link and its link's `request`
is a pretend daemon: it answers `feature.sources`, `session.open`, `session.monitor` and
`session.steer` with the documents below, so the screens run their real request code (the model
field filled from the SAE's config, the session opened, the run's reply drawn).
Update the SVGs after an intended change with `pytest tests/test_tui_sessions_snapshots.py
--snapshot-update`, and look at them before committing.
"""

from __future__ import annotations

from test_tui_features_snapshots import SOURCES
from test_tui_snapshots import fill, frozen_clocks  # noqa: F401  (autouse fixture)
from textual.widgets import Input, TextArea

from tui.app import MistudioApp

SAE_DIR = SOURCES[0]["path"]
MODEL = SOURCES[0]["model"]
OPENED = {"session": "5e551011ab", "device": "cuda:0",
          "model": {"model_id": MODEL, "dtype": "bfloat16", "quantization": "none",
                    "bytes": 324_000_000, "load_seconds": 2.1},
          "saes": [{"name": "pythia-l6-topk", "sae_dir": SAE_DIR, "hook": "layers.6.resid_post",
                    "architecture": "topk", "d_in": 768, "d_sae": 12288, "context_size": 128,
                    "features": True}],
          "max_tokens": 128}
SAE = OPENED["saes"][0]["name"]
EXPLANATIONS = {7: 'fires on " return" (62%), " yield" (21%) after "\\n"',
                41: 'fires on " cat" (80%), " dog" (12%)', 88: "fires on commas in lists",
                1204: None, 9: 'fires on " import" (97%)', 303: 'fires on " the" after " on"'}
# The text read: each token with its features, strongest first.
READ = [("The", {303: 2.1, 1204: 0.9}), (" cat", {41: 6.8, 88: 0.4, 1204: 0.3}),
        (" sat", {41: 2.2, 1204: 1.1}), (" on", {303: 1.7}), (" the", {303: 4.9, 41: 0.6}),
        (" mat", {41: 3.9, 1204: 0.8}), (",", {88: 5.5}), (" and", {88: 2.4, 1204: 0.7}),
        (" the", {303: 1.2}), (" dog", {41: 7.4, 88: 0.2}), (" ran", {41: 1.3}),
        (" off", {1204: 0.5}), (".", {88: 0.9})]
STEERED_TOKENS = [" cat", " cat", " purred", " and", " the", " cat", " slept", "."]
BASELINE_TOKENS = [" dog", " barked", " at", " the", " door", " and", " ran", "."]


def token(position: int, text: str, features: dict[int, float]) -> dict:
    return {"position": position, "token": text, "token_id": 100 + position, "generated": False,
            "features": {SAE: [{"id": feature, "activation": value,
                                "explanation": EXPLANATIONS[feature]}
                               for feature, value in features.items()]}}


def monitor(content: dict) -> dict:
    return {"run": 1, "mode": "read", "tokens": [token(i + 1, text, features)
                                                 for i, (text, features) in enumerate(READ)],
            "text": None, "stopped": None, "cancelled": False}


def side(tokens: list[str], activations: list[float]) -> dict:
    return {"text": "".join(tokens), "token_ids": list(range(len(tokens))), "tokens": tokens,
            "activations": [[value] for value in activations], "stopped_at_eos": False}


def steer(content: dict) -> dict:
    steering = content["steerings"][0]
    return {"run": 1, "prompt": content["prompt"], "prompt_tokens": 6,
            "steerings": [{"label": str(steering["feature"]), "sae": SAE,
                           "hook": "layers.6.resid_post", **steering, "from_prompt_end": False,
                           "a_max": 7.4, "a_max_source": "find"}],
            "features": [str(steering["feature"])],
            "baseline": side(BASELINE_TOKENS, [0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.2, 0.0]),
            "steered": side(STEERED_TOKENS, [6.1, 7.0, 3.2, 0.4, 0.3, 6.6, 1.1, 0.2]),
            "seed": 0, "temperature": 1.0, "top_k": None, "cancelled": False,
            "mean_activation": {"baseline": [0.0375], "steered": [3.1125]}}


ANSWERS = {
    "feature.sources": lambda _: {"saes": SOURCES},
    "session.open": lambda _: OPENED,
    "session.monitor": monitor,
    "session.steer": steer,
    "session.close": lambda _: {"closed": True},
}


def snapshot(snap_compare, steps) -> bool:
    """The app after `steps(app, pilot)` (async), its requests answered, its workers done."""
    app = MistudioApp(connect=False)

    async def request(msg_type: str, content: dict | None = None, **_) -> dict:
        return {"ok": True, **ANSWERS[msg_type](content or {})}

    async def before(pilot):
        fill(app)
        app.link.request = request
        await steps(app, pilot)
        await pilot.pause()
        await app.workers.wait_for_complete()
        for field in app.screen.query(Input):  # a blinking cursor is drawn or not by the clock
            field.cursor_blink = False
        for area in app.screen.query(TextArea):
            area.cursor_blink = False
        await pilot.pause(0.3)

    return snap_compare(app, terminal_size=(80, 24), run_before=before)


def test_monitor_after_a_read(snap_compare):
    """The tokens shaded by the strongest feature of the first one, the cursor moved to
    " cat" and its features listed."""
    assert snapshot(snap_compare, _read_then("tab", "tab", "right"))


def test_monitor_shaded_by_a_chosen_feature(snap_compare):
    """Enter on feature 41 in the list: the animals light up."""
    assert snapshot(snap_compare, _read_then("tab", "tab", "right", "tab", "enter"))


def _read_then(*keys: str):
    """Steps: the monitor screen reads the text, then these keys are pressed."""
    async def steps(app, pilot):
        app.open_monitor(SAE_DIR)
        await pilot.pause()
        await app.workers.wait_for_complete()
        app.screen.query_one(TextArea).text = "".join(text for text, _ in READ)
        await pilot.press("ctrl+r")
        await app.workers.wait_for_complete()
        await pilot.press(*keys)
        await app.workers.wait_for_complete()

    return steps


def test_steer_after_a_run(snap_compare):
    async def steps(app, pilot):
        app.open_steer(SAE_DIR, 41)
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.press(*"The old farmer saw the")
        await pilot.press("ctrl+r")

    assert snapshot(snap_compare, steps)
