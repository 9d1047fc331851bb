"""Benchmark: SAEs on K hooks from one pass of the model, against one run for one hook.

Both are real `mistudio_core.runs.train_sae` runs (no activation cache: the model runs over the
corpus in each), on the same model, corpus, token count and SAE settings:

- baseline: one SAE at the deepest of the hooks (the model is loaded and run up to that layer);
- candidate: one SAE at each of the K hooks (`--hooks`, default every layer's `resid_post`),
  from one pass of the model up to the same layer: the extraction is shared, each SAE trains
  on its own hook's rows with its own optimizer and checkpoints.

The runs alternate (`--repeats` rounds, the order swapped every round) and the ratio is the
median of the per-round ratios. Target: the K-hook run costs < 1.3x the one-hook run, not Kx.
That holds where the extraction is most of a run, i.e. large models on a GPU: an SAE step costs
about 6 * d_in * d_sae FLOPs a token (TopK: the dense encoder, forward and backward), the model
about 2 * parameters up to the hook. The report gives the one-hook run's extraction share
(measured: the same run with `--tokens` read and nothing trained) so the ratio can be read
against it: with a share s, K SAEs cost about s + K * (1 - s) of the one-hook run.

    python bench/many_hooks.py                    # the demo model, 4 hooks, 200k tokens
    python bench/many_hooks.py --model PATH --hooks 'layers.*.resid_post' --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

try:
    from bench import _common as common
except ImportError:  # run as `python bench/many_hooks.py`
    import _common as common

from mistudio_core.activations import ExtractionConfig, ModelActivationSource
from mistudio_core.corpus import Corpus
from mistudio_core.hooks import parse_hooks
from mistudio_core.models import ModelSpec, load_config, load_model, n_layers_of
from mistudio_core.runs import TrainJob, prepare_demo, train_sae
from mistudio_core.train import TrainConfig

TARGET_RATIO = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--corpus", default="demo")
    parser.add_argument("--hooks", default="layers.*.resid_post")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet = args.json
    environment = common.environment()
    spec = ModelSpec(args.model, quantization=args.quantization, device=args.device)
    prepare_demo(args.model, args.corpus, lambda _kind, payload: common.log(
        payload["message"], quiet))
    hooks = parse_hooks(args.hooks, n_layers_of(load_config(spec)))
    deepest = max(hooks, key=lambda hook: hook.layer)
    work = Path(tempfile.mkdtemp(prefix="bench-many-hooks-"))

    def run(hook_spec: str, name: str):
        def train() -> None:
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            train_sae(TrainJob(
                model=spec, hook=hook_spec, corpus=args.corpus, out=str(out), k=args.k,
                expansion=args.expansion, extraction=ExtractionConfig(),
                train=TrainConfig(total_tokens=args.tokens, batch_tokens=args.batch_tokens,
                                  log_every=10**9, checkpoint_every=10**9)))
        return train

    candidates = {f"1 hook ({deepest.name})": run(deepest.name, "one"),
                  f"{len(hooks)} hooks, one pass": run(",".join(h.name for h in hooks), "many")}
    common.log(f"timing {len(candidates)} runs of {args.tokens} tokens, {args.repeats} rounds "
               "...", quiet)
    try:
        times = common.interleaved(candidates, args.repeats, warmup=0)
        extraction = _extraction_seconds(spec, args, deepest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, many = (times[name] for name in candidates)
    ratio = common.paired_ratio(many, one)
    share = extraction / common.median(one)
    document = {
        "benchmark": "many_hooks",
        "config": {"model": args.model, "hooks": [h.name for h in hooks], "tokens": args.tokens,
                   "expansion": args.expansion, "k": args.k, "device": args.device,
                   "repeats": args.repeats},
        "environment": environment,
        "one_hook_s": common.median(one), "many_hooks_s": common.median(many),
        "ratio": ratio, "target_ratio": TARGET_RATIO, "pass": ratio < TARGET_RATIO,
        "extraction_s": extraction, "extraction_share": share,
        "expected_ratio_from_share": share + len(hooks) * (1 - share),
    }
    text = "\n".join([
        f"{len(hooks)} SAEs from one pass vs one SAE: {args.model}, {args.tokens} tokens, "
        f"TopK {args.expansion}x k {args.k}, {args.repeats} rounds",
        "",
        common.table(["run", "median s", "x one hook", "target", "verdict"], [
            [list(candidates)[0], document["one_hook_s"], 1.0, "-", "-"],
            [list(candidates)[1], document["many_hooks_s"], ratio, f"< {TARGET_RATIO:g}",
             common.verdict(document["pass"])]]),
        "",
        f"extraction alone (the model over {args.tokens} tokens up to {deepest.name}): "
        f"{extraction:.1f} s, {100 * share:.0f}% of the one-hook run; with that share, "
        f"{len(hooks)} SAEs are expected at {document['expected_ratio_from_share']:.2f}x",
    ])
    common.emit(document, text, args.json)
    return document


def _extraction_seconds(spec: ModelSpec, args, hook) -> float:
    """The time to run the model over the run's tokens up to `hook` (nothing trained)."""
    model = load_model(spec, up_to_layer=hook.layer)
    source = ModelActivationSource(model, Corpus.open(args.corpus), [hook], ExtractionConfig())
    start, tokens = time.perf_counter(), 0
    for chunk in source.chunks():
        tokens += chunk.n_tokens
        if tokens >= args.tokens:
            break
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
