"""The `mistudio` command line: results, --json documents, exit codes and error hints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mistudiod.cli import main


def _run(capsys, *argv) -> tuple[int, dict]:
    status = main([*argv, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out)


def _train_args(model_dir, corpus, out, *extra) -> list[str]:
    return ["train", "--local", "--model", model_dir, "--hook", "layers.1.resid_post",
            "--corpus", str(corpus), "--out", str(out), "--tokens", "4096",
            "--batch-tokens", "512", "--context-size", "32", "--expansion", "2", "--k", "4",
            "--checkpoint-every", "4", *extra]


def test_train_then_eval(capsys, model_dir, tiny_corpus, tmp_path):
    status, document = _run(capsys, *_train_args(model_dir, tiny_corpus, tmp_path / "sae"))
    assert status == 0 and document["ok"] is True
    assert document["steps"] == 8
    assert 0 < document["final_metrics"]["l0"] <= 4
    status, document = _run(capsys, "eval", "--local", str(tmp_path / "sae"), "--model",
                            model_dir, "--corpus", str(tiny_corpus), "--tokens", "500")
    assert status == 0
    evaluation = document["evaluation"]
    assert evaluation["n_tokens"] >= 500
    assert evaluation["ce_loss_recovered"] is not None
    assert (tmp_path / "sae" / "eval.json").exists()


def test_resume_from_the_command_line(capsys, model_dir, tiny_corpus, tmp_path):
    assert _run(capsys, *_train_args(model_dir, tiny_corpus, tmp_path / "a"))[0] == 0
    status, document = _run(capsys, *_train_args(model_dir, tiny_corpus, tmp_path / "a",
                                                 "--tokens", "8192", "--resume"))
    assert status == 0 and document["steps"] == 16


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"--model": "./missing-model"}, "model_not_found", "does not exist"),
        ({"--corpus": "missing.jsonl"}, "bad_corpus", "does not exist"),
        ({"--hook": "layers.1.resid_middle"}, "bad_input", "unknown hook"),
        ({"--hook": "layers.7.resid_post"}, "bad_input", "layer 7 does not exist"),
        ({"--k": "0"}, "bad_usage", "--k"),
        ({"--tokens": "lots"}, "bad_usage", "--tokens"),
        ({"--device": "cuda:3"}, "bad_input", "cuda"),
        ({"--out": "/proc/no-such-dir/sae"}, "bad_input", "cannot write"),
    ],
)
def test_user_mistakes_exit_2_with_a_hint(capsys, model_dir, tiny_corpus, tmp_path, change,
                                          code, words):
    argv = _train_args(model_dir, tiny_corpus, tmp_path / "x")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    status, document = _run(capsys, *argv)
    assert status == 2
    assert document["ok"] is False
    assert document["error"]["code"] == code
    assert words in document["error"]["message"]
    assert document["error"]["hint"]


def test_job_commands_without_a_daemon_say_how_to_start_one(capsys, model_dir, tiny_corpus,
                                                            tmp_path):
    argv = _train_args(model_dir, tiny_corpus, tmp_path / "x")
    argv.remove("--local")
    status, document = _run(capsys, *argv, "--runtime-dir", str(tmp_path / "no-daemon"))
    assert status == 2 and document["error"]["code"] == "no_daemon"
    assert "mistudiod --background" in document["error"]["hint"]
    assert "--local" in document["error"]["hint"]


def test_check_memory(capsys, model_dir):
    status, document = _run(capsys, "check-memory", model_dir, "--layer", "1", "--local")
    assert status == 0
    assert document["recommended_quantization"] == "none"
    assert document["parameters"]["total"] > 0
    status, document = _run(capsys, "check-memory", model_dir, "--layer", "5", "--local")
    assert status == 2 and "layer" in document["error"]["message"]


def test_unknown_command_is_a_usage_error(capsys):
    status, document = _run(capsys, "frobnicate")
    assert status == 2 and document["error"]["code"] == "bad_usage"


def test_the_installed_entry_point_prints_only_json_on_stdout(model_dir, tiny_corpus, tmp_path):
    argv = _train_args(model_dir, tiny_corpus, tmp_path / "sae", "--eval-tokens", "300")
    completed = subprocess.run(
        [sys.executable, "-m", "mistudiod.cli", *argv, "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["evaluation"]["n_tokens"] >= 300
    assert "training a topk SAE" in completed.stderr  # logs go to stderr
    assert "step 8/8" in completed.stderr  # without a terminal, metrics are plain lines
    human = subprocess.run(
        [sys.executable, "-m", "mistudiod.cli", "eval", "--local", str(tmp_path / "sae"),
         "--model", model_dir, "--corpus", str(tiny_corpus), "--tokens", "300"],
        capture_output=True, text=True, timeout=600,
    )
    assert human.returncode == 0, human.stderr
    assert "FVE" in human.stdout and "CE clean" in human.stdout


def test_paths_sent_to_the_daemon(tmp_path, monkeypatch):
    from mistudiod.remote import input_path, output_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("x")
    for name in ("EleutherAI/pythia-160m", "demo", "uploaded.jsonl"):  # the daemon resolves
        assert input_path(name) == name
    assert input_path("data.txt") == str(tmp_path / "data.txt")
    assert output_path("runs/x") == str(tmp_path / "runs" / "x")


def test_a_missing_local_path_is_named_before_the_daemon_is_asked(capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model", "demo", "--hook", "layers.1.resid_post", "--out", "x",
            "--runtime-dir", str(tmp_path / "no-daemon")]
    status, document = _run(capsys, *argv, "--corpus", "data/missing.jsonl")
    assert status == 2 and document["error"]["code"] == "bad_corpus"
    assert document["error"]["message"] == "corpus data/missing.jsonl does not exist"
    assert document["error"]["field"] == "corpus" and document["error"]["hint"]
    status, document = _run(capsys, "eval", "./no-sae", "--model", "demo", "--corpus", "demo",
                            "--runtime-dir", str(tmp_path / "no-daemon"))
    assert status == 2 and document["error"]["code"] == "bad_sae"
    # names for the daemon to resolve still reach it (here: find no daemon)
    status, document = _run(capsys, *argv, "--corpus", "uploaded.jsonl")
    assert status == 2 and document["error"]["code"] == "no_daemon"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--local", "--detach"], "not allowed with"),
        (["--retries", "11"], "--retries"),
        (["--priority", "-101"], "--priority"),
        (["--hf-token", "hf_x"], "its own Hugging Face token"),
    ],
)
def test_job_options_are_checked_before_anything_runs(capsys, tmp_path, extra, words):
    status, document = _run(capsys, "train", "--model", "demo", "--corpus", "demo", "--hook",
                            "layers.1.resid_post", "--out", str(tmp_path / "x"),
                            "--runtime-dir", str(tmp_path / "no-daemon"), *extra)
    assert status == 2 and document["error"]["code"] == "bad_usage"
    assert words in document["error"]["message"]


def test_check_memory_through_the_daemon_refuses_hf_token_too(capsys, tmp_path):
    status, document = _run(capsys, "check-memory", "demo", "--hf-token", "hf_x",
                            "--runtime-dir", str(tmp_path / "no-daemon"))
    assert status == 2 and "its own Hugging Face token" in document["error"]["message"]


def test_ctrl_c_while_following_leaves_the_job_running(capsys, tmp_path, monkeypatch):
    """One error that says the job runs on and how to reach it; no advice to --resume."""
    import asyncio
    from types import SimpleNamespace

    from mistudiod import remote

    class Client:
        async def request(self, msg_type, content=None, **_):
            return {"job": {"id": 7, "state": "queued"}}

        def subscribe(self, *_):
            pass

        async def next_event(self, timeout=None):
            await asyncio.sleep(60)

    async def interrupted():
        args = SimpleNamespace(priority=0, retries=0, detach=False)
        task = asyncio.create_task(remote.submit_and_wait(Client(), args, "train", {}, None))
        await asyncio.sleep(0.05)
        task.cancel()  # what asyncio.run does on Ctrl-C
        await task

    with pytest.raises(remote.Detached) as caught:
        asyncio.run(interrupted())
    assert caught.value.job_id == 7

    def follow_then_ctrl_c(args, *_):
        raise caught.value

    monkeypatch.setattr(remote, "call", follow_then_ctrl_c)
    argv = ["train", "--model", "demo", "--corpus", "demo", "--hook", "layers.1.resid_post",
            "--out", str(tmp_path / "x")]
    status, document = _run(capsys, *argv)
    assert status == 1 and document["error"]["code"] == "detached" and document["job_id"] == 7
    assert "mistudio job cancel 7" in document["error"]["hint"]
    assert "--resume" not in document["error"]["hint"]

    def ctrl_c_while_submitting(args, *_):
        raise KeyboardInterrupt

    monkeypatch.setattr(remote, "call", ctrl_c_while_submitting)
    status, document = _run(capsys, *argv)
    assert status == 1 and document["error"]["code"] == "interrupted"
    assert "--resume" not in document["error"]["hint"]


@pytest.mark.parametrize(("kind", "unit"), [("eval", "tok"), ("explain", "feature")])
def test_following_a_job_moves_its_bar_in_the_kinds_unit(kind, unit):
    import asyncio

    from mistudiod import remote
    from mistudiod.client import Event

    def state(step, state):
        job = {"id": 3, "kind": kind, "state": state, "step": step, "total_steps": 500}
        return Event("job.3.state", {"job": job}, step, "d", False)

    class Client:
        events = [state(0, "running"), state(200, "running"), state(500, "succeeded")]

        def subscribe(self, *_):
            pass

        async def next_event(self, timeout=None):
            return self.events.pop(0)

    class Progress:
        bar, calls = None, []

        def start(self, description, total, unit):
            self.bar = object()
            self.calls.append(("start", description, total, unit))

        def update(self, position, total=None):
            self.calls.append(("update", position))

    progress = Progress()
    job = asyncio.run(remote.follow(Client(), 3, progress))
    assert job["state"] == "succeeded"
    assert progress.calls == [("start", kind, 500, unit), ("update", 0), ("update", 200),
                              ("update", 500)]


def test_a_refused_corpus_leaves_no_empty_output_directory(capsys, model_dir, tmp_path):
    argv = _train_args(model_dir, tmp_path / "missing.jsonl", tmp_path / "out" / "sae",
                       "--cache", str(tmp_path / "cache"))
    status, document = _run(capsys, *argv)
    assert status == 2 and document["error"]["code"] == "bad_corpus"
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
