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
import inspect
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
from mistudio_core.sae.sparse import SparseCodes, select_preactivations, sparse_decode
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
        trainer.tokens_since_fired[dead] = train_config.dead_after_tokens
    return trainer, x * trainer.sae.input_scale


# ----- the per-piece breakdown -------------------------------------------------------------------


def timed_pieces(trainer: Trainer, x: torch.Tensor, sync) -> dict[str, float]:
    """One step cut into its pieces (mirroring `training_forward` and `_accumulated_step` for a
    TopK SAE), each timed on its own. Seconds per piece."""
    sae, config = trainer.sae, trainer.sae.config
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def mark(name: str) -> None:
        sync()
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock[0]
        clock[0] = now

    sync()
    clock[0] = time.perf_counter()
    dead_mask = trainer.tokens_since_fired >= trainer.config.dead_after_tokens
    with torch.no_grad():
        values, indices = sae._topk_preactivations(x, config.k)
    mark("encoder: dense matmul + top-k (no grad)")
    with torch.no_grad():
        codes = SparseCodes.from_topk(values, indices, config.d_sae)
    mark("encoder: CSR codes (sort by latent)")
    chosen = select_preactivations(
        x - sae.b_dec, sae.encoder_weight, sae.b_enc, codes.values, codes.cols, codes.crow
    )
    codes.values = torch.nn.functional.relu(chosen)
    mark("encoder: select_preactivations + relu")
    x_hat = sparse_decode(codes, sae.W_dec) + sae.b_dec
    mark("decoder: sparse_decode (embedding_bag)")
    fired = torch.bincount(codes.cols[codes.values > 0], minlength=config.d_sae)
    l0 = (codes.values > 0).sum() / x.shape[0]
    error = x - x_hat
    squared = error.pow(2).sum()
    total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = squared / total_variance
    mark("loss: FVU + metrics (bincount, l0)")
    aux = sae._aux_k_loss(x, error.detach(), dead_mask, total_variance)
    loss = fvu + aux
    mark("AuxK forward (dead latents)")
    loss.backward()
    mark("backward (all)")
    sae.remove_parallel_decoder_gradient()
    mark("remove_parallel_decoder_gradient")
    torch.nn.utils.clip_grad_norm_(sae.parameters(), trainer.config.grad_clip)
    mark("clip_grad_norm_")
    trainer.optimizer.step()
    mark("Adam(fused=True).step")
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    mark("zero_grad + scheduler.step")
    sae.normalize_decoder()
    mark("normalize_decoder")
    # Not part of the step, but of every training iteration: Trainer._track (5 .item() syncs)
    # and the shuffled-batch gather of ShuffledBatches.
    since = trainer.tokens_since_fired.clone()
    since += x.shape[0]
    since[fired > 0] = 0
    for value in (loss, squared, fvu, l0, aux):
        value.item()
    mark("(outside step) Trainer._track metrics")
    return times


def breakdown(trainer: Trainer, x: torch.Tensor, buffer: torch.Tensor, repeats: int,
              sync) -> list[tuple[str, float]]:
    """Median seconds per piece over `repeats` steps, plus the batch gather."""
    samples: dict[str, list[float]] = defaultdict(list)
    generator = torch.Generator().manual_seed(1)
    for _ in range(repeats):
        for name, seconds in timed_pieces(trainer, x, sync).items():
            samples[name].append(seconds)
        order = torch.randperm(buffer.shape[0], generator=generator)[: x.shape[0]]
        sync()
        start = time.perf_counter()
        buffer[order.to(buffer.device)]
        sync()
        samples["(outside step) batch gather from the shuffle buffer"].append(
            time.perf_counter() - start
        )
    return [(name, common.median(values)) for name, values in samples.items()]


def backward_profile(trainer: Trainer, x: torch.Tensor, steps: int = 3) -> list[tuple[str, float]]:
    """torch.profiler's time per autograd node during backward, averaged over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    dead_mask = trainer.tokens_since_fired >= trainer.config.dead_after_tokens
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
        for hook in ("remove_gradient_parallel_to_decoder_directions",):
            if hasattr(sae, hook) and "normalize" in str(inspect.signature(getattr(sae, hook))):
                getattr(sae, hook)()
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
        n_dead = int((dying.tokens_since_fired >= dying.config.dead_after_tokens).sum())
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
            try:
                pieces = {
                    "no_dead": breakdown(live, x, buffer, args.repeats, sync),
                    "auxk": breakdown(dying, x_dead, buffer, args.repeats, sync),
                }
                backward_nodes = backward_profile(dying, x_dead)
            except Exception as exc:  # pieces mirror library internals that may have moved
                breakdown_error = f"{type(exc).__name__}: {exc}"
            floor_linear = common.interleaved(
                {"linear": lambda: torch.nn.functional.linear(raw, live.sae.encoder_weight),
                 "floor": lambda: raw @ w_enc}, args.repeats, 1, sync)
            linear_ratio = common.paired_ratio(floor_linear["linear"], floor_linear["floor"])
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
            rows.append(["sum of the step's pieces", 1e3 * sum(no_dead[n] for n in inside),
                         1e3 * sum(auxk[n] for n in inside),
                         1e3 * sum(auxk[n] for n in inside) / floor_ms])
            text.append("breakdown (manual timing of each piece, median per piece):")
            text.append(common.table(["piece", "ms no dead", "ms AuxK", "AuxK x floor"], rows))
            text.append("")
            text.append("backward by autograd node (torch.profiler, AuxK variant, ms):")
            text.append(common.table(["node", "ms"],
                                     [[n, 1e3 * s] for n, s in backward_nodes[:12]]))
            text.append("")
            text.append(f"F.linear with the library's [d_sae, d_in] encoder layout: "
                        f"{linear_ratio:.2f} x floor")
    if profile_table:
        text += ["", "torch.profiler, one step (AuxK variant):", profile_table]
    common.emit(document, "\n".join(text), args.json)
    return document


if __name__ == "__main__":
    main()
