"""The on-device bookkeeping of `find`: everything kept about an SAE's features, batch by batch.

A `FeatureRecorder` takes each batch of windows with the SAE's codes of their non-special tokens
and updates, on the codes' device and in whole-batch tensor operations (no loop over features):

- statistics: firing count, summed and maximal activation, and a histogram over fixed
  log-spaced bins shared by all features (`HISTOGRAM_BINS` over log10 in `HISTOGRAM_LOG10_RANGE`,
  values outside clamped into the end bins);
- top examples: per feature, the `top` windows with the highest peak, at most one example per
  (feature, window), centred on that window's argmax, `2 * radius + 1` tokens wide with the
  feature's activation on every token;
- quantile examples: a uniform sample without replacement of the (feature, window) peaks, kept
  as the `quantile_groups * per_quantile` peaks with the highest pseudo-random priority. At the
  end each feature's sample is sorted and split into `quantile_groups` equal-count groups, so the
  groups are equal-count over a uniform sample of the activating windows (by their peak), lowest
  group first; a group's edges are its smallest value and the next group's smallest (the
  sample's largest for the last group);
- negative examples: a shared pool of random spans (one candidate per window, the pool kept by
  priority); each feature gets `negatives` spans of the pool on which it is zero at every token;
- co-occurrence: how often two features fire on the same token. Exact pair counts (a packed
  upper-triangular int32 matrix, every active pair of every token) up to
  `EXACT_COOCCURRENCE_MAX_FEATURES` features; above that, the pairs among each token's
  `APPROXIMATE_COOCCURRENCE_LATENTS` strongest latents, counted in a sparse accumulator (so
  n_ij, and the Jaccard index, are lower bounds there). At the end,
  Jaccard = n_ij / (n_i + n_j - n_ij) and each feature keeps its `neighbours` best partners.

Pseudo-random choices (quantile priorities, the negative pool and span centres, each feature's
negatives) are integer hashes of (seed, feature, window index), not draws from a generator: the
result is the same whatever the batching, and a resumed run needs no RNG state to equal an
uninterrupted one. `state_dict()` / `load_state_dict()` make the checkpoints; `finish(store)`
writes everything into a `FeatureStore`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from mistudio_core.feature_store import PAD_TOKEN, FeatureStore
from mistudio_core.sae import SparseCodes

if TYPE_CHECKING:
    from mistudio_core.find import FindConfig

HISTOGRAM_BINS = 64
HISTOGRAM_LOG10_RANGE = (-4.0, 4.0)
# A packed int32 triangle of d(d-1)/2 counts: 512 MiB at 16384 features.
EXACT_COOCCURRENCE_MAX_FEATURES = 16384
APPROXIMATE_COOCCURRENCE_LATENTS = 8
# The negative pool holds this many spans per negative example kept per feature.
NEGATIVE_POOL_FACTOR = 10
# Pairs handled per co-occurrence step, and buffered before the sparse accumulator merges them.
_PAIR_CHUNK = 1 << 22
# Features x pooled spans scored at once when the negatives are chosen.
_NEGATIVE_BLOCK_ELEMENTS = 1 << 25
_FLOAT16_MAX = 65504.0
_HASH_MASK = (1 << 31) - 1
_SALT_QUANTILE, _SALT_POOL, _SALT_CENTRE, _SALT_NEGATIVE = 1, 2, 3, 4


class TopSlots:
    """Per row (feature), the `size` candidates with the largest keys seen so far, with payload.

    Keys are float64 (-inf marks an empty slot); slots are kept in no particular order, and
    `bar` holds each row's smallest key, the one a new candidate must beat. `offer` takes a
    batch's candidates, vectorised over all of them, and makes and moves the payload of only
    those that enter, into the slots they take. `ordered()` sorts the slots once, at the end."""

    def __init__(self, n_rows: int, size: int, payload: dict[str, tuple[tuple, torch.dtype, float]],
                 device: torch.device) -> None:
        self.size = size
        self.keys = torch.full((n_rows, size), -math.inf, dtype=torch.float64, device=device)
        self.bar = torch.full((n_rows,), -math.inf, dtype=torch.float64, device=device)
        self.payload = {name: torch.full((n_rows, size, *shape), fill, dtype=dtype, device=device)
                        for name, (shape, dtype, fill) in payload.items()}

    def offer(self, rows: torch.Tensor, columns: torch.Tensor, n_columns: int,
              keys: torch.Tensor, payload_of: Callable[[torch.Tensor], dict[str, torch.Tensor]]
              ) -> torch.Tensor:
        """Offer candidates with `keys` for `rows`; no two share a (row, column), columns
        being below `n_columns` (find's column is the window in the batch). `payload_of(indices)`
        makes the payload of just the candidates that enter, which are returned.

        The batch's candidates of a row and the row's slots are merged with one `topk` over a
        [rows touched, size + n_columns] matrix: no sorting, no per-row loop."""
        passing = (keys > self.bar[rows]).nonzero().squeeze(1)
        if passing.numel() == 0:
            return passing
        device = self.keys.device
        rows, columns = rows[passing], columns[passing]
        marked = torch.zeros(self.keys.shape[0], dtype=torch.bool, device=device)
        marked[rows] = True
        touched = marked.nonzero().squeeze(1)
        local = torch.empty(self.keys.shape[0], dtype=torch.long, device=device)
        local[touched] = torch.arange(touched.numel(), device=device)
        local = local[rows]
        fresh = torch.full((touched.numel(), n_columns), -math.inf, dtype=self.keys.dtype,
                           device=device)
        fresh[local, columns] = keys[passing].to(fresh.dtype)
        candidate = torch.full(fresh.shape, -1, dtype=torch.long, device=device)
        candidate[local, columns] = passing
        both = torch.cat([self.keys[touched], fresh], dim=1)
        kept = torch.zeros_like(both, dtype=torch.bool).scatter_(
            1, both.topk(self.size, dim=1, sorted=False).indices, True)
        # As many slots are given up in a row as candidates arrive in it: pair them in order.
        # A candidate slot left empty (-inf) can only win over an empty slot: skip those pairs.
        given_up = (~kept[:, : self.size]).nonzero()
        arriving = candidate[kept[:, self.size:]]
        real = arriving >= 0
        row, slot, arriving = touched[given_up[real, 0]], given_up[real, 1], arriving[real]
        self.keys[row, slot] = keys[arriving].to(self.keys.dtype)
        made = payload_of(arriving)
        for name, stored in self.payload.items():
            stored[row, slot] = made[name].to(stored.dtype)
        self.bar[touched] = self.keys[touched].min(dim=1).values
        return arriving

    def ordered(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Keys and payload with each row's slots sorted by key, largest first."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        payload = {name: stored.gather(1, order.view(*order.shape, *([1] * (stored.dim() - 2)))
                                       .expand_as(stored))
                   for name, stored in self.payload.items()}
        return self.keys.gather(1, order), payload

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), **{k: v.cpu() for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name, target in [("keys", self.keys), *self.payload.items()]:
            if state[name].shape != target.shape:
                raise ValueError(f"checkpoint slot {name} has shape {tuple(state[name].shape)}")
            target.copy_(state[name])
        self.bar = self.keys.min(dim=1).values


class CooccurrenceCounter:
    """How many tokens each pair of features fired on together.

    Exact up to `EXACT_COOCCURRENCE_MAX_FEATURES` features: every active pair (i < j) of every
    token is added into a packed upper triangle. Above that a dense matrix no longer fits, so
    only the pairs among each token's `APPROXIMATE_COOCCURRENCE_LATENTS` strongest latents are
    counted, as sorted (pair key, count) arrays merged with `torch.unique`; those counts are lower
    bounds of the true ones."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.d_sae = d_sae
        self.exact = d_sae <= EXACT_COOCCURRENCE_MAX_FEATURES
        self.device = device
        if self.exact:
            # Pair (i, j), i < j, is counted at row_starts[i] + j - i - 1; after the d(d-1)/2
            # counters come d + 1 more where padding pairs (i = -1) land, never read.
            triangle = d_sae * (d_sae - 1) // 2
            self.counts = torch.zeros(triangle + d_sae + 1, dtype=torch.int32, device=device)
            rows = torch.arange(d_sae, device=device)
            self._row_starts = rows * (2 * d_sae - rows - 1) // 2
            # base[i + 1] + j is pair (i, j)'s counter; base[0] + j lands in the padding ones.
            self._base = torch.cat([torch.tensor([triangle + 1], device=device),
                                    self._row_starts - rows - 1]).to(torch.int32)
            self._triangle = triangle
        else:
            self.pair_keys = torch.zeros(0, dtype=torch.long, device=device)
            self.pair_counts = torch.zeros(0, dtype=torch.long, device=device)
            self._pending: list[torch.Tensor] = []
            self._pending_size = 0
        self._pair_index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._unit = torch.ones(0, dtype=torch.int32, device=device)

    @property
    def method(self) -> str:
        if self.exact:
            return "exact"
        return f"approximate: pairs among each token's top {APPROXIMATE_COOCCURRENCE_LATENTS}"

    def add(self, latents: torch.Tensor, values: torch.Tensor) -> None:
        """`latents` [tokens, L]: each token's active features (-1 pads), `values` theirs."""
        if not self.exact and latents.shape[1] > APPROXIMATE_COOCCURRENCE_LATENTS:
            strongest = values.topk(APPROXIMATE_COOCCURRENCE_LATENTS, dim=1).indices
            latents = latents.gather(1, strongest)
        width = latents.shape[1]
        if width < 2:
            return
        # Sorted rows make every pair (first < second column) come out as (low, high), the
        # padding first: a pair is real when its low member is.
        latents = latents.sort(dim=1).values
        first, second = self._pairs_of(width)
        step = max(1, _PAIR_CHUNK // first.numel())
        for start in range(0, latents.shape[0], step):
            part = latents[start:start + step]
            if self.exact:  # int32 throughout: half the memory traffic of int64 indices
                part = part.to(torch.int32)
                index = (self._base[part + 1].index_select(1, first)
                         + part.index_select(1, second)).reshape(-1)
                self.counts.index_add_(0, index, self._ones(index.numel()))
            else:
                low, high = part[:, first].reshape(-1), part[:, second].reshape(-1)
                real = low >= 0
                self._pending.append(low[real] * self.d_sae + high[real])
                self._pending_size += self._pending[-1].numel()
                if self._pending_size >= _PAIR_CHUNK:
                    self._consolidate()

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every pair (i < j) that fired together at least once, and its count."""
        if self.exact:
            index = self.counts[: self._triangle].nonzero().squeeze(1)
            i = torch.searchsorted(self._row_starts, index, right=True) - 1
            j = index - self._row_starts[i] + i + 1
            return i, j, self.counts[index].long()
        self._consolidate()
        return (self.pair_keys // self.d_sae, self.pair_keys % self.d_sae, self.pair_counts)

    def _ones(self, n: int) -> torch.Tensor:
        if self._unit.numel() < n:
            self._unit = torch.ones(n, dtype=torch.int32, device=self.device)
        return self._unit[:n]

    def _consolidate(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.pair_keys, *self._pending])
        counts = torch.cat([self.pair_counts, torch.ones(self._pending_size, dtype=torch.long,
                                                         device=self.device)])
        self.pair_keys, inverse = torch.unique(keys, return_inverse=True)
        self.pair_counts = torch.zeros_like(self.pair_keys).index_add_(0, inverse, counts)
        self._pending, self._pending_size = [], 0

    def _pairs_of(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if width not in self._pair_index:
            first, second = torch.triu_indices(width, width, 1, device=self.device)
            self._pair_index[width] = (first, second)
        return self._pair_index[width]

    def state_dict(self) -> dict:
        if self.exact:
            return {"counts": self.counts.cpu()}
        self._consolidate()
        return {"pair_keys": self.pair_keys.cpu(), "pair_counts": self.pair_counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if self.exact:
            self.counts.copy_(state["counts"])
        else:
            self.pair_keys = state["pair_keys"].to(self.device)
            self.pair_counts = state["pair_counts"].to(self.device)


class FeatureRecorder:
    """Everything `find` keeps about an SAE's features, updated one batch of windows at a time.

    `add(token_ids, keep, codes)` takes a batch of windows `[n_windows, context]`, the mask of
    the positions that were encoded (False at special tokens), and the SAE's codes of exactly
    those positions, in row-major order (`sae.encode_sparse(activations[keep])`). All state lives
    on `device`. `finish(store)` writes it into a `FeatureStore`."""

    def __init__(self, d_sae: int, config: FindConfig, device: torch.device | str) -> None:
        self.d_sae = d_sae
        self.config = config
        self.device = torch.device(device)
        self.n_tokens = 0
        self.windows_seen = 0
        self.n_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.sum_act = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.max_act = torch.zeros(d_sae, dtype=torch.float32, device=self.device)
        self.histogram = torch.zeros(d_sae, HISTOGRAM_BINS, dtype=torch.int32, device=self.device)
        span = ((config.width,), torch.int32, PAD_TOKEN)
        acts = ((config.width,), torch.float16, 0.0)
        self.top = TopSlots(d_sae, config.top, {"tokens": span, "acts": acts}, self.device)
        self.quantile = TopSlots(d_sae, config.quantile_samples,
                                 {"tokens": span, "acts": acts,
                                  "values": ((), torch.float32, math.nan)}, self.device)
        self.pool = TopSlots(1, max(1, NEGATIVE_POOL_FACTOR * config.negatives),
                             {"tokens": span, "window": ((), torch.long, -1)}, self.device)
        # (pool window * d_sae + feature) of every feature active somewhere in a pooled span.
        self.pool_features = torch.zeros(0, dtype=torch.long, device=self.device)
        self.cooccurrence = CooccurrenceCounter(d_sae, self.device)

    # ----- one batch ---------------------------------------------------------------------------

    @torch.no_grad()
    def add(self, token_ids: torch.Tensor, keep: torch.Tensor, codes: SparseCodes) -> None:
        """Record one batch. On the CPU this runs with one intra-op thread: its few hundred
        small, memory-bound ops gain little from a second thread on a quiet machine (measured
        ~80 ms a batch with two threads, ~95 ms with one, d_sae 16384 on 2 cores), and on a busy
        one every op's thread barrier waits for a descheduled thread (measured a median 1.1 s
        with two threads, 94 ms with one)."""
        if self.device.type != "cpu":
            self._add(token_ids, keep, codes)
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._add(token_ids, keep, codes)
        finally:
            torch.set_num_threads(threads)

    def _add(self, token_ids: torch.Tensor, keep: torch.Tensor, codes: SparseCodes) -> None:
        token_ids = token_ids.to(self.device, torch.long)
        keep = keep.to(self.device, torch.bool)
        positions = keep.reshape(-1).nonzero().squeeze(1)
        if codes.n_rows != positions.numel() or codes.n_latents != self.d_sae:
            raise ValueError(f"codes of {codes.n_rows} tokens x {codes.n_latents} latents for "
                             f"{positions.numel()} kept positions x {self.d_sae} features")
        active = codes.values > 0
        values = codes.values[active].float()
        cols, rows = codes.cols[active], codes.rows[active]
        batch = _Batch(token_ids, positions[rows], cols, values, self.windows_seen, self.d_sae)
        self._add_statistics(cols, values)
        self._add_examples(batch)
        self._add_pool_spans(batch)
        self.cooccurrence.add(*_latents_by_row(codes, rows, cols, values))
        self.n_tokens += positions.numel()
        self.windows_seen += token_ids.shape[0]

    def _add_statistics(self, cols: torch.Tensor, values: torch.Tensor) -> None:
        self.n_fired += torch.bincount(cols, minlength=self.d_sae)
        self.sum_act.index_add_(0, cols, values.double())
        self.max_act.scatter_reduce_(0, cols, values, "amax")
        low, high = HISTOGRAM_LOG10_RANGE
        bins = ((values.log10() - low) * (HISTOGRAM_BINS / (high - low))).floor()
        bins = bins.clamp(0, HISTOGRAM_BINS - 1).long()
        self.histogram.view(-1).index_add_(
            0, cols * HISTOGRAM_BINS + bins, torch.ones_like(bins, dtype=torch.int32))

    def _add_examples(self, batch: _Batch) -> None:
        """Offer every (feature, window) peak to the top and the quantile sample."""
        feature, window, centre, value = batch.window_peaks()

        def spans(index: torch.Tensor) -> dict[str, torch.Tensor]:
            acts = batch.span_acts(feature[index], window[index], centre[index],
                                   self.config.radius)
            return {"tokens": batch.span_tokens(window[index], centre[index], self.config.radius),
                    "acts": acts.clamp(max=_FLOAT16_MAX), "values": value[index]}

        self.top.offer(feature, window, batch.n_windows, value.double(), spans)
        priority = _hash(self.config.seed, _SALT_QUANTILE, feature, batch.first_window + window)
        self.quantile.offer(feature, window, batch.n_windows, priority.double(), spans)

    def _add_pool_spans(self, batch: _Batch) -> None:
        """Offer one random span per window to the shared negative pool; note the features
        active anywhere in the spans that enter."""
        window = torch.arange(batch.n_windows, device=self.device)
        global_window = batch.first_window + window
        low = min(self.config.radius, (batch.context - 1) // 2)
        high = max(batch.context - 1 - self.config.radius, low)
        centre = low + _hash(self.config.seed, _SALT_CENTRE, global_window) % (high - low + 1)
        entered = self.pool.offer(
            torch.zeros_like(window), window, batch.n_windows,
            _hash(self.config.seed, _SALT_POOL, global_window).double(),
            lambda index: {"tokens": batch.span_tokens(index, centre[index], self.config.radius),
                           "window": global_window[index]})
        pooled = self.pool.payload["window"][0]
        kept = self.pool_features[torch.isin(self.pool_features // self.d_sae, pooled)]
        span_centre = torch.full_like(window, -(1 << 40))
        span_centre[entered] = centre[entered]
        in_span = (batch.flat_positions - batch.windows * batch.context
                   - span_centre[batch.windows]).abs() <= self.config.radius
        inside = (batch.first_window + batch.windows[in_span]) * self.d_sae + batch.cols[in_span]
        self.pool_features = torch.cat([kept, torch.unique(inside)])

    # ----- the end -----------------------------------------------------------------------------

    @torch.no_grad()
    def finish(self, store: FeatureStore) -> None:
        """Write statistics, histogram, the three example sets and co-occurring features."""
        store.write_statistics(_numpy(self.n_fired), _numpy(self.max_act), _numpy(self.sum_act),
                               self.n_tokens)
        store.write_array("histogram", _numpy(self.histogram))
        keys, top = self.top.ordered()
        values = torch.where(keys > -math.inf, keys, math.nan).float()
        store.write_examples("top", _numpy(top["tokens"]), _numpy(top["acts"]), _numpy(values))
        tokens, acts, values, edges = self.quantile_examples()
        store.write_examples("quantile", _numpy(tokens), _numpy(acts), _numpy(values))
        store.write_array("quantile_edges", _numpy(edges))
        store.write_examples("negative", *(_numpy(t) for t in self.negative_examples()))
        ids, scores = self.cooccurring()
        store.write_neighbours("cooccurrence", _numpy(ids), _numpy(scores))
        low, high = HISTOGRAM_LOG10_RANGE
        edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
        store.set_meta(histogram_log10_edges=[round(float(e), 6) for e in edges],
                       quantile_groups=self.config.quantile_groups,
                       per_quantile=self.config.per_quantile, example_width=self.config.width,
                       cooccurrence=self.cooccurrence.method)

    def quantile_examples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each feature's sample sorted by value and laid out as `quantile_groups` equal-count
        groups of `per_quantile` slots, lowest first, with the groups' edges `[d_sae, G + 1]`."""
        groups, per_group = self.config.quantile_groups, self.config.per_quantile
        sample = self.quantile.payload["values"]
        order = torch.argsort(torch.nan_to_num(sample, nan=math.inf), dim=1, stable=True)
        values = sample.gather(1, order)
        count = (~values.isnan()).sum(1, keepdim=True)
        starts = torch.arange(groups + 1, device=self.device) * count // groups
        rank = torch.arange(values.shape[1], device=self.device).expand_as(values)
        group = torch.searchsorted(starts[:, 1:].contiguous(), rank.contiguous(), right=True)
        group = group.clamp(max=groups - 1)
        slot = group * per_group + rank - starts.gather(1, group)
        valid = rank < count
        feature = torch.arange(self.d_sae, device=self.device)[:, None].expand_as(values)
        out_values = torch.full_like(values, math.nan)
        out_values[feature[valid], slot[valid]] = values[valid]
        out = []
        for name, fill in (("tokens", PAD_TOKEN), ("acts", 0.0)):
            stored = self.quantile.payload[name]
            ordered = stored.gather(1, order[..., None].expand_as(stored))
            laid_out = torch.full_like(stored, fill)
            laid_out[feature[valid], slot[valid]] = ordered[valid]
            out.append(laid_out)
        edges = torch.cat([values.gather(1, starts[:, :groups].clamp(max=values.shape[1] - 1)),
                           values.gather(1, (count - 1).clamp(min=0))], dim=1)
        edges[count.squeeze(1) == 0] = math.nan
        return out[0], out[1], out_values, edges

    def negative_examples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per feature, `negatives` pooled spans where it never fired (tokens, zero acts, and
        value 0, or NaN for a slot left empty), chosen by a per-feature pseudo-random order."""
        n, width = self.config.negatives, self.config.width
        pooled = self.pool.payload["window"][0]
        size = pooled.numel()
        contains = torch.zeros(self.d_sae, size, dtype=torch.bool, device=self.device)
        order = torch.argsort(pooled)
        slot = order[torch.searchsorted(pooled[order], self.pool_features // self.d_sae)]
        contains[self.pool_features % self.d_sae, slot] = True
        tokens = torch.full((self.d_sae, n, width), PAD_TOKEN, dtype=torch.int32,
                            device=self.device)
        values = torch.full((self.d_sae, n), math.nan, device=self.device)
        acts = torch.zeros(tokens.shape, dtype=torch.float16, device=self.device)
        if n == 0:
            return tokens, acts, values
        block = max(1, _NEGATIVE_BLOCK_ELEMENTS // size)
        for start in range(0, self.d_sae, block):
            feature = torch.arange(start, min(start + block, self.d_sae), device=self.device)
            priority = _hash(self.config.seed, _SALT_NEGATIVE, feature[:, None], pooled[None, :])
            priority[contains[feature] | (pooled < 0)[None, :]] = -1
            best = priority.topk(min(n, size), dim=1)
            found = best.values >= 0
            chosen = self.pool.payload["tokens"][0][best.indices]
            tokens[feature, : best.indices.shape[1]] = torch.where(
                found[..., None], chosen, PAD_TOKEN)
            values[feature, : best.indices.shape[1]] = torch.where(found, 0.0, math.nan)
        return tokens, acts, values

    def cooccurring(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each feature's `neighbours` partners by Jaccard index over firing tokens."""
        i, j, both = self.cooccurrence.pairs()
        jaccard = both.double() / (self.n_fired[i] + self.n_fired[j] - both).clamp(min=1)
        return _top_per_row(torch.cat([i, j]), torch.cat([j, i]), torch.cat([jaccard, jaccard]),
                            self.d_sae, self.config.neighbours)

    # ----- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "n_tokens": self.n_tokens, "windows_seen": self.windows_seen,
            "n_fired": self.n_fired.cpu(), "sum_act": self.sum_act.cpu(),
            "max_act": self.max_act.cpu(), "histogram": self.histogram.cpu(),
            "top": self.top.state_dict(), "quantile": self.quantile.state_dict(),
            "pool": self.pool.state_dict(), "pool_features": self.pool_features.cpu(),
            "cooccurrence": self.cooccurrence.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.n_tokens, self.windows_seen = int(state["n_tokens"]), int(state["windows_seen"])
        for name in ("n_fired", "sum_act", "max_act", "histogram"):
            getattr(self, name).copy_(state[name])
        self.top.load_state_dict(state["top"])
        self.quantile.load_state_dict(state["quantile"])
        self.pool.load_state_dict(state["pool"])
        self.pool_features = state["pool_features"].to(self.device)
        self.cooccurrence.load_state_dict(state["cooccurrence"])


class _Batch:
    """One batch's active entries (`flat_positions` in the [windows * context] grid, feature
    `cols`, `values`), keyed by (feature, window), and the tokens and activations around any
    position."""

    def __init__(self, token_ids: torch.Tensor, flat_positions: torch.Tensor, cols: torch.Tensor,
                 values: torch.Tensor, first_window: int, d_sae: int) -> None:
        self.token_ids = token_ids
        self.flat_positions = flat_positions
        self.cols = cols
        self.values = values
        self.first_window = first_window
        self.d_sae = d_sae
        self.n_windows, self.context = token_ids.shape
        self.windows = flat_positions // self.context
        self.keys = cols * self.n_windows + self.windows  # one per (feature, window)

    def window_peaks(self) -> tuple[torch.Tensor, ...]:
        """(feature, window, centre, value) of each (feature, window)'s highest activation; of
        equal highest ones, the earliest position."""
        key, positions = self.keys, self.flat_positions
        peak = self.values.new_zeros(self.d_sae * self.n_windows).scatter_reduce_(
            0, key, self.values, "amax")
        index = (self.values == peak[key]).nonzero().squeeze(1)
        first = torch.full_like(peak, self.n_windows * self.context, dtype=torch.long)
        first.scatter_reduce_(0, key[index], positions[index], "amin")
        index = index[positions[index] == first[key[index]]]
        window = self.windows[index]
        return self.cols[index], window, positions[index] - window * self.context, \
            self.values[index]

    def span_tokens(self, window: torch.Tensor, centre: torch.Tensor,
                    radius: int) -> torch.Tensor:
        """Token ids [n, 2 * radius + 1] around (window, centre), PAD_TOKEN outside the window:
        one gather from a view of every window's spans (the padded windows, unfolded)."""
        padded = torch.nn.functional.pad(self.token_ids, (radius, radius), value=PAD_TOKEN)
        return padded.unfold(1, 2 * radius + 1, 1)[window, centre].to(torch.int32)

    def span_acts(self, feature: torch.Tensor, window: torch.Tensor, centre: torch.Tensor,
                  radius: int) -> torch.Tensor:
        """`feature`'s activation [n, 2 * radius + 1] on every token around (window, centre),
        for (feature, window) pairs that are all different: each active entry of the batch is
        scattered into the span of its (feature, window), if it has one and falls inside."""
        span_of_key = torch.full((self.d_sae * self.n_windows,), -1, dtype=torch.long,
                                 device=feature.device)
        span_of_key[feature * self.n_windows + window] = torch.arange(
            feature.numel(), device=feature.device)
        span = span_of_key[self.keys]
        has_span = span >= 0
        span, entry = span[has_span], has_span.nonzero().squeeze(1)
        offset = (self.flat_positions[entry] - self.windows[entry] * self.context
                  - centre[span] + radius)
        inside = (offset >= 0) & (offset <= 2 * radius)
        acts = torch.zeros(feature.numel(), 2 * radius + 1, device=feature.device)
        acts[span[inside], offset[inside]] = self.values[entry[inside]]
        return acts


def _latents_by_row(codes: SparseCodes, rows: torch.Tensor, cols: torch.Tensor,
                    values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Active features per token as a padded [n_rows, max active] matrix (-1 pads) and their
    values (-inf pads), from the codes (TopK: a view of them) or their active entries (`rows`
    in CSR order)."""
    n_rows = codes.n_rows
    per_row = codes.values.numel() // max(n_rows, 1)
    if n_rows and per_row * n_rows == codes.values.numel() and bool(
            (codes.crow.diff() == per_row).all()):
        dense_values = codes.values.view(n_rows, per_row).float()
        active = dense_values > 0
        return (torch.where(active, codes.cols.view(n_rows, per_row), -1),
                torch.where(active, dense_values, -math.inf))
    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if rows.numel() else 0
    starts = counts.cumsum(0) - counts
    offset = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    latents = torch.full((n_rows, width), -1, dtype=torch.long, device=rows.device)
    padded_values = torch.full((n_rows, width), -math.inf, device=rows.device)
    latents[rows, offset] = cols
    padded_values[rows, offset] = values
    return latents, padded_values


def _rank_in_runs(sorted_rows: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... within each run of equal values of a sorted tensor."""
    if sorted_rows.numel() == 0:
        return sorted_rows.clone()
    position = torch.arange(sorted_rows.numel(), device=sorted_rows.device)
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    return position - torch.where(starts, position, 0).cummax(0).values


def _top_per_row(rows: torch.Tensor, items: torch.Tensor, scores: torch.Tensor, n_rows: int,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` items of highest score per row: ids [n_rows, k] (-1 pads) and scores (0 pads)."""
    ids = torch.full((n_rows, k), -1, dtype=torch.long, device=rows.device)
    best = torch.zeros((n_rows, k), dtype=torch.float32, device=rows.device)
    if k == 0 or rows.numel() == 0:
        return ids, best
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    rank = _rank_in_runs(rows[order])
    kept = order[rank < k]
    ids[rows[kept], rank[rank < k]] = items[kept]
    best[rows[kept], rank[rank < k]] = scores[kept].float()
    return ids, best


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash round (products stay below 2^58, so int64 never overflows)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _HASH_MASK
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _HASH_MASK
    return (x >> 16) ^ x


def _hash(seed: int, salt: int, *keys: torch.Tensor) -> torch.Tensor:
    """A pseudo-random integer in [0, 2^31) for every combination of `keys` (broadcast)."""
    x = _mix(torch.full_like(keys[0], (seed * 1_000_003 + salt) & _HASH_MASK))
    for key in keys:
        x = _mix(x ^ (key & _HASH_MASK))
    return x


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()
