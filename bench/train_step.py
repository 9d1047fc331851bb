"""Benchmark: one TopK SAE training step against the one dense encoder matmul it cannot avoid.

The step is the trainer's own (`Trainer._accumulated_step`): `training_forward(x, dead_mask)`,
`backward`, `remove_parallel_decoder_gradient`, `clip_grad_norm_`, fused Adam, `zero_grad`, the
LR scheduler and `normalize_decoder`. It runs twice: with no latent dead (AuxK skipped) and with
`--dead-fraction` of the latents dead (AuxK runs).

Baseline ("floor"): one dense fp32 `x @ W_enc` of shape [batch, d_in] @ [d_in, d_sae], the
encoder matmul that picking the top k of every latent's pre-activation requires. Floor and steps
run interleaved (rotated order every round) and the reported ratio is the median of the per-round
ratios. Target: step / floor <= 1.5.

    python bench/train_step.py                      # d_in 384, 16x, k 32, batch 4096
    python bench/train_step.py --repeats 21 --json
    python bench/train_step.py --profile            # also the top ops of a step by self time
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from collections import defaultdict

import torch

try:
    from bench import _common as common
except ImportError:  # run as `python bench/train_step.py`
    import _common as common

from mistudio_core.hooks import HookPoint
from mistudio_core.sae import SAEConfig
from mistudio_core.train import TrainConfig, Trainer

TARGET_RATIO = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=11,
                        help="interleaved rounds measured (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first and discarded")
    parser.add_argument("--dead-fraction", type=float, default=0.05,
                        help="latents marked dead in the AuxK variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-piece timing")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top ops of one step (AuxK variant)")
    parser.add_argument("--no-external", action="store_true",
                        help="do not time sae_lens / sparsify even if installed")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


# ----- inputs ------------------------------------------------------------------------------------


def make_batch(batch: int, d_in: int, seed: int, device) -> torch.Tensor:
    """Activation-like data: a few strong directions, a mean offset and noise (the step's cost
    hardly depends on the values, but the top-k and AuxK paths see realistic spreads)."""
    generator = torch.Generator().manual_seed(seed)
    rank = max(1, d_in // 8)
    basis = torch.randn(rank, d_in, generator=generator)
    weights = torch.randn(batch, rank, generator=generator) * torch.linspace(3, 0.3, rank)
    x = weights @ basis / math.sqrt(rank) + 0.5 * torch.randn(batch, d_in, generator=generator)
    x += torch.randn(d_in, generator=generator)
    return x.to(device)


def make_trainer(args, device, run_dir: str, dead_fraction: float) -> tuple[Trainer, torch.Tensor]:
    """A Trainer as `train_sae` builds it, initialised on the batch, with a fixed dead set.
    Returns the trainer and the batch, already scaled by the trainer's input scale."""
    d_sae = args.d_in * args.expansion
    sae_config = SAEConfig(architecture="topk", d_in=args.d_in, d_sae=d_sae, k=args.k)
    steps = 1_000_000
    train_config = TrainConfig(total_tokens=args.batch * steps, batch_tokens=args.batch,
                               seed=args.seed)
    trainer = Trainer(sae_config, train_config, batches=None, hook=HookPoint(0, "resid_post"),
                      run_dir=run_dir, device=torch.device(device))
    x = make_batch(args.batch, args.d_in, args.seed, device)
    trainer._initialise_from(x)
    n_dead = round(dead_fraction * d_sae)
    if n_dead:
        generator = torch.Generator().manual_seed(args.seed + 1)
        dead = torch.randperm(d_sae, generator=generator)[:n_dead].to(device)
        trainer.tokens_since_fired[dead] = train_config.dead_window
    return trainer, x * trainer.sae.input_scale


# ----- the per-piece breakdown -------------------------------------------------------------------

# What the breakdown intercepts while the real trainer step runs: (label, owner, attribute).
# Owners are resolved at run time; a name the library no longer has is skipped, so the breakdown
# follows refactors of the library instead of re-implementing its step.
_SAE_METHODS = (
    ("forward: rest of training_forward (loss, metrics)", "training_forward"),
    ("forward: centring x - b_dec + top-k driver", "_topk_preactivations"),
    ("forward: encoder matmul + top-k (no grad)", "_topk_of_centered"),
    ("forward: AuxK (rest: dead-latent matmul, top-k, loss)", "_aux_k_loss"),
    ("optim: remove_parallel_decoder_gradient", "remove_parallel_decoder_gradient"),
    ("optim: normalize_decoder", "normalize_decoder"),
)
_MODULE_FUNCTIONS = (
    ("forward: select_preactivations (autograd wrapper)", "mistudio_core.sae.model",
     "select_preactivations"),
    ("forward: sparse_decode (embedding_bag)", "mistudio_core.sae.model", "sparse_decode"),
    ("optim: clip_grad_norm_", "torch.nn.utils", "clip_grad_norm_"),
)


class PieceTimer:
    """Exclusive wall time per intercepted call (a piece's time excludes the pieces it calls)."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.times: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    def wrap(self, label: str, function):
        def timed(*args, **kwargs):
            self.sync()
            frame = [time.perf_counter(), 0.0]  # start, time spent in nested pieces
            self._stack.append(frame)
            try:
                return function(*args, **kwargs)
            finally:
                self.sync()
                elapsed = time.perf_counter() - frame[0]
                self._stack.pop()
                self.times[label] += elapsed - frame[1]
                if self._stack:
                    self._stack[-1][1] += elapsed

        return timed


def timed_step(trainer: Trainer, x: torch.Tensor, sync) -> dict[str, float]:
    """One real `Trainer._accumulated_step`, with its pieces timed by interception."""
    import importlib

    timer = PieceTimer(sync)
    sae, optimizer, scheduler = trainer.sae, trainer.optimizer, trainer.scheduler
    restore = []
    for label, name in _SAE_METHODS:
        if hasattr(sae, name):
            setattr(sae, name, timer.wrap(label, getattr(sae, name)))
            restore.append((sae, name, None))
    for label, module_name, name in _MODULE_FUNCTIONS:
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            original = getattr(module, name)
            setattr(module, name, timer.wrap(label, original))
            restore.append((module, name, original))
    from mistudio_core.sae.sparse import SparseCodes

    from_topk = SparseCodes.__dict__.get("from_topk")
    if from_topk is not None:
        SparseCodes.from_topk = staticmethod(
            timer.wrap("forward: CSR codes (SparseCodes.from_topk)", SparseCodes.from_topk))
    backward = torch.Tensor.backward
    torch.Tensor.backward = timer.wrap("backward (all)", backward)
    for obj, name, label in ((optimizer, "step", "optim: Adam(fused=True).step"),
                             (optimizer, "zero_grad", "optim: zero_grad"),
                             (scheduler, "step", "optim: scheduler.step")):
        setattr(obj, name, timer.wrap(label, getattr(obj, name)))
        restore.append((obj, name, None))
    try:
        output = timer.wrap("step", trainer._accumulated_step)(x)
    finally:
        torch.Tensor.backward = backward
        if from_topk is not None:
            SparseCodes.from_topk = from_topk
        for obj, name, original in reversed(restore):
            if original is None:
                delattr(obj, name)  # drop the instance attribute, the class's method is back
            else:
                setattr(obj, name, original)
    times = dict(timer.times)
    step = times.pop("step")
    times["step: rest (trainer glue, autocast, merging)"] = step
    # Not part of the step but of every iteration: Trainer._track (its .item() syncs).
    since = trainer.tokens_since_fired.clone()
    sync()
    start = time.perf_counter()
    trainer._track(output, x.shape[0])
    sync()
    times["(outside step) Trainer._track"] = time.perf_counter() - start
    trainer.tokens_since_fired = since
    trainer._window.clear()
    return times


def breakdown(trainer: Trainer, x: torch.Tensor, buffer: torch.Tensor, repeats: int,
              sync) -> list[tuple[str, float]]:
    """Median seconds per piece over `repeats` steps, plus the shuffled-batch gather of
    `ShuffledBatches` (also outside the step)."""
    samples: dict[str, list[float]] = defaultdict(list)
    generator = torch.Generator().manual_seed(1)
    for _ in range(repeats):
        for name, seconds in timed_step(trainer, x, sync).items():
            samples[name].append(seconds)
        order = torch.randperm(buffer.shape[0], generator=generator)[: x.shape[0]]
        sync()
        start = time.perf_counter()
        buffer[order.to(buffer.device)]
        sync()
        samples["(outside step) batch gather from the shuffle buffer"].append(
            time.perf_counter() - start
        )
    order = sorted(samples, key=lambda n: (n.startswith("(outside"), n.startswith("step:"),
                                           _PHASES.index(n.split(":")[0].split(" ")[0])
                                           if n.split(":")[0].split(" ")[0] in _PHASES else 9))
    return [(name, common.median(samples[name])) for name in order]


_PHASES = ("forward", "backward", "optim")


def backward_profile(trainer: Trainer, x: torch.Tensor, steps: int = 3) -> list[tuple[str, float]]:
    """torch.profiler's time per autograd node during backward, averaged over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    dead_mask = trainer.tokens_since_fired >= trainer.config.dead_window
    totals: dict[str, float] = defaultdict(float)
    for _ in range(steps):
        output = trainer.sae.training_forward(x, dead_mask)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            output.loss.backward()
        trainer.optimizer.zero_grad(set_to_none=True)
        for event in prof.events():
            prefix = "autograd::engine::evaluate_function: "
            if event.name.startswith(prefix):
                totals[event.name[len(prefix):]] += event.cpu_time_total / 1e6 / steps
    return sorted(totals.items(), key=lambda item: -item[1])


def top_ops(trainer: Trainer, x: torch.Tensor, rows: int = 20) -> str:
    """torch.profiler table of one whole trainer step (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    trainer._accumulated_step(x)
    activities = [ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        trainer._accumulated_step(x)
    key = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ----- other libraries, when installed -----------------------------------------------------------


def sparsify_step(args, device, x: torch.Tensor, dead_fraction: float):
    """A sparsify (EleutherAI) TopK step on the same shapes: forward with its fused encoder,
    fvu + auxk_alpha * auxk_loss, backward, parallel-gradient removal, Adam, unit-norm decoder.
    Untested adapter: written against sparsify's public API, which it may have changed."""
    sparsify = common.optional_module("sparsify")
    if sparsify is None:
        return None, "not installed"
    coder_cls = getattr(sparsify, "SparseCoder", None) or sparsify.Sae
    config_cls = getattr(sparsify, "SparseCoderConfig", None) or sparsify.SaeConfig
    sae = coder_cls(args.d_in, config_cls(expansion_factor=args.expansion, k=args.k),
                    device=device, dtype=torch.float32)
    d_sae = sae.num_latents
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(d_sae / 2**14))
    dead_mask = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead_mask[: round(dead_fraction * d_sae)] = True

    def step():
        out = sae(x, dead_mask=dead_mask)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step, f"sparsify {getattr(sparsify, '__version__', '?')}"


def sae_lens_step(args, device, x: torch.Tensor, dead_fraction: float):
    """A SAELens TopKTrainingSAE step (training_forward_pass, backward, Adam). Untested adapter:
    SAELens's training API changes between versions."""
    sae_lens = common.optional_module("sae_lens")
    if sae_lens is None:
        return None, "not installed"
    d_sae = args.d_in * args.expansion
    cfg_cls = sae_lens.TopKTrainingSAEConfig
    cfg = cfg_cls(d_in=args.d_in, d_sae=d_sae, k=args.k, device=str(device))
    sae = sae_lens.TopKTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / math.sqrt(d_sae / 2**14))
    dead_mask = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead_mask[: round(dead_fraction * d_sae)] = True
    from sae_lens.saes.sae import TrainStepInput

    known = {"sae_in": x, "coefficients": {}, "current_l1_coefficient": 0.0,
             "dead_neuron_mask": dead_mask, "n_training_steps": 0}
    names = [f.name for f in dataclasses.fields(TrainStepInput)]
    step_input = TrainStepInput(**{n: known[n] for n in names if n in known})

    def step():
        output = sae.training_forward_pass(step_input)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, f"sae_lens {getattr(sae_lens, '__version__', '?')}"


# ----- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sync = common.synchronizer(device)
    d_sae = args.d_in * args.expansion
    quiet = args.json

    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as run_dir:
        common.log("building trainers ...", quiet)
        live, x = make_trainer(args, device, run_dir + "/live", 0.0)
        dying, x_dead = make_trainer(args, device, run_dir + "/dead", args.dead_fraction)
        n_dead = int((dying.tokens_since_fired >= dying.config.dead_window).sum())
        w_enc = torch.randn(args.d_in, d_sae, device=device) / math.sqrt(args.d_in)
        raw = make_batch(args.batch, args.d_in, args.seed, device)

        candidates = {
            "floor": lambda: raw @ w_enc,
            "step": lambda: live._accumulated_step(x),
            "step_auxk": lambda: dying._accumulated_step(x_dead),
        }
        external = {}
        if not args.no_external:
            for name, factory in (("sparsify", sparsify_step), ("sae_lens", sae_lens_step)):
                try:
                    fn, note = factory(args, device, raw, args.dead_fraction)
                except Exception as exc:  # an adapter for an API we could not test
                    fn, note = None, f"adapter failed: {type(exc).__name__}: {exc}"
                external[name] = note
                if fn is not None:
                    candidates[name] = fn
        else:
            external = {"sparsify": "skipped", "sae_lens": "skipped"}

        common.log(f"timing {len(candidates)} candidates x {args.repeats} rounds ...", quiet)
        times = common.interleaved(candidates, args.repeats, args.warmup, sync)
        floor = times["floor"]
        results = {}
        for name, values in times.items():
            results[name] = {
                "median_ms": 1e3 * common.median(values),
                "spread": common.spread(values),
                "ratio_to_floor": common.paired_ratio(values, floor),
            }

        pieces, backward_nodes, breakdown_error = [], [], None
        if not args.no_breakdown:
            common.log("timing the pieces of a step ...", quiet)
            buffer = make_batch(min(1 << 18, 64 * args.batch), args.d_in, args.seed + 2, device)
            piece_repeats = min(args.repeats, 5)
            try:
                pieces = {
                    "no_dead": breakdown(live, x, buffer, piece_repeats, sync),
                    "auxk": breakdown(dying, x_dead, buffer, piece_repeats, sync),
                }
                backward_nodes = backward_profile(dying, x_dead)
            except Exception as exc:  # pieces mirror library internals that may have moved
                breakdown_error = f"{type(exc).__name__}: {exc}"
            out = torch.empty(args.batch, d_sae, device=device)
            floor_variants = common.interleaved(
                {"linear": lambda: torch.nn.functional.linear(raw, live.sae.encoder_weight),
                 "preallocated": lambda: torch.mm(raw, w_enc, out=out),
                 "floor": lambda: raw @ w_enc}, piece_repeats, 1, sync)
            del out
            linear_ratio = common.paired_ratio(floor_variants["linear"], floor_variants["floor"])
            prealloc_ratio = common.paired_ratio(floor_variants["preallocated"],
                                                 floor_variants["floor"])
        profile_table = top_ops(dying, x_dead) if args.profile else None

    step_ratio = results["step"]["ratio_to_floor"]
    auxk_ratio = results["step_auxk"]["ratio_to_floor"]
    document = {
        "benchmark": "train_step",
        "config": {"d_in": args.d_in, "d_sae": d_sae, "k": args.k, "batch": args.batch,
                   "repeats": args.repeats, "device": str(device), "dead_latents": n_dead},
        "environment": common.environment(),
        "baseline": "one dense fp32 matmul [batch, d_in] @ [d_in, d_sae]",
        "target_ratio": TARGET_RATIO,
        "results": results,
        "pass": {"step": step_ratio <= TARGET_RATIO, "step_auxk": auxk_ratio <= TARGET_RATIO},
        "external": external,
    }
    if not args.no_breakdown:
        document["breakdown_ms"] = {
            variant: {name: 1e3 * s for name, s in rows} for variant, rows in pieces.items()
        } if pieces else None
        document["backward_profile_ms"] = {name: 1e3 * s for name, s in backward_nodes}
        document["breakdown_error"] = breakdown_error
        document["linear_layout_vs_floor"] = linear_ratio
        document["preallocated_output_vs_floor"] = prealloc_ratio
    if profile_table:
        document["profile_table"] = profile_table

    text = [
        f"TopK training step: d_in {args.d_in}, d_sae {d_sae}, k {args.k}, batch {args.batch}, "
        f"{device}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds",
        f"baseline (floor): one dense fp32 [{args.batch}, {args.d_in}] @ [{args.d_in}, {d_sae}]",
        "",
        common.table(
            ["variant", "median ms", "spread", "x floor", f"target <= {TARGET_RATIO}"],
            [
                ["floor (dense x @ W_enc)", results["floor"]["median_ms"],
                 results["floor"]["spread"], 1.0, ""],
                ["step, no dead latents", results["step"]["median_ms"],
                 results["step"]["spread"], step_ratio,
                 common.verdict(step_ratio <= TARGET_RATIO)],
                [f"step, {n_dead} dead (AuxK)", results["step_auxk"]["median_ms"],
                 results["step_auxk"]["spread"], auxk_ratio,
                 common.verdict(auxk_ratio <= TARGET_RATIO)],
                *([name, results[name]["median_ms"], results[name]["spread"],
                   results[name]["ratio_to_floor"], ""]
                  for name in ("sparsify", "sae_lens") if name in results),
            ],
        ),
        "",
        "other libraries: " + ", ".join(f"{k}: {v}" for k, v in external.items()),
    ]
    if not args.no_breakdown:
        text.append("")
        if breakdown_error:
            text.append(f"breakdown unavailable: {breakdown_error}")
        else:
            floor_ms = results["floor"]["median_ms"]
            names = [name for name, _ in pieces["no_dead"]]
            no_dead = dict(pieces["no_dead"])
            auxk = dict(pieces["auxk"])
            rows = [[name, 1e3 * no_dead[name], 1e3 * auxk[name], 1e3 * auxk[name] / floor_ms]
                    for name in names]
            inside = [n for n in names if not n.startswith("(outside")]
            rows.append(["whole step (sum of the pieces)", 1e3 * sum(no_dead[n] for n in inside),
                         1e3 * sum(auxk[n] for n in inside),
                         1e3 * sum(auxk[n] for n in inside) / floor_ms])
            text.append("breakdown: real trainer steps, pieces timed by intercepting their calls "
                        "(exclusive times, median per piece):")
            text.append(common.table(["piece", "ms no dead", "ms AuxK", "AuxK x floor"], rows))
            text.append("")
            text.append("backward by autograd node (torch.profiler, AuxK variant, ms):")
            text.append(common.table(["node", "ms"],
                                     [[n, 1e3 * s] for n, s in backward_nodes[:12]]))
            text.append("")
            text.append(f"floor variants: F.linear with the library's [d_sae, d_in] encoder "
                        f"layout {linear_ratio:.2f} x floor; torch.mm into a preallocated output "
                        f"{prealloc_ratio:.2f} x floor (the difference is the output's allocation)")
    if profile_table:
        text += ["", "torch.profiler, one step (AuxK variant):", profile_table]
    common.emit(document, "\n".join(text), args.json)
    return document


if __name__ == "__main__":
    main()
