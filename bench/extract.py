"""Benchmark: activation extraction with partial loading, against a full forward pass.

A GPT-2-like model with random weights is built locally (default 12 layers, hidden 512, 8 heads,
vocab 8192) and saved with a small byte-level BPE tokenizer. Then:

(a) Throughput. Activations at `layers.L.resid_post` the library's way
    (`load_model(ModelSpec(dir), up_to_layer=L)` + `hooked.activations(ids, [HookPoint(L,
    "resid_post")])`) against a plain full forward pass of the same model
    (`AutoModelForCausalLM.from_pretrained(dir)`, `model(input_ids=ids, use_cache=False)` under
    no_grad), on the same batch of token ids, interleaved, median of per-round ratios.
    Layer index L means L+1 blocks are needed, so the ideal speed-up is N/(L+1); the target is
    full_time / partial_time >= 0.9 * N / (L+1).

(b) Peak memory. Each case runs in a fresh subprocess that reports its peak RSS
    (resource.getrusage ru_maxrss). The baseline is a subprocess that imports the same modules
    (torch, transformers, the GPT-2 classes, mistudio_core) and loads nothing. Peak extra memory
    of "partial load + extraction at layer L" = its peak RSS - baseline. Target: extra <=
    ((L+1)/N + 0.10) * W, W = the full model's weight bytes (model.safetensors); i.e. the
    blocks' share of the weights plus an allowance of 10% of W for the embeddings, the
    activations of the batch and allocator slack. The stricter reading (L+1)/N * W * 1.1 and the
    bytes the partial model really holds (embeddings + L+1 blocks) are printed alongside.

    python bench/extract.py                    # N=12, L=2, 16 windows x 128 tokens
    python bench/extract.py --layers 24 --layer 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

try:
    from bench import _common as common
except ImportError:  # run as `python bench/extract.py`
    import _common as common

TARGET_SPEED_FRACTION = 0.9
MEMORY_SLACK = 0.10
END_OF_TEXT = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="N, blocks in the model")
    parser.add_argument("--layer", type=int, default=2, help="L, the hook's layer index")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128, help="tokens per window")
    parser.add_argument("--batch-windows", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", default=None,
                        help="build (or reuse) the model here instead of a temporary directory")
    parser.add_argument("--skip-memory", action="store_true", help="throughput only")
    parser.add_argument("--memory-runs", type=int, default=1,
                        help="subprocesses per memory case (minimum taken)")
    parser.add_argument("--memory-batch-windows", type=int, default=None,
                        help="windows per pass in the memory cases (default: --batch-windows)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    # Internal: the memory measurements run this script again as a worker.
    parser.add_argument("--worker", choices=("baseline", "warm", "partial", "full"),
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----- the model ---------------------------------------------------------------------------------


def _tokenizer_texts() -> list[str]:
    """A little real text for the BPE merges: docstrings of a few standard modules."""
    import argparse as a
    import collections
    import json as j
    import pathlib
    import subprocess as s
    import textwrap

    texts = []
    for module in (a, collections, j, pathlib, s, textwrap, os, shutil):
        texts.append(module.__doc__ or "")
        texts.extend((getattr(module, name).__doc__ or "") for name in dir(module)
                     if not name.startswith("_"))
    return [t for t in texts if t]


def build_model(directory: Path, args) -> Path:
    """A random GPT-2 of the requested shape with a small BPE tokenizer, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    marker = directory / "bench-model.json"
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab", "context",
                                            "seed")}
    if marker.exists() and json.loads(marker.read_text()) == shape:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.train_from_iterator(_tokenizer_texts(), trainer=trainers.BpeTrainer(
        vocab_size=min(args.vocab, 2048), special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT, unk_token=END_OF_TEXT, model_max_length=args.context,
    )
    torch.manual_seed(args.seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=max(args.context, 128), n_embd=args.hidden,
        n_layer=args.layers, n_head=args.heads, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    marker.write_text(json.dumps(shape))
    return directory


def weight_bytes(directory: Path) -> dict[str, int]:
    """Bytes of every tensor in model.safetensors, by group: embeddings, each block, the rest."""
    from safetensors import safe_open

    groups: dict[str, int] = {}
    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            view = handle.get_slice(name)
            numel = 1
            for size in view.get_shape():
                numel *= size
            nbytes = numel * _dtype_size(view.get_dtype())
            parts = name.split(".")
            if "h" in parts:
                group = f"block{parts[parts.index('h') + 1]}"
            elif any(p in ("wte", "wpe") for p in parts):
                group = "embeddings"
            else:
                group = "other"
            groups[group] = groups.get(group, 0) + nbytes
    return groups


def _dtype_size(name: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1,
            "BOOL": 1}.get(name, 4)


def make_ids(args) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(1, args.vocab, (args.batch_windows, args.context), generator=generator)


# ----- the two ways of getting activations -------------------------------------------------------


def load_partial(directory: Path, args):
    from mistudio_core.hooks import HookPoint
    from mistudio_core.models import ModelSpec, load_model

    hooked = load_model(ModelSpec(str(directory), dtype="float32", device=args.device),
                        up_to_layer=args.layer)
    hook = HookPoint(args.layer, "resid_post")

    def run(ids: torch.Tensor) -> torch.Tensor:
        return hooked.activations(ids, [hook])[hook]

    return hooked, run


def load_full(directory: Path, args):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    model.to(args.device).eval()
    device = torch.device(args.device)

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return model, run


def _prepare_imports() -> None:
    """Everything both workers import, so the baseline worker carries the same code."""
    import transformers  # noqa: F401
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.gpt2 import modeling_gpt2  # noqa: F401

    import mistudio_core.hooks  # noqa: F401
    import mistudio_core.models  # noqa: F401


def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (empty off Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    fields = {}
    for name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
        match = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            fields[name] = int(match.group(1)) * 1024
    return fields


def mapped_file_rss(suffix: str) -> int:
    """Resident bytes of this process's mappings of files whose path ends with `suffix` (the
    weights transformers memory-maps from model.safetensors and has not copied)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header
            inside = len(head) >= 6 and head[-1].endswith(suffix)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    /proc/self/status VmHWM where there is one: getrusage's ru_maxrss survives fork + exec on
    Linux (a child starts at least at its parent's peak), so in a subprocess of a big parent it
    reports the parent's size. ru_maxrss (KiB on Linux) elsewhere."""
    hwm = proc_status().get("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonPeak:
    """Samples RssAnon in a thread: the peak of anonymous memory, which VmHWM does not separate
    from file-backed pages (e.g. the memory-mapped model.safetensors while it is read)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        status = proc_status()
        for name in self.peak:
            self.peak[name] = max(self.peak[name], status.get(name, 0))

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def worker(args) -> None:
    """Subprocess body: load (or not) and run one batch; print its memory figures as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    _prepare_imports()
    ids = make_ids(args)
    directory = Path(args.model_dir)
    shape, after_load = None, proc_status()
    with AnonPeak() as probe:
        if args.worker == "warm":  # page in the code and thread pools a forward pass uses
            from transformers import GPT2Config, GPT2LMHeadModel

            tiny = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=args.context, n_embd=64,
                                              n_layer=1, n_head=2)).eval()
            with torch.no_grad():
                shape = list(tiny(input_ids=ids % 256, use_cache=False).logits.shape)
        if args.worker in ("partial", "full"):
            load = load_partial if args.worker == "partial" else load_full
            _, run = load(directory, args)
            after_load = proc_status()
            shape = list(run(ids).shape)
        weights_mapped = mapped_file_rss("model.safetensors")
    report = {
        "weights_mapped_rss_bytes": weights_mapped,
        "case": args.worker,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_anon_bytes": probe.peak["RssAnon"],
        "peak_file_bytes": probe.peak["RssFile"],
        "load_peak_rss_bytes": after_load.get("VmHWM", 0),
        "rss_after_load_bytes": after_load.get("VmRSS", 0),
        "anon_after_load_bytes": after_load.get("RssAnon", 0),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_shape": shape,
    }
    if torch.device(args.device).type == "cuda":
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(report))


def measure_memory(directory: Path, args, runs: int) -> dict[str, dict]:
    """Each case's worker report (the run of lowest peak RSS of `runs` fresh subprocesses)."""
    script = Path(__file__).resolve()
    base = [sys.executable, str(script), "--model-dir", str(directory), "--layer", str(args.layer),
            "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads",
            str(args.heads), "--vocab", str(args.vocab), "--context", str(args.context),
            "--batch-windows", str(args.memory_batch_windows or args.batch_windows),
            "--device", args.device,
            "--seed", str(args.seed)]
    if args.threads:
        base += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(script.parent.parent), os.environ.get("PYTHONPATH", "")]))
    reports: dict[str, dict] = {}
    for _ in range(runs):
        for case in ("baseline", "warm", "partial", "full"):
            out = subprocess.run([*base, "--worker", case], capture_output=True, text=True,
                                 env=env, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{case} worker failed:\n{out.stderr[-2000:]}")
            report = json.loads(out.stdout.strip().splitlines()[-1])
            if case not in reports or report["peak_rss_bytes"] < reports[case]["peak_rss_bytes"]:
                reports[case] = report
    return reports


# ----- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if not 0 <= args.layer < args.layers:
        raise SystemExit(f"--layer must be between 0 and {args.layers - 1}")
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet = args.json
    temporary = None
    if args.model_dir:
        directory = Path(args.model_dir)
    else:
        temporary = tempfile.mkdtemp(prefix="bench-extract-")
        directory = Path(temporary) / "model"
    try:
        common.log(f"building a {args.layers}-layer GPT-2 in {directory} ...", quiet)
        build_model(directory, args)
        groups = weight_bytes(directory)
        full_weights = sum(groups.values())
        needed = groups.get("embeddings", 0) + sum(groups.get(f"block{i}", 0)
                                                   for i in range(args.layer + 1))
        args.model_dir = str(directory)

        memory = None
        # First, while this process is still small (the workers' numbers do not depend on it).
        if not args.skip_memory:
            common.log("measuring peak memory in fresh subprocesses ...", quiet)
            reports = measure_memory(directory, args, args.memory_runs)
            base = reports["baseline"]

            def extra(case: str, field: str, base_field: str | None = None) -> int:
                return reports[case][field] - base[base_field or field]

            extra_partial = extra("partial", "peak_rss_bytes")
            share = (args.layer + 1) / args.layers
            budget = (share + MEMORY_SLACK) * full_weights
            strict = share * full_weights * (1 + MEMORY_SLACK)
            memory = {
                "measure": "VmHWM of a fresh subprocess minus the imports-only baseline's",
                "workers": reports,
                "full_weight_bytes": full_weights,
                "partial_weight_bytes": needed,
                "partial_extra_bytes": extra_partial,
                "partial_extra_over_full_weights": extra_partial / full_weights,
                "partial_extra_over_needed_weights": extra_partial / needed,
                "diagnostics": {
                    case: {
                        "extra_peak_rss": extra(case, "peak_rss_bytes"),
                        "extra_peak_anon": extra(case, "peak_anon_bytes"),
                        "extra_peak_file_mapped": extra(case, "peak_file_bytes"),
                        "extra_rss_after_load": extra(case, "rss_after_load_bytes",
                                                      "rss_after_load_bytes"),
                        "weights_resident": reports[case]["weights_mapped_rss_bytes"],
                        "forward_working_set": (reports[case]["peak_anon_bytes"]
                                                - reports[case]["anon_after_load_bytes"]),
                    }
                    for case in ("partial", "full")
                },
                "partial_extra_over_warm_baseline": (reports["partial"]["peak_rss_bytes"]
                                                     - reports["warm"]["peak_rss_bytes"]),
                "target_bytes": budget,
                "target_fraction_of_weights": share + MEMORY_SLACK,
                "strict_target_bytes": strict,
                "pass": extra_partial <= budget,
                "pass_strict": extra_partial <= strict,
            }
            resident = reports["partial"]["weights_mapped_rss_bytes"]
            # Only meaningful where the weights stay memory-mapped (they do on the CPU).
            memory["weights_resident_pass"] = (resident <= budget) if resident else None

        common.log("timing partial extraction vs full forward ...", quiet)
        ids = make_ids(args)
        _, partial = load_partial(directory, args)
        _, full = load_full(directory, args)
        sync = common.synchronizer(args.device)
        times = common.interleaved({"partial": lambda: partial(ids), "full": lambda: full(ids)},
                                   args.repeats, args.warmup, sync)
        speedup = common.paired_ratio(times["full"], times["partial"])
        ideal = args.layers / (args.layer + 1)
        speed_target = TARGET_SPEED_FRACTION * ideal
        n_tokens = ids.numel()
        # Matmul FLOPs per token, for reading the speed-up: a block is 24 h^2 (QKV, out, MLP)
        # + 4 h ctx (scores, values); the full pass adds the LM head, 2 h V.
        h, ctx = args.hidden, args.context
        block_flops = 24 * h * h + 4 * h * ctx
        flop_ideal = (args.layers * block_flops + 2 * h * args.vocab) / (
            (args.layer + 1) * block_flops)

    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)

    document = {
        "benchmark": "extract",
        "config": {"layers": args.layers, "layer": args.layer, "hidden": args.hidden,
                   "heads": args.heads, "vocab": args.vocab, "context": args.context,
                   "batch_windows": args.batch_windows, "tokens_per_pass": n_tokens,
                   "memory_batch_windows": args.memory_batch_windows or args.batch_windows,
                   "repeats": args.repeats, "device": args.device},
        "environment": common.environment(),
        "throughput": {
            "baseline": "full forward pass: AutoModelForCausalLM, model(ids, use_cache=False)",
            "partial_median_s": common.median(times["partial"]),
            "full_median_s": common.median(times["full"]),
            "partial_tokens_per_s": n_tokens / common.median(times["partial"]),
            "full_tokens_per_s": n_tokens / common.median(times["full"]),
            "partial_spread": common.spread(times["partial"]),
            "full_spread": common.spread(times["full"]),
            "speedup": speedup,
            "ideal_speedup": ideal,
            "flop_ratio_full_over_partial": flop_ideal,
            "convention": "layer index L needs L+1 blocks; ideal speed-up N/(L+1)",
            "target_speedup": speed_target,
            "pass": speedup >= speed_target,
        },
        "memory": memory,
    }

    t = document["throughput"]
    mib = 1 << 20
    text = [
        f"Activation extraction: GPT-2 N={args.layers} layers, hidden {args.hidden}, vocab "
        f"{args.vocab}; hook layers.{args.layer}.resid_post; {args.batch_windows} x "
        f"{args.context} tokens per pass; {args.device}, {torch.get_num_threads()} threads",
        "",
        "(a) throughput, baseline = full forward pass (AutoModelForCausalLM, use_cache=False)",
        common.table(
            ["case", "median s", "tokens/s", "spread"],
            [["partial load + activations", t["partial_median_s"], t["partial_tokens_per_s"],
              t["partial_spread"]],
             ["full forward", t["full_median_s"], t["full_tokens_per_s"], t["full_spread"]]],
        ),
        f"speed-up (full time / partial time, median of paired rounds): {speedup:.2f}x; "
        f"ideal N/(L+1) = {ideal:.2f}; target >= 0.9 x {ideal:.2f} = {speed_target:.2f} -> "
        f"{common.verdict(t['pass'])}",
        f"(matmul FLOP ratio full/partial, LM head included: {flop_ideal:.2f})",
    ]
    if memory:
        m = memory
        diag = m["diagnostics"]
        labels = {"partial": f"partial load + extract layer {args.layer}",
                  "full": "full load + forward (reference)"}
        text += [
            "",
            "(b) peak memory: fresh subprocess per case, peak RSS (VmHWM) minus the peak of an "
            f"imports-only baseline ({m['workers']['baseline']['peak_rss_bytes'] / mib:.0f} MiB)",
            common.table(
                ["case", "extra peak MiB", "x W", "weights resident MiB", "x W",
                 "forward working set MiB"],
                [[labels[case], diag[case]["extra_peak_rss"] / mib,
                  diag[case]["extra_peak_rss"] / full_weights,
                  diag[case]["weights_resident"] / mib,
                  diag[case]["weights_resident"] / full_weights,
                  diag[case]["forward_working_set"] / mib] for case in ("partial", "full")],
            ),
            "    weights resident = pages of the memory-mapped model.safetensors in RSS at the end "
            "(/proc/self/smaps); forward working set = peak anonymous memory (sampled every 2 ms) "
            "minus that after loading: activations and temporaries of one forward pass",
            f"W = {full_weights / mib:.1f} MiB; the partial model's own tensors: "
            f"{needed / mib:.1f} MiB = {needed / full_weights:.2f} W (embeddings + "
            f"{args.layer + 1} blocks)",
            f"target: extra peak <= ((L+1)/N + 0.10) W = {m['target_fraction_of_weights']:.3f} W "
            f"= {m['target_bytes'] / mib:.1f} MiB -> {common.verdict(m['pass'])} "
            f"(stricter (L+1)/N x W x 1.1 = {m['strict_target_bytes'] / mib:.1f} MiB -> "
            f"{common.verdict(m['pass_strict'])})",
            f"weights alone against the same budget: {common.verdict(m['weights_resident_pass'])}; "
            f"over a warm baseline (imports + a tiny GPT-2 forward: code pages, thread pools) the "
            f"extra peak is {m['partial_extra_over_warm_baseline'] / mib:.1f} MiB",
        ]
    common.emit(document, "\n".join(text), args.json)
    return document


if __name__ == "__main__":
    main()
