"""The TUI's monitor and steer screens against a real daemon and its model host.

The pure parts first (laying tokens out in lines, naming an SAE's directory, the summary and
ending lines), then the screens driven as a person would: a tiny 3-layer GPT-2 and a random TopK
SAE with a hand-written feature store (statistics and explanations, so the SAE has cards), the
monitor opened from the features browser, the steer screen from a feature's card. What the
screens show is checked against the daemon's own replies to the same requests, made on a
session of the test's own.
"""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import test_tui_sessions_snapshots as pretend
from conftest import tiny_config
from daemon_process import DaemonProcess
from test_tui import until
from test_tui_features import rendered
from test_tui_snapshots import job
from textual.widgets import Input, TextArea

from mistudio_core.feature_store import FeatureStore
from mistudio_core.sae import SAEConfig, SAEMetadata, SparseAutoencoder, save_sae
from tui.app import MistudioApp
from tui.screens.feature_card import FeatureCardScreen
from tui.screens.monitor import TOP, MonitorScreen, summary_text
from tui.screens.sae_picker import SaePickerScreen
from tui.screens.session_screen import same_directory
from tui.screens.steer import SteerScreen, ending, means_text
from tui.widgets.feature_hits import FeatureHits, FeatureRef
from tui.widgets.request_error import RequestError
from tui.widgets.steering_rows import SteeringRow, StrengthInput
from tui.widgets.token_view import TokenView, token_lines

pytestmark = pytest.mark.slow
SIZE = (100, 36)
D_SAE = 64
POSITIONS = 1024  # room for a generation long enough to cancel half-way
TEXT = "The cat watched the blue window"
EXPLAINED = {f: f"explains {f}" for f in range(0, D_SAE, 2)}  # short: one line in the list


# ----- the pure parts ------------------------------------------------------------------------

def test_tokens_are_laid_out_whole_in_lines():
    assert token_lines([3, 4, 2, 5], 8) == [[0, 1], [2, 3]]
    assert token_lines([3, 12, 1], 8) == [[0], [1], [2]]  # too wide: a line of its own
    assert token_lines([], 8) == [[]]


def test_an_sae_directory_is_named_absolute_or_under_runs():
    assert same_directory("/srv/state/runs/tiny/", "/srv/state/runs/tiny")
    assert same_directory("/srv/state/runs/tiny", "tiny")
    assert not same_directory("/srv/state/runs/tiny-2", "tiny")


def test_the_monitor_summary_says_what_was_read_and_what_shades_it():
    tokens = [{"generated": False}] * 3 + [{"generated": True}] * 2
    reply = {"mode": "generate", "stopped": "length"}
    assert summary_text(tokens, reply, False, "feature 7", 2.5) == (
        "3 tokens read, 2 generated (length) · feature 7 peaks at 2.5")
    assert summary_text(tokens, reply, True, "feature 7", 2.5) == "generating… 2 tokens"
    assert summary_text(tokens[:3], {"mode": "read"}, False, "feature 7", 0.0) == (
        "3 tokens read · feature 7 does not fire on these tokens")


def test_the_steer_panes_say_how_each_side_ended_and_its_mean_activations():
    reply = {"cancelled": False, "features": ["5", "9"],
             "mean_activation": {"baseline": [0.125, None], "steered": [3.0, 0.0]}}
    assert ending({"tokens": ["a"] * 4, "stopped_at_eos": True}, reply) == (
        "4 tokens, then end of text")
    assert ending({"tokens": ["a"] * 4}, {**reply, "cancelled": True}) == (
        "cancelled after 4 tokens")
    assert means_text(reply, "baseline").plain == "mean activation · 5: 0.125 · 9: -"


# ----- opening the screens, against a pretend daemon ------------------------------------------

def test_the_palette_and_the_sae_picker_open_the_monitor_and_the_steer_screens():
    async def request(msg_type: str, content: dict | None = None, **_) -> dict:
        return {"ok": True, **pretend.ANSWERS[msg_type](content or {})}

    async def scenario():
        app = MistudioApp(connect=False)
        async with app.run_test(size=(80, 24)) as pilot:
            app.link.request = request
            app.state.replace_jobs([job(2, "succeeded", result={"path": pretend.SAE_DIR})])
            commands = {command.title: command.callback
                        for command in app.get_system_commands(app.screen)}
            assert {f"Monitor features of {pretend.SAE_DIR}",
                    f"Steer with {pretend.SAE_DIR}"} <= set(commands)
            for title, screen_type in (("Monitor features", MonitorScreen),
                                       ("Steer generation", SteerScreen)):
                commands[title]()  # the list of SAEs, then Enter on the newest
                await until(pilot, lambda: isinstance(app.screen, SaePickerScreen)
                            and app.screen.saes, what="the SAEs")
                await pilot.press("enter")
                assert isinstance(app.screen, screen_type)
                assert app.screen.sae_dir == pretend.SAE_DIR
                assert app.screen.query_one("#model", Input).value == pretend.MODEL
                await pilot.press("escape", "escape")

    asyncio.run(scenario())


# ----- against a daemon ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """The tiny GPT-2 of the other TUI tests with `POSITIONS` positions, and a tokenizer without
    an end-of-text token, so that a generation runs as long as it is asked to."""
    import torch
    from transformers import GPT2LMHeadModel

    config = tiny_config("gpt2", 3, tiny_tokenizer)
    config.n_positions = POSITIONS
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("gpt2-long")
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(directory)
    return str(directory)


def save_sae_dir(directory, model_dir: str, with_cards: bool) -> str:
    """A random TopK SAE on layer 1; `with_cards`: a feature store as `find` and `explain`
    leave it (statistics and explanations), so its features have cards."""
    import torch

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig("topk", 32, D_SAE, k=8))
    metadata = SAEMetadata(model_name=model_dir, hook_name="layers.1.resid_post",
                           context_size=POSITIONS)
    path = str(save_sae(sae, directory, metadata, {}))
    if with_cards:
        store = FeatureStore.create(path, {"d_sae": D_SAE, "model_id": model_dir,
                                           "hook": "layers.1.resid_post"})
        fired = np.full(D_SAE, 10)
        store.write_statistics(fired, np.full(D_SAE, 5.0), fired * 2.0, n_tokens=1000)
        store.save_explanations("stats", [(f, text, {}) for f, text in EXPLAINED.items()])
        store.close()
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the module: its model host (and torch in it) starts once."""
    process = DaemonProcess(tmp_path_factory.mktemp("daemon")).start()
    yield process
    process.close()


@pytest.fixture(scope="module")
def sae_dir(daemon, model_dir) -> str:
    return save_sae_dir(daemon.state_dir / "runs" / "tiny-sae", model_dir, with_cards=True)


@pytest.fixture(scope="module")
def plain_sae_dir(daemon, model_dir) -> str:
    return save_sae_dir(daemon.state_dir / "runs" / "plain-sae", model_dir, with_cards=False)


def reference(daemon, model_dir: str, sae_dir: str, msg_type: str, content: dict) -> dict:
    """The daemon's reply to a request on a session of the test's own (closed again)."""
    session = daemon.request("session.open", {"model": model_dir, "sae_dirs": [sae_dir]},
                             timeout=120)["session"]
    try:
        return daemon.request(msg_type, {**content, "session": session}, timeout=120)
    finally:
        daemon.request("session.close", {"session": session})


def scenario(daemon, steps) -> None:
    """Run `steps(app, pilot)` in the app connected to the daemon."""
    async def run():
        app = MistudioApp(daemon.runtime_dir)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: app.state.connection.connected, what="the connection")
            await steps(app, pilot)

    asyncio.run(run())


async def opened(pilot, screen) -> None:
    await until(pilot, lambda: screen.session.opened is not None, timeout=120,
                what="the session")


def error_text(screen) -> str:
    error = screen.query_one(RequestError)
    return str(error.render()) if error.display else ""


async def run_and_wait(pilot, screen) -> None:
    """ctrl+r, then until the run has left a new reply or error (a quick run may start and end
    between two looks)."""
    reply, error = screen.reply, error_text(screen)
    await pilot.press("ctrl+r")
    await until(pilot, lambda: not screen.running and (
        screen.reply is not reply or error_text(screen) != error), timeout=120,
        what="the run's end")


async def closed(pilot, daemon) -> None:
    """Until the daemon has no session left open."""
    async def sessions():
        return (await asyncio.to_thread(daemon.request, "session.list"))["sessions"]

    deadline = asyncio.get_running_loop().time() + 30
    while await sessions():
        assert asyncio.get_running_loop().time() < deadline, "a session was left open"
        await pilot.pause(0.1)


def hit_ids(token: dict) -> list[FeatureRef]:
    return [FeatureRef(sae, hit["id"]) for sae, hits in token["features"].items()
            for hit in hits]


def test_monitor_reads_a_text_shades_it_and_opens_a_card(daemon, model_dir, sae_dir):
    expected = reference(daemon, model_dir, sae_dir, "session.monitor",
                         {"text": TEXT, "top": TOP})["tokens"]

    async def steps(app, pilot):
        # `m` on the features browser: the model comes from the features' record.
        app.open_features(sae_dir)
        await until(pilot, lambda: app.screen.meta, what="the features")
        await pilot.press("m")
        assert isinstance(app.screen, MonitorScreen)
        screen = app.screen
        assert screen.query_one("#model", Input).value == model_dir
        await opened(pilot, screen)
        screen.query_one(TextArea).text = TEXT
        await run_and_wait(pilot, screen)
        assert not screen.query_one(RequestError).display

        # Every token, shaded by the strongest feature of the first one.
        view = screen.query_one(TokenView)
        assert [token.text for token in view.tokens] == [t["token"] for t in expected]
        strongest = hit_ids(expected[0])[0]
        assert screen.shading == strongest
        assert [token.activation for token in view.tokens] == [
            next((hit["activation"] for hit in t["features"]["tiny-sae"]
                  if hit["id"] == strongest.id), 0.0) for t in expected]

        # The cursor moves over the tokens; the list shows its token's features, as the
        # daemon reports them.
        view.focus()
        await pilot.press("right", "right")
        hits = screen.query_one(FeatureHits)
        await until(pilot, lambda: hits.refs == hit_ids(expected[2]), what="token 2's features")
        listed = rendered(hits)
        for hit in expected[2]["features"]["tiny-sae"]:
            assert (hit["explanation"] or "not explained") in listed

        # Enter on the second feature shades the text by it instead.
        await pilot.press("tab", "down", "enter")
        chosen = hit_ids(expected[2])[1]
        assert screen.shading == chosen
        assert view.tokens[2].activation == expected[2]["features"]["tiny-sae"][1]["activation"]
        # ... and reads the text again watching it, for its activation on every token.
        await until(pilot, lambda: screen.reply and not screen.running and [
            hit["id"] for hit in screen.reply["tokens"][0]["watched"].get("tiny-sae", [])] == [
            chosen.id], what="the chosen feature watched")
        assert [token.activation for token in view.tokens] == [
            t["watched"]["tiny-sae"][0]["activation"] for t in screen.reply["tokens"]]
        assert screen.query_one(TokenView).cursor == 2  # where it was

        # `o` opens its card; escape comes back.
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, FeatureCardScreen), what="the card")
        assert (app.screen.sae_dir, app.screen.feature_id) == (sae_dir, chosen.id)
        await pilot.press("escape")
        assert app.screen is screen

        # Leaving the screen closes its session.
        await pilot.press("escape")
        assert not isinstance(app.screen, MonitorScreen)
        await closed(pilot, daemon)

    scenario(daemon, steps)


def generated(screen: MonitorScreen) -> int:
    return sum(token.generated for token in screen.query_one(TokenView).tokens)


def test_monitor_streams_a_generation_cancels_it_and_runs_again(daemon, model_dir,
                                                                 plain_sae_dir):
    async def steps(app, pilot):
        # As the palette's "Monitor features of ...": the model is read from the SAE's config.
        app.open_monitor(plain_sae_dir)
        await pilot.pause()
        screen = app.screen
        notes = []
        screen.notify = lambda message, **options: notes.append((options.get("title"), message))
        await until(pilot, lambda: screen.query_one("#model", Input).value == model_dir,
                    what="the model of the SAE")
        await opened(pilot, screen)
        screen.query_one(TextArea).text = TEXT
        screen.query_one("#new-tokens", Input).value = "700"

        # The generated tokens appear while the run goes; ctrl+g stops it.
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.running and generated(screen) >= 3,
                    what="streamed tokens")
        await pilot.press("ctrl+g")
        await until(pilot, lambda: not screen.running, what="the cancelled run's end")
        reply = screen.reply
        assert reply["cancelled"] and reply["stopped"] == "cancelled"
        assert 3 <= generated(screen) < 700
        assert [t.text for t in screen.query_one(TokenView).tokens] == [
            t["token"] for t in reply["tokens"]]
        assert "cancelled" in str(screen.query_one("#monitor-summary").render())

        # ctrl+r while a run goes cancels it and runs anew, rather than being refused as busy.
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.running and generated(screen) >= 3,
                    what="streamed tokens")
        first = screen.session.last_run + 1
        screen.query_one("#new-tokens", Input).value = "0"
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.reply is not None, what="the read")
        assert not screen.query_one(RequestError).display
        assert screen.reply["mode"] == "read" and screen.reply["run"] == first + 1
        assert generated(screen) == 0

        # This SAE has no cards: `o` (on the text) says how to make them.
        screen.query_one(TokenView).focus()
        await pilot.press("o")
        assert notes and "no feature cards" in notes[-1][0]
        assert isinstance(app.screen, MonitorScreen)

    scenario(daemon, steps)


def pane_text(screen: SteerScreen, side: str) -> str:
    return str(screen.query_one(f"#{side}-text").render())


def test_steer_from_a_card_refuses_a_bad_feature_and_runs_side_by_side(daemon, model_dir,
                                                                       sae_dir):
    steering = {"feature": 4, "strength": 4.0, "mode": "add"}
    request = {"prompt": TEXT, "steerings": [steering], "max_new_tokens": 12, "seed": 5,
               "temperature": 1.0}
    expected = reference(daemon, model_dir, sae_dir, "session.steer", request)

    async def steps(app, pilot):
        # `S` on feature 4's card: the feature is the first steering.
        app.open_feature(sae_dir, 4)
        await pilot.pause()
        await pilot.press("S")
        assert isinstance(app.screen, SteerScreen)
        screen = app.screen
        row = screen.query_one(SteeringRow)
        feature, strength = row.fields()
        assert row.steering() == steering
        await opened(pilot, screen)
        screen.query_one("#prompt", Input).value = TEXT
        screen.query_one("#max_new_tokens", Input).value = "12"
        screen.query_one("#seed", Input).value = "5"

        # A feature the SAE does not have: the daemon's message and hint, the field marked.
        feature.value = str(D_SAE)
        await run_and_wait(pilot, screen)
        error = str(screen.query_one(RequestError).render())
        assert f"feature {D_SAE} does not exist" in error
        assert f"hint: pick a feature from 0 to {D_SAE - 1}" in error
        assert feature.has_class("-daemon-invalid")

        # Corrected, it runs: both sides as the daemon generates them for the same seed.
        feature.value = "4"
        await pilot.pause()
        assert not feature.has_class("-daemon-invalid")
        await run_and_wait(pilot, screen)
        assert not screen.query_one(RequestError).display
        for side in ("baseline", "steered"):
            assert pane_text(screen, side) == TEXT + expected[side]["text"]
            assert str(screen.query_one(f"#{side}-means").render()) == (
                means_text(expected, side).plain)
        assert expected["baseline"]["text"] != expected["steered"]["text"]

        # A long run streams into both panes; ctrl+g stops it.
        screen.query_one("#max_new_tokens", Input).value = "700"
        await pilot.press("ctrl+r")
        await until(pilot, lambda: screen.running and len(screen.streamed["steered"]) >= 3,
                    what="streamed tokens")
        assert pane_text(screen, "steered").startswith(TEXT)
        await pilot.press("ctrl+g")
        await until(pilot, lambda: not screen.running, what="the cancelled run's end")
        assert screen.reply["cancelled"]
        assert screen.query_one("#steered-pane").border_subtitle.startswith("cancelled after")

        # ctrl+n adds a row, up and down nudge its strength, ctrl+d removes it.
        await pilot.press("ctrl+n")
        await pilot.pause()
        rows = list(screen.query(SteeringRow))
        assert len(rows) == 2 and screen.focused is rows[1].fields()[0]
        await pilot.press("9", "tab", "up", "up", "down")
        assert isinstance(screen.focused, StrengthInput)
        assert rows[1].steering() == {"feature": 9, "strength": 4.5, "mode": "add"}
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert list(screen.query(SteeringRow)) == [row]

        # Leaving the screen closes its session.
        await pilot.press("escape", "escape")
        await closed(pilot, daemon)

    scenario(daemon, steps)
