"""Benchmark: the quality of a TopK SAE trained by miStudio on real activations of the demo model.

The demo model (`mistudio_core.demo.ensure_demo_model()`, built on first use) and its held-out
SAE corpus (`demo_corpus_path()`) are split by document: every `--eval-every`-th document goes
to an evaluation file that no SAE trains on, the rest to a training file.

1. miStudio: `mistudio_core.runs.train_sae(TrainJob(..., cache=...))` trains a TopK SAE (k 32,
   16x) on `--tokens` activations at `--hook`, extracting them once into an activation cache.
   It is evaluated with `mistudio_core.runs.evaluate_saved` (`mistudio_core.evals`) on
   `--eval-tokens` tokens of the evaluation file: FVE, dead % (latents that never fire on those
   tokens), L0 and CE loss recovered.
2. sparsify (EleutherAI), when importable: its SparseCoder trained on exactly the same batches
   (read back from the same cache, same shuffle, same order), with sparsify's recipe (raw
   inputs, b_dec at the first batch's mean, loss fvu + auxk_loss / 32, Adam at
   2e-4 / sqrt(d_sae / 2^14), linear warm-up then linear decay, no gradient clipping); then
   converted to a miStudio SAE and evaluated by the same `evaluate`. The dead-latent threshold
   and the warm-up are miStudio's, so that AuxK has the same chance to act in a short run.
3. `--reference` (off by default): the same recipe in plain dense PyTorch (nn.Linear encoder,
   top-k, embedding_bag decoder), a stand-in for sparsify where it is not installed.

Targets: FVE(miStudio) >= FVE(sparsify) (n/a when sparsify is not installed; the reference is
reported against the same bar) and dead < 1%.

    python bench/quality.py                       # 1M training tokens, layers.2.resid_post
    python bench/quality.py --tokens 2000000 --reference --json
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

try:
    from bench import _common as common
except ImportError:  # run as `python bench/quality.py`
    import _common as common

from mistudio_core import runs
from mistudio_core.activation_cache import ActivationCache, CachedActivationSource
from mistudio_core.activations import ExtractionConfig, ModelActivationSource, ShuffledBatches
from mistudio_core.corpus import Corpus
from mistudio_core.evals import evaluate
from mistudio_core.hooks import HookPoint
from mistudio_core.models import ModelSpec, load_config, load_model, resolve_device, resolve_dtype
from mistudio_core.sae import SAEConfig, SparseAutoencoder
from mistudio_core.train import TrainConfig

MAX_DEAD_PCT = 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=600_000, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--hook", default="layers.2.resid_post")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--eval-every", type=int, default=5,
                        help="every n-th corpus document is held out for evaluation")
    parser.add_argument("--dead-after-tokens", type=int, default=None,
                        help="TrainConfig.dead_after_tokens (tokens without firing before a "
                        "latent counts as dead and AuxK trains it); default: the library's")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="TrainConfig.warmup_steps for every trainer; default: the library's")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true",
                        help="also train the dense reference implementation of sparsify's recipe")
    parser.add_argument("--work-dir", default=None,
                        help="keep the split corpus, cache and SAEs here (reused on reruns)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    return parser.parse_args(argv)


# ----- data --------------------------------------------------------------------------------------


def split_corpus(source: Path, work: Path, every: int) -> tuple[Path, Path, int, int]:
    """Write train.jsonl / eval.jsonl (every n-th document held out); return their paths and
    document counts."""
    train_path, eval_path = work / "train.jsonl", work / "eval.jsonl"
    n_train = n_eval = 0
    with source.open(encoding="utf-8") as lines, train_path.open("w", encoding="utf-8") as train, \
            eval_path.open("w", encoding="utf-8") as held:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            if index % every == every - 1:
                held.write(line)
                n_eval += 1
            else:
                train.write(line)
                n_train += 1
    return train_path, eval_path, n_train, n_eval


def same_batches(job: runs.TrainJob, hook: HookPoint, d_in: int, device: torch.device):
    """The batches `train_sae` trained on, in the same order, read back from its cache."""
    corpus = Corpus.open(job.corpus, job.text_field)
    dtype = resolve_dtype(job.model.dtype, device)
    cache = ActivationCache(Path(job.cache), runs._cache_key(job, corpus, [hook], d_in), dtype)

    def extractor():
        model = load_model(job.model, up_to_layer=hook.layer)
        return ModelActivationSource(model, corpus, [hook], job.extraction)

    source = CachedActivationSource(cache, extractor)
    batches = ShuffledBatches(source, [hook], job.train.batch_tokens,
                              runs._block_chunks(job, d_in), job.train.seed, device)
    return cache, batches


def spectrum(cache: ActivationCache, hook: HookPoint, max_tokens: int = 100_000) -> dict:
    """How many principal directions hold the activations' variance (from the cached chunks):
    with very few, FVE is easy and most latents of a wide SAE have nothing to encode."""
    parts, n = [], 0
    for index in range(cache.n_chunks):
        if n >= max_tokens:
            break
        part = cache.chunk(index).activations[hook].double()
        parts.append(part)
        n += part.shape[0]
    x = torch.cat(parts)
    centered = x - x.mean(0)
    eigen = torch.linalg.eigvalsh(centered.T @ centered / x.shape[0]).flip(0).clamp_min(0)
    share = eigen.cumsum(0) / eigen.sum()
    return {
        "tokens": int(x.shape[0]),
        "dims_for_90pct_variance": int((share < 0.9).sum()) + 1,
        "dims_for_99pct_variance": int((share < 0.99).sum()) + 1,
        "participation_ratio": float(eigen.sum() ** 2 / eigen.pow(2).sum()),
    }


# ----- sparsify, and a dense re-implementation of its recipe -------------------------------------


class ReferenceTopK(nn.Module):
    """sparsify's SparseCoder in plain PyTorch, with the same interface (forward(x, dead_mask)
    -> fvu, auxk_loss, latent_indices; remove_gradient_parallel_to_decoder_directions;
    set_decoder_norm_to_unit_norm): dense encoder, ReLU then top-k, embedding_bag decoder."""

    def __init__(self, d_in: int, num_latents: int, k: int, device) -> None:
        super().__init__()
        self.k = k
        self.num_latents = num_latents
        self.encoder = nn.Linear(d_in, num_latents, device=device)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    def decode(self, acts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        decoded = F.embedding_bag(indices, self.W_dec, per_sample_weights=acts, mode="sum")
        return decoded + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        pre = F.relu(self.encoder(x - self.b_dec))
        acts, indices = pre.topk(self.k, sorted=False)
        error = x - self.decode(acts, indices)
        total_variance = (x - x.mean(0)).pow(2).sum()
        auxk = x.new_zeros(())
        if dead_mask is not None and (n_dead := int(dead_mask.sum())) > 0:
            k_aux = x.shape[-1] // 2
            scale = min(n_dead / k_aux, 1.0)
            aux_acts, aux_indices = torch.where(dead_mask[None], pre, -torch.inf).topk(
                min(k_aux, n_dead), sorted=False)
            e_hat = self.decode(aux_acts, aux_indices)  # b_dec included, as sparsify does
            auxk = scale * (e_hat - error.detach()).pow(2).sum() / total_variance
        fvu = error.pow(2).sum() / total_variance
        return SimpleNamespace(fvu=fvu, auxk_loss=auxk, latent_indices=indices)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True) + torch.finfo(
            self.W_dec.dtype).eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        parallel = (self.W_dec.grad * self.W_dec.data).sum(1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data


def make_sparsify(d_in: int, args, device):
    sparsify = common.optional_module("sparsify")
    if sparsify is None:
        return None
    coder_cls = getattr(sparsify, "SparseCoder", None) or sparsify.Sae
    config_cls = getattr(sparsify, "SparseCoderConfig", None) or sparsify.SaeConfig
    return coder_cls(d_in, config_cls(expansion_factor=args.expansion, k=args.k), device=device,
                     dtype=torch.float32)


def train_sparsify_recipe(sae: nn.Module, batches: ShuffledBatches, hook: HookPoint,
                          config: TrainConfig, log) -> float:
    """sparsify's training loop on our batches; returns the wall time in seconds."""
    steps = config.total_steps
    lr = 2e-4 / math.sqrt(sae.num_latents / 2**14)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    warmup = config.warmup

    def factor(step: int) -> float:  # transformers' get_linear_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=sae.b_dec.device)
    stream = batches.batches()
    start = time.perf_counter()
    for step in range(steps):
        x = next(stream)[0][hook].float()
        if step == 0:
            with torch.no_grad():
                sae.b_dec.data = x.mean(0).to(sae.b_dec.dtype)
        dead_mask = since_fired >= config.dead_window
        out = sae(x, dead_mask=dead_mask)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        sae.set_decoder_norm_to_unit_norm()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps} fvu {out.fvu.item():.4f} "
                f"dead {100 * dead_mask.float().mean().item():.2f}%")
    return time.perf_counter() - start


def as_mistudio_sae(sae: nn.Module, k: int) -> SparseAutoencoder:
    """A sparsify-style coder as a miStudio SparseAutoencoder (same maths: b_dec subtracted
    first, the top k of the ReLU pre-activations), for `mistudio_core.evals.evaluate`."""
    d_sae, d_in = sae.encoder.weight.shape
    ours = SparseAutoencoder(SAEConfig("topk", d_in=d_in, d_sae=d_sae, k=k),
                             device=sae.encoder.weight.device)
    with torch.no_grad():
        ours.encoder_weight.copy_(sae.encoder.weight)
        ours.b_enc.copy_(sae.encoder.bias)
        ours.W_dec.copy_(sae.W_dec)
        ours.b_dec.copy_(sae.b_dec)
    return ours


# ----- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet = args.json

    def log(message: str) -> None:
        common.log(message, quiet)

    from mistudio_core.demo import demo_corpus_path, ensure_demo_model

    log("ensuring the demo model (built on first use; a few minutes) ...")
    demo_dir = ensure_demo_model()
    temporary = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        temporary = tempfile.mkdtemp(prefix="bench-quality-")
        work = Path(temporary)
    try:
        document = run(args, demo_dir, demo_corpus_path(demo_dir), work, log)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    common.emit(document, report_text(document), args.json)
    return document


def run(args, demo_dir: Path, corpus_path: Path, work: Path, log) -> dict:
    train_path, eval_path, n_train_docs, n_eval_docs = split_corpus(corpus_path, work,
                                                                    args.eval_every)
    hook = HookPoint.parse(args.hook)
    spec = ModelSpec(str(demo_dir), device=args.device)
    device = resolve_device(args.device)
    d_in = int(load_config(spec).hidden_size)
    overrides = {name: value for name, value in (("dead_after_tokens", args.dead_after_tokens),
                                                  ("warmup_steps", args.warmup_steps))
                 if value is not None}
    train_config = TrainConfig(total_tokens=args.tokens, batch_tokens=args.batch_tokens,
                               seed=args.seed, **overrides)
    extraction = ExtractionConfig()
    job = runs.TrainJob(
        model=spec, hook=hook.name, corpus=str(train_path), out=str(work / "mistudio-sae"),
        architecture="topk", k=args.k, expansion=args.expansion, extraction=extraction,
        train=train_config, cache=str(work / "cache"),
    )

    def callback(kind: str, payload: dict) -> None:
        if kind == "metrics":
            log(f"  step {payload['step']}/{train_config.total_steps} fve {payload['fve']:.4f} "
                f"dead {payload['dead_pct']:.2f}% {payload['tokens_per_s']:.0f} tok/s")
        elif kind == "log":
            log(f"  {payload.get('message', '')}")

    log(f"training the miStudio SAE on {args.tokens} tokens of {hook} ...")
    started = time.perf_counter()
    trained = runs.train_sae(job, callback)
    mistudio_seconds = time.perf_counter() - started
    log(f"evaluating it on {args.eval_tokens} held-out tokens ...")
    started = time.perf_counter()
    ours = runs.evaluate_saved(trained.path, spec, str(eval_path), args.eval_tokens)
    eval_seconds = time.perf_counter() - started

    cache, _ = same_batches(job, hook, d_in, device)
    cache_tokens = cache.n_tokens
    data_spectrum = spectrum(cache, hook)
    comparators: dict[str, dict] = {}
    factories = {"sparsify": lambda: make_sparsify(d_in, args, device)}
    if args.reference:
        factories["reference (dense, sparsify's recipe)"] = lambda: ReferenceTopK(
            d_in, d_in * args.expansion, args.k, device)
    lm = None
    for name, factory in factories.items():
        torch.manual_seed(args.seed)
        try:
            sae = factory()
        except Exception as exc:  # an adapter for an API we could not test
            comparators[name] = {"status": f"adapter failed: {type(exc).__name__}: {exc}"}
            continue
        if sae is None:
            comparators[name] = {"status": "not installed"}
            continue
        log(f"training {name} on the same cached batches ...")
        _, batches = same_batches(job, hook, d_in, device)
        seconds = train_sparsify_recipe(sae, batches, hook, train_config, log)
        if lm is None:
            lm = load_model(spec, with_lm_head=True)
        eval_extraction = ExtractionConfig(context_size=extraction.context_size, batch_windows=8,
                                           prepend_bos=extraction.prepend_bos)
        result = evaluate(as_mistudio_sae(sae, args.k).to(lm.device), lm,
                          Corpus.open(eval_path), hook, eval_extraction, args.eval_tokens)
        comparators[name] = {"status": "ok", "train_seconds": seconds, "eval": result.to_dict()}

    best_other = max((c["eval"]["fve"] for n, c in comparators.items()
                      if n == "sparsify" and c["status"] == "ok"), default=None)
    reference = comparators.get("reference (dense, sparsify's recipe)", {})
    return {
        "benchmark": "quality",
        "config": {"tokens": args.tokens, "eval_tokens": args.eval_tokens, "hook": hook.name,
                   "d_in": d_in, "d_sae": d_in * args.expansion, "k": args.k,
                   "batch_tokens": args.batch_tokens, "steps": train_config.total_steps,
                   "dead_after_tokens": train_config.dead_window,
                   "device": str(device), "train_documents": n_train_docs,
                   "eval_documents": n_eval_docs, "cached_tokens": cache_tokens,
                   "demo_model": str(demo_dir)},
        "environment": common.environment(),
        "activation_spectrum": data_spectrum,
        "mistudio": {"train_seconds": mistudio_seconds, "eval_seconds": eval_seconds,
                     "final_train_metrics":
                     trained.final_metrics, "eval": ours.to_dict()},
        "comparators": comparators,
        "targets": {
            "fve_at_least_sparsify": None if best_other is None else ours.fve >= best_other,
            "fve_at_least_reference": (ours.fve >= reference["eval"]["fve"]
                                       if reference.get("status") == "ok" else None),
            "dead_below_1pct": ours.dead_pct < MAX_DEAD_PCT,
        },
    }


def spectrum_line(spec: dict, d_in: int) -> str:
    line = (f"activations: {spec['dims_for_90pct_variance']} principal directions hold 90% of "
            f"the variance, {spec['dims_for_99pct_variance']} hold 99% (participation ratio "
            f"{spec['participation_ratio']:.1f}, d_in {d_in})")
    if spec["dims_for_99pct_variance"] < d_in / 8:
        line += ("; with so few, FVE is easy and many latents of a wide SAE stay dead "
                 "whatever the trainer")
    return line


def report_text(doc: dict) -> str:
    c, ours = doc["config"], doc["mistudio"]
    rows = [["miStudio (train_sae)", ours["eval"]["fve"], ours["eval"]["dead_pct"],
             ours["eval"]["l0"], ours["eval"].get("ce_loss_recovered") or float("nan"),
             ours["train_seconds"]]]
    notes = []
    for name, comp in doc["comparators"].items():
        if comp["status"] == "ok":
            e = comp["eval"]
            rows.append([name, e["fve"], e["dead_pct"], e["l0"],
                         e.get("ce_loss_recovered") or float("nan"), comp["train_seconds"]])
        else:
            notes.append(f"{name}: {comp['status']}")
    t = doc["targets"]
    lines = [
        f"SAE quality on the demo model: {c['hook']}, TopK k {c['k']}, d_sae {c['d_sae']}, "
        f"{c['tokens']} training tokens ({c['steps']} steps of {c['batch_tokens']}), "
        f"evaluated on {ours['eval']['n_tokens']} held-out tokens; {c['device']}",
        f"corpus: {c['train_documents']} training / {c['eval_documents']} held-out documents; "
        f"a latent counts as dead in training after {c['dead_after_tokens']} tokens without "
        f"firing (miStudio's final training metrics: dead "
        f"{ours['final_train_metrics'].get('dead_pct', float('nan')):.2f}%)",
        "",
        common.table(["SAE", "FVE", "dead %", "L0", "CE recovered", "train s"], rows),
        f"(miStudio's evaluation took {ours['eval_seconds']:.0f} s)",
        "",
        spectrum_line(doc["activation_spectrum"], c["d_in"]),
        *notes,
        f"target FVE >= sparsify's: {common.verdict(t['fve_at_least_sparsify'])}"
        + ("" if t["fve_at_least_sparsify"] is not None else " (sparsify not installed)"),
    ]
    if t["fve_at_least_reference"] is not None:
        lines.append(f"FVE >= dense reference of sparsify's recipe: "
                     f"{common.verdict(t['fve_at_least_reference'])}")
    lines.append(f"target dead < {MAX_DEAD_PCT}%: {common.verdict(t['dead_below_1pct'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
