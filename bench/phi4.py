"""Benchmark: a Phi-4-sized model in 4-bit on one GPU: peak memory, extraction, SAE training, and
the original miStudio's workload end to end.

A model with microsoft/phi-4's configuration (phi3, 40 layers, hidden 5120, 14.7B parameters) is
built locally with random weights (nothing can be downloaded), in bf16 on the GPU (no fp32 copy is
ever made, and the CPU never holds the whole model), and saved as sharded safetensors with a
byte-level BPE tokenizer trained on the standard library's docstrings, which are also the corpus.
Everything is then measured through the project's own code paths:

1. Peak GPU memory (`torch.cuda.max_memory_allocated`) of `load_model(ModelSpec(dir,
   quantization="4bit"), up_to_layer=20)` (partial loading: 21 of 40 blocks) and extraction
   passes at `layers.20.resid_post`. Target: < 6 GB (6e9 bytes).
2. Extraction tokens/s: `ModelActivationSource.chunks()` at that hook, 32 windows of 128 tokens
   per forward pass (the defaults of `mistudio train`), tokenization and packing included.
3. SAE training tokens/s: the trainer's own step (`Trainer._accumulated_step`, as in
   bench/train_step.py) for a TopK SAE, 16x (d_sae 81920), k 32, batches of 4096, with no latent
   dead and with 5% dead (AuxK), interleaved with its matmul floor, one dense [4096, 5120] @
   [5120, 81920]: in bf16 (what the step's autocast runs on a GPU) and in fp32 (train_step.py's
   definition); median of the per-round ratios.
4. End to end: `runs.train_sae` on the original's workload, 9,000 samples of 128 tokens
   (1,152,000 training tokens): load, extraction, training, saving. Target: < 180 s (the
   original: 35 minutes). It runs first, so CUDA's and the kernels' first-use costs are in it.

Without a CUDA device it says so and exits 0. `--tiny` runs the same steps on a scaled-down
config (4 layers, hidden 256, layer 2) on whatever device there is, to check the script end to
end; the targets are then not judged.

    python bench/phi4.py                 # on a GPU: ~30 GB of disk for the checkpoint
    python bench/phi4.py --json
    python bench/phi4.py --tiny --samples 1000
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench import _common as common
    from bench import train_step
except ImportError:  # run as `python bench/phi4.py`
    import _common as common
    import train_step

from mistudio_core.activations import ExtractionConfig, ModelActivationSource
from mistudio_core.corpus import Corpus
from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_model
from mistudio_core.runs import TrainJob, train_sae
from mistudio_core.train import TrainConfig

TARGET_SECONDS = 180.0
TARGET_PEAK_BYTES = 6e9
ORIGINAL_SECONDS = 35 * 60
# microsoft/phi-4's config.json (Phi3ForCausalLM, 14.66B parameters).
PHI4 = {
    "num_hidden_layers": 40, "hidden_size": 5120, "intermediate_size": 17920,
    "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 100352,
    "max_position_embeddings": 16384, "original_max_position_embeddings": 16384,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 250000.0},
}
# The same shape scaled down (head size 64, 4 query heads per key/value head), for --tiny.
TINY = {**PHI4, "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 896,
        "num_attention_heads": 4, "num_key_value_heads": 1}
TOKENIZER_VOCAB = 8192


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a scaled-down config (4 layers, hidden 256) on any device")
    parser.add_argument("--device", default=None, help="default: cuda:0 (with --tiny: auto)")
    parser.add_argument("--layer", type=int, default=None, help="default: 20 (--tiny: 2)")
    parser.add_argument("--quantization", default="4bit", choices=("none", "8bit", "4bit"))
    parser.add_argument("--samples", type=int, default=9000, help="windows of the workload")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-windows", type=int, default=32, help="windows per forward pass")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="SAE training batch")
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--extract-passes", type=int, default=20,
                        help="timed forward passes (after 2 warm-up passes)")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved step/floor rounds")
    parser.add_argument("--work-dir", default=None,
                        help="build (or reuse) the model and keep the runs here")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    cpu_only = args.tiny and not torch.cuda.is_available()
    args.device = torch.device(args.device or ("cpu" if cpu_only else "cuda:0"))
    args.layer = args.layer if args.layer is not None else (2 if args.tiny else 20)
    args.shape = TINY if args.tiny else PHI4
    return args


# ----- the model, its tokenizer and the corpus ---------------------------------------------------


def build(work: Path, args) -> tuple[Path, Path]:
    """The model directory and the corpus file under `work`, built once per shape and seed."""
    from transformers import AutoModelForCausalLM, Phi3Config

    from mistudio_core.demo import collect_docstrings, train_tokenizer

    directory, corpus = work / ("phi4-tiny" if args.tiny else "phi4"), work / "corpus.txt"
    marker = directory / "bench-phi4.json"
    recipe = repr((args.shape, args.seed))
    if marker.exists() and marker.read_text() == recipe and corpus.exists():
        return directory, corpus
    common.log("collecting the corpus and training the tokenizer ...", args.json)
    documents = collect_docstrings()
    corpus.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer(documents, TOKENIZER_VOCAB, args.shape["max_position_embeddings"])
    special = tokenizer.eos_token_id
    config = Phi3Config(**args.shape, bos_token_id=special, eos_token_id=special,
                        pad_token_id=special)
    common.log(f"building the random model in bf16 on {args.device} and saving it ...", args.json)
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="2GB")
    tokenizer.save_pretrained(directory)
    del model
    _release(args.device)
    marker.write_text(recipe)
    return directory, corpus


def _release(device: torch.device) -> None:
    """Free what the last phase left (so the next one's peak starts from nothing) and reset the
    peak counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def model_spec(directory: Path, args) -> ModelSpec:
    return ModelSpec(str(directory), quantization=args.quantization, device=str(args.device))


# ----- the measurements --------------------------------------------------------------------------


def end_to_end(directory: Path, corpus: Path, work: Path, args) -> dict:
    """The original's workload through `train_sae`, timed from the call to the saved SAE."""
    job = TrainJob(
        model=model_spec(directory, args), hook=f"layers.{args.layer}.resid_post",
        corpus=str(corpus), out=tempfile.mkdtemp(prefix="sae-", dir=work), architecture="topk",
        k=args.k, expansion=args.expansion,
        extraction=ExtractionConfig(context_size=args.context, batch_windows=args.batch_windows),
        train=TrainConfig(total_tokens=args.samples * args.context,
                          batch_tokens=args.batch_tokens, seed=args.seed),
    )

    def progress(kind: str, payload: dict) -> None:
        if kind == "log":
            common.log(f"  {payload['message']}", args.json)
        elif kind == "metrics":
            common.log(f"  step {payload['step']}: fve {payload['fve']:.3f}, "
                       f"{payload['tokens_per_s']:.0f} tokens/s", args.json)

    _release(args.device)
    start = time.perf_counter()
    result = train_sae(job, progress)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result.steps, "tokens": job.train.total_tokens,
            "final_metrics": result.final_metrics, "peak_bytes": _peak(args.device)}


def extraction(directory: Path, corpus: Path, args) -> dict:
    """Load with partial loading, then time forward passes at the hook; the peak covers both."""
    sync = common.synchronizer(args.device)
    hook = HookPoint(args.layer, "resid_post")
    _release(args.device)
    start = time.perf_counter()
    hooked = load_model(model_spec(directory, args), up_to_layer=args.layer)
    sync()
    load_seconds, load_peak = time.perf_counter() - start, _peak(args.device)
    config = ExtractionConfig(context_size=args.context, batch_windows=args.batch_windows)
    chunks = ModelActivationSource(hooked, Corpus.open(str(corpus)), [hook], config).chunks()
    for _ in range(2):
        next(chunks)
    sync()
    start = time.perf_counter()
    for _ in range(args.extract_passes):
        chunk = next(chunks)
    sync()
    seconds = time.perf_counter() - start
    tokens = args.extract_passes * args.batch_windows * args.context
    return {
        "load_seconds": load_seconds, "load_peak_bytes": load_peak,
        "peak_bytes": _peak(args.device), "tokens_per_s": tokens / seconds,
        "blocks_loaded": len(hooked.blocks), "n_layers": hooked.n_layers,
        "finite": bool(torch.isfinite(chunk.activations[hook]).all()),
    }


def training_step(args, hidden: int) -> dict:
    """The trainer's step against its matmul floor, interleaved (see bench/train_step.py). The
    floor is in the dtype the step computes in (its autocast: bf16 on a GPU, fp32 on the CPU);
    on a GPU the fp32 floor of train_step.py is timed too."""
    shapes = argparse.Namespace(d_in=hidden, expansion=args.expansion, k=args.k,
                                batch=args.batch_tokens, seed=args.seed)
    d_sae = hidden * args.expansion
    device, sync = args.device, common.synchronizer(args.device)
    _release(device)
    with tempfile.TemporaryDirectory(prefix="bench-phi4-step-") as run_dir:
        live, x = train_step.make_trainer(shapes, device, run_dir + "/live", 0.0)
        dying, x_dead = train_step.make_trainer(shapes, device, run_dir + "/dead", 0.05)
        raw = train_step.make_batch(args.batch_tokens, hidden, args.seed, device)
        w_enc = torch.randn(hidden, d_sae, device=device) / hidden**0.5
        candidates = {
            "step": lambda: live._accumulated_step(x),
            "step_auxk": lambda: dying._accumulated_step(x_dead),
            "floor": lambda: raw @ w_enc,
        }
        if device.type == "cuda":
            raw16, w_enc16 = raw.bfloat16(), w_enc.bfloat16()
            candidates["floor_fp32"] = candidates["floor"]
            candidates["floor"] = lambda: raw16 @ w_enc16
        times = common.interleaved(candidates, args.repeats, warmup=2, sync=sync)
    results = {name: {"median_ms": 1e3 * common.median(values), "spread": common.spread(values)}
               for name, values in times.items()}
    for name in ("step", "step_auxk"):
        results[name]["tokens_per_s"] = args.batch_tokens / common.median(times[name])
        for floor in ("floor", "floor_fp32"):
            if floor in times:
                results[name][f"x_{floor}"] = common.paired_ratio(times[name], times[floor])
    floor_dtype = "bfloat16" if device.type == "cuda" else "float32"
    return {"d_sae": d_sae, "floor_dtype": floor_dtype, **results}


# ----- the report --------------------------------------------------------------------------------


def gb(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / 1e9:.2f} GB"


def judged(ok: bool, args) -> str:
    return "n/a (tiny)" if args.tiny else common.verdict(ok)


def report(args, results: dict) -> str:
    e2e, ext, step = results["end_to_end"], results["extraction"], results["training_step"]
    peak_ok = ext["peak_bytes"] is not None and ext["peak_bytes"] < TARGET_PEAK_BYTES
    rows = [
        ["peak GPU memory, load + extraction", gb(ext["peak_bytes"]), "< 6 GB",
         judged(peak_ok, args) if ext["peak_bytes"] is not None else "n/a (no GPU)"],
        ["  of which the load", gb(ext["load_peak_bytes"]), "", ""],
        [f"load ({args.quantization}, {ext['blocks_loaded']} of {ext['n_layers']} blocks)",
         f"{ext['load_seconds']:.1f} s", "", ""],
        [f"extraction at layers.{args.layer}.resid_post", f"{ext['tokens_per_s']:,.0f} tok/s",
         "", ""],
    ]
    for name, label in (("step", "no dead latents"), ("step_auxk", "5% dead, AuxK")):
        r = step[name]
        rows += [[f"SAE step ({label})", f"{r['tokens_per_s']:,.0f} tok/s", "", ""],
                 [f"  x its {step['floor_dtype']} matmul floor", f"{r['x_floor']:.2f}", "", ""]]
        if "x_floor_fp32" in r:
            rows.append(["  x the fp32 matmul floor", f"{r['x_floor_fp32']:.2f}", "", ""])
    rows += [
        [f"end to end ({args.samples:,} x {args.context} tokens)", f"{e2e['seconds']:.1f} s",
         "< 180 s", judged(e2e["seconds"] < TARGET_SECONDS, args)],
        ["  original miStudio", f"{ORIGINAL_SECONDS / 60:.0f} min", "",
         "" if args.tiny else f"x{ORIGINAL_SECONDS / e2e['seconds']:.1f} faster"],
        ["  tokens/s over the whole run", f"{e2e['tokens'] / e2e['seconds']:,.0f} tok/s",
         "", ""],
        ["  the SAE's final FVE", f"{e2e['final_metrics'].get('fve', float('nan')):.3f}", "",
         ""],
        ["  peak GPU memory in the run", gb(e2e["peak_bytes"]), "", ""],
    ]
    shape = args.shape
    lines = [
        f"{'Tiny ' if args.tiny else ''}Phi-4-shaped model (phi3, {shape['num_hidden_layers']} "
        f"layers, hidden {shape['hidden_size']}, random weights), {args.quantization}, on "
        f"{args.device} ({results['environment'].get('cuda_device', 'CPU')})",
        f"TopK SAE {args.expansion}x (d_sae {step['d_sae']}), k {args.k}, batches of "
        f"{args.batch_tokens}; {args.batch_windows} windows of {args.context} tokens per pass",
        "",
        common.table(["measure", "value", "target", "verdict"], rows),
        "",
        "floor: one dense [batch, d_in] @ [d_in, d_sae] in the dtype the step computes in",
    ]
    if not ext["finite"]:
        lines.append("note: the random model's activations were not all finite")
    return "\n".join(lines)


def skipped(args) -> dict:
    reason = ("no CUDA device: this benchmark needs a GPU (--tiny runs a scaled-down check on "
              "the CPU)")
    document = {"benchmark": "phi4", "skipped": reason}
    common.emit({**document, "environment": common.environment()}, f"skipped: {reason}",
                args.json)
    return document


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        return skipped(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-phi4-") as temporary:
        work = Path(args.work_dir or temporary)
        work.mkdir(parents=True, exist_ok=True)
        directory, corpus = build(work, args)
        common.log("end to end: the original's workload through train_sae ...", args.json)
        results = {"end_to_end": end_to_end(directory, corpus, work, args)}
        common.log("peak memory and extraction throughput ...", args.json)
        results["extraction"] = extraction(directory, corpus, args)
        common.log("the training step against its matmul floor ...", args.json)
        results["training_step"] = training_step(args, args.shape["hidden_size"])
    results["environment"] = common.environment()
    e2e, peak = results["end_to_end"]["seconds"], results["extraction"]["peak_bytes"]
    document = {
        "benchmark": "phi4",
        "config": {"tiny": args.tiny, "shape": args.shape, "layer": args.layer,
                   "quantization": args.quantization, "samples": args.samples,
                   "context": args.context, "batch_windows": args.batch_windows,
                   "batch_tokens": args.batch_tokens, "expansion": args.expansion, "k": args.k,
                   "device": str(args.device)},
        **results,
        "targets": {"end_to_end_seconds": TARGET_SECONDS, "peak_bytes": TARGET_PEAK_BYTES},
        "pass": None if args.tiny else {
            "end_to_end": e2e < TARGET_SECONDS,
            "peak_memory": peak is not None and peak < TARGET_PEAK_BYTES,
        },
    }
    common.emit(document, report(args, results), args.json)
    return document


if __name__ == "__main__":
    main()
