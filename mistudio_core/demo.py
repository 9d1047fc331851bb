"""The offline demo model: a small GPT-2 trained on the standard library's docstrings.

Machines without network (and every test) still need a real language model to train SAEs on, so
miStudio builds one locally from text that every Python installation carries: the docstrings of
its standard library. The build is

1. corpus: every module, class and function docstring of the stdlib's `.py` files (sorted walk,
   test suites, IDLE, lib2to3, generated codec tables and site-packages skipped), cleaned and
   deduplicated; each document goes, by a hash of its text, either to the LM's training text or
   to a held-out SAE corpus that is saved as `corpus.jsonl` beside the model, so SAEs are trained
   and evaluated on text the model never saw;
2. tokenizer: byte-level BPE (GPT-2 style, `<|endoftext|>` as bos/eos/pad/unk) trained on the
   LM's text;
3. model: a 4-layer GPT-2 trained with AdamW (linear warm-up, cosine decay) on that text packed
   into 128-token contexts separated by `<|endoftext|>`, on CPU, for a few minutes.

Everything is seeded and visited in a fixed order, so one machine always produces the same
weights. The result is a Hugging Face directory (`AutoModelForCausalLM` / `AutoTokenizer` load
it) plus `mistudio-demo.json`, which records the recipe, losses and corpus statistics and marks
the build complete. Builds happen in a staging sibling directory under a file lock and are
renamed into place at the end, so a killed build never leaves a half-made cache and concurrent
callers build once.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mistudio_core.errors import MistudioError
from mistudio_core.model_ids import DEMO_MODEL_ALIAS as DEMO_MODEL_ALIAS  # re-exported

DEMO_BUILD_VERSION = 1
"""Bumped when the build's code changes what it makes (the recipe is compared field by field)."""

MARKER_NAME = "mistudio-demo.json"
CORPUS_NAME = "corpus.jsonl"
END_OF_TEXT = "<|endoftext|>"

_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "site-packages", "encodings", "__pycache__"}
)
"""Test suites, IDLE and lib2to3 are not library documentation; `encodings` holds ~100 generated
codec modules with near-identical docstrings; site-packages differs from machine to machine."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", CORPUS_NAME, MARKER_NAME)
_MAX_THREADS = 16
"""A 4M-parameter model gains nothing from more threads; on big servers more only adds overhead."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model's weights (recorded in `mistudio-demo.json`).

    Chosen by measurement on two CPU cores: 440 steps of 8 x 128 tokens take about two minutes
    and see each LM-training token about twice; at this budget batches of 8 beat 16, and a peak
    learning rate of 1.2e-3 beat both 8e-4 and 2e-3.
    """

    seed: int = 0
    min_doc_chars: int = 40
    held_out_fraction: float = 0.5
    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 256
    context_size: int = 128
    batch_size: int = 8
    steps: int = 440
    learning_rate: float = 1.2e-3
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    eval_contexts: int = 64


DEMO_RECIPE = DemoRecipe()


def default_demo_dir() -> Path:
    """Where the demo model is cached: `$MISTUDIO_DEMO_DIR`, else the user's XDG cache."""
    explicit = os.environ.get("MISTUDIO_DEMO_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "mistudio" / f"demo-model-v{DEMO_BUILD_VERSION}"


def demo_corpus_path(model_dir: Path | None = None) -> Path:
    """The held-out SAE corpus (`{"text": ...}` per line) saved inside a demo model directory."""
    return Path(model_dir or default_demo_dir()) / CORPUS_NAME


def ensure_demo_model() -> Path:
    """The default demo model's directory, built first if it is not cached yet."""
    return build_demo_model()


def build_demo_model(
    out_dir: Path | None = None,
    *,
    steps: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Build the demo model into `out_dir` (default: `default_demo_dir()`) and return that path.

    A directory that already holds a complete build of the same recipe is returned at once
    unless `force`. `steps` overrides the number of training steps (tests use a few dozen);
    `progress` receives short status lines.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_demo_dir()
    recipe = DEMO_RECIPE if steps is None else replace(DEMO_RECIPE, steps=steps)
    if recipe.steps < 1:
        raise MistudioError(f"steps must be at least 1, got {recipe.steps}", "pass steps >= 1")
    report = progress or _ignore
    if not force and is_complete_build(out_dir, recipe):
        report(f"demo model already built at {out_dir}")
        return out_dir
    with _build_lock(out_dir, report):
        if not force and is_complete_build(out_dir, recipe):
            report(f"demo model built meanwhile by another process at {out_dir}")
            return out_dir
        _check_replaceable(out_dir)
        staging = _fresh_staging_dir(out_dir)
        try:
            _build_into(staging, recipe, report)
            _install(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when installed
    report(f"demo model ready at {out_dir}")
    return out_dir


def is_complete_build(model_dir: Path, recipe: DemoRecipe | None = None) -> bool:
    """Whether `model_dir` holds every file of a finished build of this version and recipe."""
    recipe = recipe or DEMO_RECIPE
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    marker = _read_marker(model_dir)
    return marker.get("version") == DEMO_BUILD_VERSION and marker.get("recipe") == asdict(recipe)


def collect_docstrings(stdlib_dir: Path | None = None, min_chars: int = 40) -> list[str]:
    """The cleaned, deduplicated docstrings of a stdlib tree, in a fixed order.

    Files come in sorted path order and docstrings in source order within a file; files that
    cannot be read or parsed are skipped, since a partial corpus is better than none.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in _python_files(root):
        for doc in _file_docstrings(path):
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


def split_documents(docs: Sequence[str], held_out_fraction: float) -> tuple[list[str], list[str]]:
    """Split into (LM training, held-out) by a hash of each text.

    Hashing the text (not the position) keeps a document on the same side when other documents
    come and go between Python versions.
    """
    train: list[str] = []
    held_out: list[str] = []
    for doc in docs:
        (held_out if _hash_fraction(doc) < held_out_fraction else train).append(doc)
    return train, held_out


def train_tokenizer(
    docs: Sequence[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer with `<|endoftext|>` as its only special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def _ignore(_line: str) -> None:
    """The progress callback used when the caller passes none."""


def _python_files(root: Path) -> list[Path]:
    """Every `.py` file under `root` outside the skipped directories, in sorted order."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        found.extend(Path(directory, name) for name in files if name.endswith(".py"))
    return sorted(found)


def _file_docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file in source order; none if unparsable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escape sequences in stdlib sources
            tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted(
        (node for node in ast.walk(tree) if isinstance(node, documented)),
        key=lambda node: getattr(node, "lineno", 0),
    )
    docs = (ast.get_docstring(node, clean=True) for node in nodes)
    return [_clean(doc) for doc in docs if doc]


def _clean(doc: str) -> str:
    """Trailing spaces off every line and blank lines off both ends (indent is already gone)."""
    return "\n".join(line.rstrip() for line in doc.strip().splitlines())


def _hash_fraction(text: str) -> float:
    """A stable number in [0, 1) derived from the text (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@contextlib.contextmanager
def _build_lock(out_dir: Path, report: Progress) -> Iterator[None]:
    """Hold an exclusive lock beside `out_dir` so concurrent callers build only once."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir.parent / f".{out_dir.name}.lock", "w")  # noqa: SIM115
    except OSError as exc:
        raise _unwritable(out_dir, exc) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another process that is building {out_dir}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _unwritable(out_dir: Path, exc: OSError) -> MistudioError:
    return MistudioError(
        f"cannot write the demo model to {out_dir}: {exc.strerror or exc}",
        "choose a writable directory with --out, or set MISTUDIO_DEMO_DIR",
    )


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier demo build."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MistudioError(
            f"{out_dir} exists and is not a directory",
            "choose a new directory for the demo model with --out",
        )
    if any(out_dir.iterdir()) and not (out_dir / MARKER_NAME).is_file():
        raise MistudioError(
            f"{out_dir} holds other files and is not a miStudio demo model directory",
            "choose a new or empty directory for the demo model with --out",
        )


def _fresh_staging_dir(out_dir: Path) -> Path:
    """An empty sibling to build in; a killed build's leftover is cleared (we hold the lock)."""
    staging = out_dir.with_name(f".{out_dir.name}.building")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise _unwritable(out_dir, exc) from exc
    return staging


def _install(staging: Path, out_dir: Path) -> None:
    """Move the finished build into place, retiring an earlier build if there is one."""
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.retired")
        shutil.rmtree(retired, ignore_errors=True)
        out_dir.rename(retired)
        shutil.rmtree(retired)
    staging.rename(out_dir)


def _build_into(staging: Path, recipe: DemoRecipe, report: Progress) -> None:
    """Run the whole build and write every file, the completion marker last."""
    started = time.monotonic()
    threads = _thread_budget()
    with _seeded(recipe.seed), _torch_threads(threads):
        docs = _stdlib_corpus(recipe)
        lm_docs, sae_docs = split_documents(docs, recipe.held_out_fraction)
        report(
            f"corpus: {len(docs)} docstrings, {len(lm_docs)} for the LM, {len(sae_docs)} held out"
        )
        tokenizer = train_tokenizer(lm_docs, recipe.vocab_size, recipe.n_positions)
        report(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens")
        lm_ids, sae_ids = _encode(tokenizer, lm_docs), _encode(tokenizer, sae_docs)
        train_contexts = _pack(lm_ids, tokenizer.eos_token_id, recipe.context_size)
        eval_contexts = _pack(sae_ids, tokenizer.eos_token_id, recipe.context_size)
        _require_contexts(len(train_contexts), recipe.batch_size, "training")
        _require_contexts(len(eval_contexts), 1, "held-out")
        model = _new_model(recipe, tokenizer)
        losses = _train_and_evaluate(model, train_contexts, eval_contexts, recipe, report)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    _write_corpus(staging / CORPUS_NAME, sae_docs)
    marker = {
        "version": DEMO_BUILD_VERSION,
        "recipe": asdict(recipe),
        "steps": recipe.steps,
        **losses,
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {
            "source": "docstrings of the Python standard library",
            "python": sys.version.split()[0],
            "documents": len(docs),
            "lm_documents": len(lm_docs),
            "lm_tokens": sum(map(len, lm_ids)),
            "held_out_documents": len(sae_docs),
            "held_out_tokens": sum(map(len, sae_ids)),
            "held_out_file": CORPUS_NAME,
        },
        "torch_threads": threads,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _stdlib_corpus(recipe: DemoRecipe) -> list[str]:
    """The stdlib's docstrings, or a user-facing error where the stdlib ships no sources."""
    docs = collect_docstrings(min_chars=recipe.min_doc_chars)
    if not docs:
        raise MistudioError(
            "found no docstrings in the Python standard library to train the demo model on",
            "use a Python installation that ships its standard library sources (.py files)",
        )
    return docs


def _require_contexts(available: int, needed: int, what: str) -> None:
    """A stdlib stripped down to a few files cannot fill even one batch; say so plainly."""
    if available < needed:
        raise MistudioError(
            f"the standard library's docstrings fill only {available} {what} contexts "
            f"(at least {needed} needed)",
            "use a Python installation that ships its full standard library sources",
        )


def _train_and_evaluate(
    model: GPT2LMHeadModel,
    train_contexts: torch.Tensor,
    eval_contexts: torch.Tensor,
    recipe: DemoRecipe,
    report: Progress,
) -> dict[str, float]:
    """Train, measuring the held-out loss before and after; the figures go into the marker."""
    held_out = _spread(eval_contexts, recipe.eval_contexts)
    loss_before = _mean_loss(model, held_out, recipe.batch_size)
    train_losses = _train(model, train_contexts, recipe, report)
    loss_after = _mean_loss(model, held_out, recipe.batch_size)
    report(f"held-out loss {loss_before:.2f} -> {loss_after:.2f}")
    tail = train_losses[-max(1, len(train_losses) // 10) :]
    return {
        "loss_before": round(loss_before, 4),
        "loss_after": round(loss_after, 4),
        "train_loss_final": round(sum(tail) / len(tail), 4),
    }


def _thread_budget() -> int:
    """`OMP_NUM_THREADS` when the user set it, else the CPUs this process may use (at most 16).

    The count is part of what fixes the weights (reductions split differently across threads),
    so it depends only on the machine and the environment, never on the current load.
    """
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(available or os.cpu_count() or 1, _MAX_THREADS))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch, `random` and numpy for the build and give the caller its own states back."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Use `count` intra-op threads for the build, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> list[list[int]]:
    """Token ids per document, without special tokens."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False)
    return [encoding.ids for encoding in encodings]


def _pack(docs_ids: Sequence[Sequence[int]], separator: int, context_size: int) -> torch.Tensor:
    """Documents joined as `<|endoftext|> doc <|endoftext|> doc ...`, cut into full contexts."""
    stream: list[int] = []
    for ids in docs_ids:
        stream.append(separator)
        stream.extend(ids)
    usable = len(stream) - len(stream) % context_size
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, context_size)


def demo_config(recipe: DemoRecipe | None = None, vocab_size: int | None = None,
                end_of_text_id: int = 0) -> GPT2Config:
    """The demo model's config, known before it is built: the BPE fills the vocabulary to
    `recipe.vocab_size`, and its only special token, the end of text, is its first (id 0).
    Config-only reads (validation, the memory preflight) use it instead of training the model.
    No dropout, since a few hundred steps cannot overfit it."""
    recipe = recipe or DEMO_RECIPE
    return GPT2Config(
        architectures=["GPT2LMHeadModel"],
        vocab_size=vocab_size or recipe.vocab_size,
        n_positions=recipe.n_positions,
        n_embd=recipe.n_embd,
        n_layer=recipe.n_layer,
        n_head=recipe.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=end_of_text_id,
        eos_token_id=end_of_text_id,
        pad_token_id=end_of_text_id,
    )


def _new_model(recipe: DemoRecipe, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 of the demo's config."""
    config = demo_config(recipe, len(tokenizer), tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # GPT-2's class name hides it; transformers warns without it
    return model


def _train(
    model: GPT2LMHeadModel, contexts: torch.Tensor, recipe: DemoRecipe, report: Progress
) -> list[float]:
    """Train for `recipe.steps` steps; returns the loss of every step."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, recipe))
    batches = _shuffled_batches(contexts, recipe.batch_size, recipe.seed)
    every = max(1, recipe.steps // 10)
    losses: list[float] = []
    model.train()
    for step in range(1, recipe.steps + 1):
        batch = next(batches)
        loss = _loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % every == 0 or step == recipe.steps:
            recent = losses[-every:]
            report(f"training step {step}/{recipe.steps} loss {sum(recent) / len(recent):.2f}")
    model.eval()
    return losses


def _lr_factor(step: int, recipe: DemoRecipe) -> float:
    """Linear warm-up to the peak, then cosine decay to `min_lr_fraction` of it."""
    warmup = max(1, round(recipe.steps * recipe.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, recipe.steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_fraction + (1.0 - recipe.min_lr_fraction) * cosine


def _shuffled_batches(contexts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches: a fresh seeded permutation of the contexts each epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(contexts), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield contexts[order[start : start + batch_size]]


def _spread(contexts: torch.Tensor, count: int) -> torch.Tensor:
    """`count` contexts evenly spaced through the corpus, not one module's worth from its start."""
    if len(contexts) <= count:
        return contexts
    return contexts[torch.linspace(0, len(contexts) - 1, count).long()]


@torch.no_grad()
def _mean_loss(model: GPT2LMHeadModel, contexts: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over `contexts` (all the same length, so batch means average)."""
    model.eval()
    losses = [_loss(model, batch).item() * len(batch) for batch in contexts.split(batch_size)]
    return sum(losses) / len(contexts)


def _loss(model: GPT2LMHeadModel, batch: torch.Tensor) -> torch.Tensor:
    """Next-token loss of packed contexts; the all-ones mask says no position is padding."""
    return model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss


def _write_corpus(path: Path, docs: Sequence[str]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for doc in docs:
            out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def _read_marker(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}
