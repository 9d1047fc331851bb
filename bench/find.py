"""Benchmark: find's per-batch bookkeeping against SAE encoding alone, and feature-card loads.

(a) Throughput. A random TopK SAE encodes batches of random activations (`--batch-windows`
windows of `--context` tokens, the first token of each window a special token left out, as
`find` reads them). Baseline: `sae.encode_sparse(x)` alone. Measured: `sae.encode_sparse(x)`
followed by `FeatureRecorder.add(token_ids, keep, codes)` with find's default settings (top 20,
radius 12, 10 x 4 quantile samples, 20 negatives, exact co-occurrence up to 16384 features). Both
run on the same batches, interleaved (rotated order every round); every round uses a fresh batch
so the recorder never sees the same data twice; the recorder is first filled with `--fill`
batches (48: about 100k tokens, a tenth of find's default run). A batch costs the recorder less
as it fills, since fewer peaks beat each feature's top-k bar and fewer spans are built: on the
2-core CPU the ratio measured 0.83-0.87 with 8 fill batches and 0.86 with 48, and a whole run
averages more than its tenth-of-the-way batches. The first batch into an empty recorder, when
every peak enters the top-k, is timed separately for reference.
Ratio = encode throughput with recording / encode throughput alone. Target: >= 0.8.

(b) Card load. A finished store for `--card-features` features (default 65536) is written with
synthetic arrays of find's default shapes, an explanation and a score per feature; the median
time of `FeatureStore.card(f)` over `--card-samples` random features is reported on an open
store and with the store opened afresh for each card (what `mistudio feature` does). The arrays
were just written, so they are in the page cache. Target: < 50 ms.

    python bench/find.py                    # d_in 768, d_sae 16384, k 32, 16 x 128 tokens
    python bench/find.py --threads 1 --json
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch

try:
    from bench import _common as common
except ImportError:  # run as `python bench/find.py`
    import _common as common

from mistudio_core.feature_recorder import HISTOGRAM_BINS, FeatureRecorder
from mistudio_core.feature_store import FeatureStore
from mistudio_core.find import FindConfig
from mistudio_core.sae import SAEConfig, SparseAutoencoder

TARGET_RATIO = 0.8
TARGET_CARD_MS = 50.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-windows", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=9,
                        help="interleaved rounds measured (median taken)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded")
    parser.add_argument("--fill", type=int, default=48,
                        help="batches fed to the recorder before timing")
    parser.add_argument("--card-features", type=int, default=65536)
    parser.add_argument("--card-samples", type=int, default=50)
    parser.add_argument("--no-card", action="store_true", help="skip the card-load benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


def make_batches(args, count: int, device) -> list[tuple[torch.Tensor, ...]]:
    """`count` distinct batches: activations of the kept positions (a few strong directions,
    a mean offset and noise), token ids and the keep mask (False at each window's BOS)."""
    generator = torch.Generator().manual_seed(args.seed)
    rank = max(1, args.d_in // 8)
    basis = torch.randn(rank, args.d_in, generator=generator)
    offset = torch.randn(args.d_in, generator=generator)
    batches = []
    for _ in range(count):
        token_ids = torch.randint(0, args.vocab, (args.batch_windows, args.context),
                                  generator=generator)
        keep = torch.ones_like(token_ids, dtype=torch.bool)
        keep[:, 0] = False
        n = int(keep.sum())
        weights = torch.randn(n, rank, generator=generator) * torch.linspace(3, 0.3, rank)
        x = weights @ basis / math.sqrt(rank) + 0.5 * torch.randn(n, args.d_in,
                                                                  generator=generator) + offset
        batches.append((x.to(device), token_ids.to(device), keep.to(device)))
    return batches


def throughput(args, device, quiet: bool) -> dict:
    torch.manual_seed(args.seed)
    sae = SparseAutoencoder(SAEConfig("topk", args.d_in, args.d_sae, k=args.k), device=device)
    sae.eval()
    sync = common.synchronizer(device)
    rounds = args.warmup + args.repeats
    common.log(f"making {args.fill + 1 + rounds} batches ...", quiet)
    batches = make_batches(args, args.fill + 1 + rounds, device)
    recorder = FeatureRecorder(args.d_sae, FindConfig(), device)

    x, token_ids, keep = batches[0]
    codes = sae.encode_sparse(x)
    sync()
    start = time.perf_counter()
    recorder.add(token_ids, keep, codes)
    sync()
    first_add = time.perf_counter() - start
    common.log(f"filling the recorder with {args.fill} batches ...", quiet)
    for x, token_ids, keep in batches[1:args.fill + 1]:
        recorder.add(token_ids, keep, sae.encode_sparse(x))

    timed = iter(batches[args.fill + 1:])
    current: dict = {}

    def next_batch(name: str):
        """Each round's candidates share one fresh batch: the first to run in a round takes it."""
        if name in current or not current:
            current.clear()
            current["batch"] = next(timed)
        current[name] = True
        return current["batch"]

    def encode_only():
        x, _, _ = next_batch("encode")
        return sae.encode_sparse(x)

    def encode_and_record():
        x, token_ids, keep = next_batch("record")
        recorder.add(token_ids, keep, sae.encode_sparse(x))

    common.log(f"timing encode vs encode + record, {args.repeats} interleaved rounds ...", quiet)
    times = common.interleaved({"encode": encode_only, "encode_and_record": encode_and_record},
                               args.repeats, args.warmup, sync)
    tokens = int(batches[0][2].sum())
    encode_s, record_s = common.median(times["encode"]), common.median(times["encode_and_record"])
    ratio = common.paired_ratio(times["encode"], times["encode_and_record"])
    return {
        "tokens_per_batch": tokens,
        "encode_tokens_per_s": tokens / encode_s,
        "encode_and_record_tokens_per_s": tokens / record_s,
        "encode_ms": 1e3 * encode_s,
        "encode_and_record_ms": 1e3 * record_s,
        "spread": {"encode": common.spread(times["encode"]),
                   "encode_and_record": common.spread(times["encode_and_record"])},
        "ratio": ratio,
        "first_add_ms": 1e3 * first_add,
        "cooccurrence": recorder.cooccurrence.method,
        "pass": ratio >= TARGET_RATIO,
    }


def write_store(directory: str, n_features: int, vocab: int, seed: int) -> None:
    """A finished find's store with find's default shapes, filled with random data."""
    config = FindConfig()
    rng = np.random.default_rng(seed)
    store = FeatureStore.create(directory, {
        "d_sae": n_features, "per_quantile": config.per_quantile,
        "histogram_log10_edges": np.linspace(-4, 4, HISTOGRAM_BINS + 1).tolist()})
    n_fired = rng.integers(0, 5000, n_features)
    store.write_statistics(n_fired, rng.random(n_features) * 10,
                           n_fired * rng.random(n_features), 1_000_000)
    width = config.width
    for name, slots in (("top", config.top), ("quantile", config.quantile_samples),
                        ("negative", config.negatives)):
        shape = (n_features, slots, width)
        store.write_examples(name, rng.integers(0, vocab, shape, dtype=np.int32),
                             rng.random(shape, dtype=np.float32),
                             rng.random(shape[:2], dtype=np.float32))
    store.write_array("quantile_edges",
                      np.sort(rng.random((n_features, config.quantile_groups + 1)), axis=1))
    store.write_array("histogram", rng.integers(0, 100, (n_features, HISTOGRAM_BINS),
                                                dtype=np.int32))
    for side in ("promoted", "suppressed"):
        store.write_array(f"{side}_ids", rng.integers(0, vocab, (n_features, config.logits),
                                                      dtype=np.int32))
        store.write_array(f"{side}_values", rng.random((n_features, config.logits)))
    for kind in ("decoder", "cooccurrence"):
        store.write_neighbours(kind, rng.integers(0, n_features, (n_features, config.neighbours)),
                               rng.random((n_features, config.neighbours)))
    store.write_vocabulary([f" token{i}" for i in range(vocab)])
    store.save_explanations("stats", [(f, f"explanation of feature {f}", {"top_tokens": []})
                                      for f in range(n_features)])
    store.save_scores("rule", "stats", [(f, float(rng.random()), {}) for f in range(n_features)])
    store.close()


def card_loads(args, quiet: bool) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    features = rng.integers(0, args.card_features, args.card_samples).tolist()
    with tempfile.TemporaryDirectory(prefix="bench-find-card-") as directory:
        common.log(f"writing a store of {args.card_features} features ...", quiet)
        write_store(directory, args.card_features, args.vocab, args.seed)
        store = FeatureStore(directory)
        store.card(features[0])  # maps the arrays and reads the vocabulary once
        open_times, fresh_times = [], []
        for feature in features:
            start = time.perf_counter()
            store.card(feature)
            open_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            fresh = FeatureStore(directory)
            fresh.card(feature)
            fresh_times.append(time.perf_counter() - start)
            fresh.close()
        store.close()
    open_ms, fresh_ms = 1e3 * common.median(open_times), 1e3 * common.median(fresh_times)
    return {"features": args.card_features, "samples": args.card_samples,
            "open_store_ms": open_ms, "fresh_store_ms": fresh_ms,
            "max_open_store_ms": 1e3 * max(open_times),
            "pass": open_ms < TARGET_CARD_MS and fresh_ms < TARGET_CARD_MS}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quiet = args.json
    environment = common.environment()
    speed = throughput(args, device, quiet)
    cards = None if args.no_card else card_loads(args, quiet)
    document = {
        "benchmark": "find",
        "config": {"d_in": args.d_in, "d_sae": args.d_sae, "k": args.k,
                   "batch_windows": args.batch_windows, "context": args.context,
                   "repeats": args.repeats, "fill": args.fill, "device": str(device)},
        "environment": environment,
        "baseline": "sae.encode_sparse(x) alone on the same batch",
        "target_ratio": TARGET_RATIO,
        "throughput": speed,
        "target_card_ms": TARGET_CARD_MS,
        "card": cards,
    }
    text = [
        f"find bookkeeping: d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, "
        f"{args.batch_windows} x {args.context} tokens per batch ({speed['tokens_per_batch']} "
        f"encoded), {device}, {torch.get_num_threads()} threads, {args.repeats} rounds",
        "baseline: sae.encode_sparse(x) alone on the same batch",
        "",
        common.table(
            ["variant", "median ms", "tokens/s", "spread"],
            [["encode_sparse", speed["encode_ms"], speed["encode_tokens_per_s"],
              speed["spread"]["encode"]],
             ["encode_sparse + recorder.add", speed["encode_and_record_ms"],
              speed["encode_and_record_tokens_per_s"], speed["spread"]["encode_and_record"]]]),
        "",
        f"throughput ratio (with recording / encode alone): {speed['ratio']:.3f}  "
        f"target >= {TARGET_RATIO}  {common.verdict(speed['pass'])}",
        f"first batch into an empty recorder: recorder.add {speed['first_add_ms']:.1f} ms "
        f"(co-occurrence {speed['cooccurrence']})",
    ]
    if cards:
        text += [
            "",
            f"feature card, {cards['features']} features, median of {cards['samples']} random "
            f"features: open store {cards['open_store_ms']:.2f} ms (max "
            f"{cards['max_open_store_ms']:.2f}), store opened afresh "
            f"{cards['fresh_store_ms']:.2f} ms  target < {TARGET_CARD_MS:.0f} ms  "
            f"{common.verdict(cards['pass'])}",
        ]
    common.emit(document, "\n".join(text), args.json)
    return document


if __name__ == "__main__":
    main()
