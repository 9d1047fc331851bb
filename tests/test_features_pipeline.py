"""find -> explain -> score -> correlate end to end, in this process (`--local`) and through a
real daemon, then what they stored as `mistudio features` / `mistudio feature` and the daemon's
`feature.*` operations show it, and the mistakes people make on the way.

One tiny SAE is trained once for the module (on the tiny GPT-2 of `model_dir`); each pipeline
works on a copy of it, so the two never see each other's features.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from mistudio_core.errors import MistudioError
from mistudio_core.feature_store import SORTS
from mistudiod.cli import main
from mistudiod.jobs import validate_params
from mistudiod.operations import OPERATIONS
from mistudiod.queue import JobQueue
from mistudiod.workers import RunningJob, Settings, WorkerPool

D_SAE = 128  # the tiny model's 32 dimensions, expansion 4
TEXT = "The cat watched the blue window before the rain started."


def _run(capsys, *argv: str) -> tuple[int, dict]:
    status = main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def _text(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir, tiny_corpus):
    """A tiny SAE with no features yet (16 steps of 512 tokens)."""
    out = tmp_path_factory.mktemp("trained") / "sae"
    with contextlib.redirect_stdout(io.StringIO()):
        status = main(["train", "--local", "--model", model_dir, "--hook", "layers.1.resid_post",
                       "--corpus", str(tiny_corpus), "--out", str(out), "--tokens", "8192",
                       "--batch-tokens", "512", "--context-size", "32", "--expansion", "4",
                       "--k", "8", "--json"])
    assert status == 0
    return out


def _copy(trained, destination) -> str:
    shutil.copytree(trained, destination)
    return str(destination)


def _find_args(model_dir, tiny_corpus) -> list[str]:
    return ["--model", model_dir, "--corpus", str(tiny_corpus), "--tokens", "5000", "--top",
            "5", "--radius", "4"]


# ----- in this process -------------------------------------------------------------------------


def test_the_local_pipeline_and_what_it_stored(capsys, trained, model_dir, tiny_corpus,
                                               tmp_path):
    sae = _copy(trained, tmp_path / "sae")
    status, found = _run(capsys, "find", "--local", sae, *_find_args(model_dir, tiny_corpus))
    assert status == 0, found
    assert found["path"] == sae and "tokens read" in found["summary"]
    status, explained = _run(capsys, "explain", "--local", sae)
    assert status == 0 and explained["explainer"] == "stats" and explained["new"] > 0
    status, again = _run(capsys, "explain", "--local", sae, "--features", "0-9")
    assert status == 0 and again["new"] == 0  # explained already: skipped
    status, scored = _run(capsys, "score", "--local", sae)
    assert status == 0 and scored["scorer"] == "rule" and scored["new"] > 0
    status, correlated = _run(capsys, "correlate", "--local", sae, "--text", TEXT, "--model",
                              model_dir)
    assert status == 0 and correlated["explanations_indexed"] == explained["explained"]
    assert correlated["features_on_text"]["tokens"] and "on the text" in correlated["summary"]

    status, listing = _run(capsys, "features", sae, "--sort", "score", "--limit", "200")
    assert status == 0 and listing["d_sae"] == D_SAE and listing["total"] == D_SAE
    scores = [row["score"] for row in listing["features"] if row["score"] is not None]
    assert scores and scores == sorted(scores, reverse=True)
    assert all(row["explanation"] for row in listing["features"] if row["n_fired"])

    status, densest = _run(capsys, "features", sae, "--sort", "density", "--limit", "1")
    assert status == 0 and len(densest["features"]) == 1
    best = densest["features"][0]
    assert best["density"] == max(row["density"] for row in listing["features"])
    status, shown = _run(capsys, "feature", sae, str(best["id"]))
    card = shown["feature"]
    assert status == 0 and card["id"] == best["id"] and card["d_sae"] == D_SAE
    assert 1 <= len(card["top"]) <= 5 and len(card["top"][0]["tokens"]) == 9  # 2 * radius + 1
    assert max(card["top"][0]["acts"]) > 0
    assert card["explanations"][0]["explainer"] == "stats"
    assert [s["scorer"] for s in card["scores"]] == ["rule"]
    assert len(card["similar"]) == 10 and sum(card["histogram"]["counts"]) > 0
    status, zero = _run(capsys, "feature", sae, "0")
    assert status == 0 and zero["feature"]["id"] == 0

    word = best["explanation"].split('"')[1]  # the stats explanation quotes the tokens
    status, searched = _run(capsys, "features", sae, "--search", word)
    assert status == 0 and best["id"] in [row["id"] for row in searched["features"]]
    assert all(word.lower() in (row["explanation"] or "").lower() or str(row["id"]) == word.strip()
               for row in searched["features"])  # a number matches that feature's id too
    status, semantic = _run(capsys, "features", sae, "--semantic", best["explanation"])
    assert status == 0 and semantic["results"][0]["explanation"] == best["explanation"]
    assert semantic["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)

    table = _text(capsys, "features", sae, "--sort", "density", "--limit", "3")
    assert "EXPLANATION" in table.splitlines()[0] and best["explanation"] in table
    assert f"1-3 of {D_SAE} features" in table
    text = _text(capsys, "feature", sae, str(best["id"]))
    assert text.startswith(f"feature {best['id']} of {D_SAE}: fires on")
    for piece in ("top examples:", "«", "»", "activation histogram:", "#", "promoted tokens:",
                  "similar features (decoder cosine):", "co-occurring features (Jaccard):",
                  "scores:\n  rule of stats: "):
        assert piece in text, piece
    assert "on the text" in _text(capsys, "correlate", "--local", sae, "--text", TEXT,
                                  "--model", model_dir)


def test_local_mistakes_exit_2_with_a_hint(capsys, trained, model_dir, tiny_corpus, tmp_path):
    sae = _copy(trained, tmp_path / "sae")
    status, document = _run(capsys, "find", "--local", sae, "--model", model_dir, "--corpus",
                            str(tmp_path / "missing.txt"))
    assert status == 2 and document["error"]["code"] == "bad_corpus"
    assert document["error"]["hint"]
    for argv in (["explain", "--local", sae], ["features", sae], ["feature", sae, "0"]):
        status, document = _run(capsys, *argv)
        assert status == 2 and document["error"]["code"] == "not_found", argv
        assert "mistudio find" in document["error"]["hint"]
    status, document = _run(capsys, "score", "--local", sae, "--scorer", "detection")
    assert status == 2 and document["error"]["field"] == "llm"


# ----- through the daemon ----------------------------------------------------------------------


@pytest.mark.slow  # four worker processes, each importing torch
def test_the_pipeline_through_the_daemon(capsys, start_daemon, trained, model_dir, tiny_corpus):
    daemon = start_daemon("--max-jobs", "2")
    runs = daemon.state_dir / "runs"
    sae = _copy(trained, runs / "tiny")  # named by its place under runs/
    _copy(trained, runs / "group" / "raw")  # two levels down, with no features

    def cli(*argv: str) -> tuple[int, dict]:
        return _run(capsys, *argv, "--runtime-dir", str(daemon.runtime_dir))

    def refused(msg_type: str, content: dict) -> MistudioError:
        with pytest.raises(MistudioError) as caught:
            daemon.request(msg_type, content)
        assert daemon.request("daemon.health")["healthy"]  # and the daemon goes on
        return caught.value

    error = refused("job.submit", {"kind": "explain", "params": {"sae_dir": "tiny"}})
    assert (error.code, error.field) == ("not_found", "sae_dir") and "mistudio find" in error.hint
    error = refused("job.submit", {"kind": "find", "params": {
        "sae_dir": "nowhere", "model": model_dir, "corpus": str(tiny_corpus)}})
    assert (error.code, error.field) == ("bad_sae", "sae_dir")
    error = refused("feature.list", {"sae_dir": "tiny"})
    assert error.code == "not_found" and "mistudio find" in error.hint

    # a pipeline submitted at once: with two slots, each job still waits for the one before it
    # on the same SAE (explain needs find's features, score and correlate the explanations)
    queued = [cli(*argv, "--detach")[1]["job"]["id"] for argv in (
        ("find", "tiny", *_find_args(model_dir, tiny_corpus)), ("explain", "tiny"),
        ("score", "tiny"), ("correlate", "tiny"))]
    jobs = [daemon.wait_for_job(job_id, timeout=120) for job_id in queued]
    assert [job["state"] for job in jobs] == ["succeeded"] * 4, [job["error"] for job in jobs]
    assert jobs[0]["result"]["path"] == sae
    assert [job["total_steps"] > 0 for job in jobs] == [True] * 4  # they reported progress
    starts = [job["started_at"] for job in jobs]
    ends = [job["finished_at"] for job in jobs]
    assert all(ends[i] <= starts[i + 1] for i in range(3)), (starts, ends)
    status, result = cli("job", "result", str(queued[2]))
    assert status == 0 and result["result"]["scorer"] == "rule"

    listing = daemon.request("feature.list", {"sae_dir": "tiny", "sort": "density", "limit": 5})
    assert listing["total"] == D_SAE and len(listing["features"]) == 5
    densities = [row["density"] for row in listing["features"]]
    assert densities == sorted(densities, reverse=True)
    best = listing["features"][0]
    assert best["explainer"] == "stats" and best["score"] is not None
    card = daemon.request("feature.show", {"sae_dir": sae, "id": best["id"]})["feature"]
    assert card["top"] and card["explanations"] and card["similar"]
    results = daemon.request("feature.search", {"sae_dir": "tiny", "query": best["explanation"],
                                                "limit": 3})["results"]
    assert len(results) == 3 and results[0]["explanation"] == best["explanation"]
    saes = daemon.request("feature.sources")["saes"]
    by_path = {source["path"]: source for source in saes}
    assert set(by_path) == {sae, str(runs / "group" / "raw")}
    assert by_path[sae]["has_features"] and by_path[sae]["n_explained"] > 0
    assert by_path[sae]["d_sae"] == D_SAE and by_path[sae]["hook"] == "layers.1.resid_post"
    assert not by_path[str(runs / "group" / "raw")]["has_features"]

    error = refused("feature.show", {"sae_dir": "tiny", "id": D_SAE})
    assert (error.code, error.field) == ("not_found", "id")
    error = refused("feature.show", {"sae_dir": "group/raw", "id": 0})
    assert error.code == "not_found" and "mistudio find" in error.hint
    error = refused("feature.list", {"sae_dir": "../escape"})
    assert error.field == "sae_dir"
    error = refused("job.submit", {"kind": "explain", "params": {"sae_dir": "tiny",
                                                                 "features": "5-500"}})
    assert error.field == "features"


# ----- the parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "params", "field"), [
    ("score", {"sae_dir": "s", "scorer": "simulation"}, "llm"),
    ("score", {"sae_dir": "s", "scorer": "guess"}, "scorer"),
    ("score", {"sae_dir": "s", "llm": "gpt"}, "llm"),
    ("explain", {"sae_dir": "s", "explainer": "magic"}, "explainer"),
    ("explain", {"sae_dir": "s", "features": "1-x"}, "features"),
    ("correlate", {"sae_dir": "s", "text": "hello"}, "model"),
    ("find", {"sae_dir": "s", "model": "m", "corpus": "c", "top": 0}, "top"),
])
def test_feature_job_parameters_name_the_field_at_fault(kind, params, field):
    with pytest.raises(MistudioError) as caught:
        validate_params(kind, params)
    assert caught.value.field == field


def test_feature_job_parameters_get_their_defaults():
    assert validate_params("score", {"sae_dir": "s", "scorer": "fuzzing",
                                     "llm": "openai:http://localhost:8000/v1#m"})["explainer"] \
        == "stats"
    find = validate_params("find", {"sae_dir": "s", "model": "m", "corpus": "c"})
    assert (find["tokens"], find["top"], find["radius"]) == (1_000_000, 20, 12)
    correlate = validate_params("correlate", {"sae_dir": "s"})
    assert (correlate["neighbours"], correlate["embedder"], correlate["model"]) == (
        10, "hashing", None)
    assert set(OPERATIONS["feature.list"].schema.fields["sort"].choices) == set(SORTS)


class _Process:
    pid = 4242
    returncode = None


def test_find_progress_moves_the_job_and_measures_its_throughput(tmp_path, monkeypatch):
    queue = JobQueue(tmp_path / "q.db")
    pool = WorkerPool(queue, lambda topic, content: None, lambda: {}, "k" * 40, "ipc://x",
                      tmp_path, Settings())
    queue.submit("find", {"device": "cpu"}, "u")
    job = queue.claim(60)
    pool.running[job.id] = RunningJob(job, _Process(), tmp_path / "log")
    clock = iter([10.0, 12.0])
    monkeypatch.setattr("mistudiod.workers.time.monotonic", lambda: next(clock))

    def report(kind: str, payload: dict) -> None:
        pool.on_report({"job_id": job.id, "attempt": job.attempt, "kind": kind,
                        "payload": payload})

    report("start", {"total": 5000, "unit": "tok", "description": "finding features"})
    report("progress", {"done": 1000, "total": 5000})
    report("progress", {"done": 3000, "total": 5000})
    stored = queue.get(job.id)
    assert (stored.step, stored.total_steps, stored.progress) == (3000, 5000, 0.6)
    assert pool.throughputs() == {job.id: 1000.0}  # 2000 tokens in 2 s
    queue.close()
