"""Data-parallel training on torch.distributed, for real: `torchrun` starts two CPU processes
(the `gloo` backend) on the tiny GPT-2. Their SAE equals the one a single process trains on the
same data (the two ranks' batches side by side, as one batch), and a run resumes on another
number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from daemon_process import free_port, train_params
from safetensors.torch import load_file

from mistudio_core.activations import ExtractionConfig, ModelActivationSource, ShuffledBatches
from mistudio_core.corpus import Corpus
from mistudio_core.distributed import DataParallel
from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.runs import TrainJob, _block_chunks
from mistudio_core.sae import SAEConfig, SAEMetadata, save_sae
from mistudio_core.train import TrainConfig, Trainer, train_together

HOOK = "layers.1.resid_post"
BATCH = 512  # global: 256 rows a rank
EXPANSION = 32  # 1024 latents: some die within the run, so AuxK is compared too
# A dead window of two steps: AuxK runs from the third step on, so it is compared too (its loss
# is per token over the global batch's variance, like the FVU).
TRAIN = dict(batch_tokens=BATCH, log_every=2, checkpoint_every=3, warmup_steps=2, seed=0,
             dead_after_tokens=2 * BATCH)
EXTRACTION = dict(context_size=32, batch_windows=4)


@pytest.fixture(scope="module")
def gpt2_dir(make_tiny_model):
    return make_tiny_model("gpt2", n_layers=3)


def _job(model_dir, corpus, out, steps: int, resume: bool = False) -> TrainJob:
    return TrainJob(model=ModelSpec(str(model_dir), device="cpu"), hook=HOOK, corpus=str(corpus),
                    out=str(out), architecture="topk", k=4, expansion=EXPANSION,
                    extraction=ExtractionConfig(**EXTRACTION),
                    train=TrainConfig(total_tokens=steps * BATCH, **TRAIN), resume=resume)


def _torchrun(tmp_path, model_dir, corpus, out, steps: int, processes: int = 2,
              resume: bool = False) -> None:
    """`torchrun --nproc-per-node N` on a script that calls `train_sae` (as the CLI does)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_distributed import _job
        from mistudio_core.runs import train_sae
        result = train_sae(_job({str(model_dir)!r}, {str(corpus)!r}, {str(out)!r}, {steps},
                                {resume}))
        print(json.dumps({{"steps": result.steps}}))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
         f"--master-port={free_port()}", str(script)],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


class _SideBySide:
    """The ranks' batches as one: what a single process trains on to match them."""

    def __init__(self, shards: list[ShuffledBatches]) -> None:
        self.shards = shards

    def earliest(self, step, position):
        return step, position

    def batches(self, _start=None):
        for pairs in zip(*(shard.batches() for shard in self.shards), strict=False):
            yield ({hook: torch.cat([batch[hook] for batch, _ in pairs]) for hook in pairs[0][0]},
                   pairs[0][1])


def _single_process_reference(model_dir, corpus, out, steps: int) -> None:
    job = _job(model_dir, corpus, out, steps)
    hook = HookPoint.parse(HOOK)
    model = load_model(job.model, up_to_layer=hook.layer)
    source = ModelActivationSource(model, Corpus.open(str(corpus)), [hook], job.extraction)
    shards = [ShuffledBatches(source, [hook], BATCH // 2, _block_chunks(job, model.hidden_size),
                              job.train.seed, torch.device("cpu"), DataParallel(rank, 2))
              for rank in range(2)]
    batches = _SideBySide(shards)
    config = SAEConfig("topk", model.hidden_size, EXPANSION * model.hidden_size, k=4)
    trainer = Trainer(config, job.train, batches, hook, out, torch.device("cpu"))
    train_together([trainer], batches, resume=False)
    trainer.sae.fold_input_scale()
    save_sae(trainer.sae, out, SAEMetadata(model_name="tiny", hook_name=HOOK, context_size=32), {})


def test_two_processes_train_the_sae_one_process_trains_on_the_same_data(
        gpt2_dir, tiny_corpus, tmp_path):
    _torchrun(tmp_path, gpt2_dir, tiny_corpus, tmp_path / "ddp", steps=8)
    _single_process_reference(gpt2_dir, tiny_corpus, tmp_path / "single", steps=8)
    ddp, single = (load_file(tmp_path / name / "sae_weights.safetensors")
                   for name in ("ddp", "single"))
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5)
    # Rank 0 alone wrote the files; the metrics are the whole batch's.
    points = [json.loads(line) for line in
              (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4, 6, 8]
    assert points[-1]["tokens"] == 8 * BATCH
    reference = [json.loads(line) for line in
                 (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert points[-1]["loss"] == pytest.approx(reference[-1]["loss"], rel=1e-4)


def test_a_two_process_run_resumes_in_one_process(gpt2_dir, tiny_corpus, tmp_path):
    out = tmp_path / "run"
    _torchrun(tmp_path, gpt2_dir, tiny_corpus, out, steps=6)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6 and len(state["positions"]) == 2
    blocks = [position["block"] for position in state["positions"]]
    events = []
    from mistudio_core.runs import train_sae

    result = train_sae(_job(gpt2_dir, tiny_corpus, out, steps=9, resume=True),
                       lambda kind, payload: events.append((kind, payload)))
    assert result.steps == 9
    assert ("log", {"message": "resumed at step 6"}) in events
    resumed = torch.load(out / "checkpoint.pt", weights_only=False)
    assert resumed["position"]["block"] > max(blocks)  # no block is read twice
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 9]


def test_torchrun_runs_the_cli_in_process_and_rank_0_alone_answers(gpt2_dir, tiny_corpus,
                                                                    tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         f"--master-port={free_port()}", "-m", "mistudiod.cli", "train", "--model",
         str(gpt2_dir), "--corpus", str(tiny_corpus), "--hook", HOOK, "--tokens", "2048",
         "--batch-tokens", str(BATCH), "--context-size", "32", "--out", str(tmp_path / "sae"),
         "--json"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    documents = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(documents) == 1 and documents[0]["steps"] == 4
    assert (tmp_path / "sae" / "sae_weights.safetensors").exists()


def test_layer_parallel_trains_each_hook_as_if_alone(gpt2_dir, tiny_corpus, tmp_path):
    """Rank 0 extracts and sends layers.2's rows to rank 1: each process writes its hook's
    SAEs, bit for bit those of a one-process run of both hooks (itself the same as each hook
    alone: tests/test_train_many.py)."""
    hooks = "layers.0.resid_post,layers.2.resid_post"
    argv = ["train", "--model", str(gpt2_dir), "--corpus", str(tiny_corpus), "--hook", hooks,
            "--tokens", "3072", "--batch-tokens", str(BATCH), "--context-size", "32",
            "--k", "4", "--expansion", "4", "--sweep", "k=2,4", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         f"--master-port={free_port()}", "-m", "mistudiod.cli", *argv, "--parallel", "layers",
         "--out", str(tmp_path / "split")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [(hook, k) for hook in hooks.split(",") for k in (2, 4)]
    assert [(sae["hook"], sae["variant"]["k"]) for sae in document["saes"]] == expected
    single = subprocess.run([sys.executable, "-m", "mistudiod.cli", *argv, "--local", "--out",
                             str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    for hook, k in expected:
        split, one = (load_file(tmp_path / run / hook / f"k-{k}" / "sae_weights.safetensors")
                      for run in ("split", "one"))
        for name in one:
            assert torch.equal(split[name], one[name]), (hook, k, name)


def test_the_daemon_runs_a_job_on_two_processes(start_daemon, gpt2_dir, tiny_corpus, tmp_path):
    """`gpus: 2` on a machine without GPUs: the worker becomes torchrun with two CPU processes;
    rank 0 reports the job, which ends with one SAE trained data-parallel."""
    daemon = start_daemon()
    params = train_params(str(gpt2_dir), tiny_corpus, tmp_path / "sae", gpus=2)
    job = daemon.request("job.submit", {"kind": "train", "params": params})["job"]
    done = daemon.wait_for_job(job["id"])
    assert done["state"] == "succeeded", (done["error"], daemon.log())
    logs = [entry["message"] for entry in daemon.request("job.logs", {"id": job["id"]})["logs"]]
    assert "data-parallel over 2 processes" in logs
    assert done["result"]["steps"] == 16 and (tmp_path / "sae" / "cfg.json").exists()
    points = daemon.request("job.metrics", {"id": job["id"]})["points"]
    assert points[-1]["step"] == 16  # rank 0 alone reported: one point per report
    assert len({point["step"] for point in points}) == len(points)
