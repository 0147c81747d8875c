"""Batches of tokenised examples: length buckets, packing, label slots, resumable order.

    it = BatchIterator(train, cfg.train.batch_size, cfg.data.buckets, seed=cfg.data.seed,
                       pad_id=pad_id(tok), packing=True)
    batch = next(it)        # input_ids, attention_mask, labels, segment_ids, positions,
                            # loss_pos, loss_tgt: (B, T) / (B, C) int32 numpy
    state = it.state()      # {"epoch", "position", "seed"}; it.restore(state) resumes exactly

Rows are padded on the right; T is always one of the configured buckets (packed: the largest),
so a jitted step compiles once per bucket. Labels follow data.py's convention (HF, unshifted,
IGNORE = -100); loss_pos / loss_tgt are the positions whose next-token prediction is scored.
"""

from __future__ import annotations

import logging

import numpy as np

from moka_jax.data.records import IGNORE, DataError, TokenizedData

log = logging.getLogger(__name__)


def bucket_index(lengths, buckets) -> np.ndarray:
    """Index of the smallest bucket >= each length."""
    idx = np.searchsorted(np.asarray(buckets), np.asarray(lengths), side="left")
    if np.any(idx >= len(buckets)):
        raise DataError(f"an example of length {int(np.max(lengths))} exceeds the largest bucket "
                        f"{buckets[-1]}")
    return idx


def collate(data: TokenizedData, idx, buckets, pad_id: int = 0, rows: slice | None = None) -> dict:
    """Pad examples `idx` on the right (one per row) to the smallest bucket holding the longest."""
    lengths = np.array([len(data.input_ids[i]) for i in idx])
    T = int(buckets[bucket_index([lengths.max()], buckets)[0]])
    idx = list(idx)[rows] if rows is not None else list(idx)
    return collate_rows(data, [[i] for i in idx], T, pad_id)


def collate_rows(data: TokenizedData, rows: list, T: int, pad_id: int = 0) -> dict:
    """Rows of (T,) tokens, each holding the examples `rows[r]` back to back, then padding.

    input_ids, labels (HF convention, unshifted), attention_mask (1 on real tokens),
    segment_ids (1, 2, ... per example in a row; 0 on padding) and positions (restarting at
    0 for every example, so RoPE sees each example as if it were alone).
    """
    B = len(rows)
    out = {"input_ids": np.full((B, T), pad_id, np.int32),
           "attention_mask": np.zeros((B, T), np.int32),
           "labels": np.full((B, T), IGNORE, np.int32),
           "segment_ids": np.zeros((B, T), np.int32),
           "positions": np.zeros((B, T), np.int32)}
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            n = len(data.input_ids[i])
            if at + n > T:
                raise DataError(f"row {r}: examples of {at + n} tokens do not fit in {T}")
            sl = slice(at, at + n)
            out["input_ids"][r, sl] = data.input_ids[i]
            out["labels"][r, sl] = data.labels[i]
            out["segment_ids"][r, sl] = s
            out["positions"][r, sl] = np.arange(n)
            at += n
        out["attention_mask"][r, :at] = 1
    return out


def next_token_targets(labels_BT, segment_ids_BT) -> np.ndarray:
    """(B, T) target predicted *at* each position: the next token's label when it belongs to
    the same example, else IGNORE (so no example predicts its neighbour's first token)."""
    tgt = np.full(labels_BT.shape, IGNORE, np.int32)
    same = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, :-1] > 0)
    tgt[:, :-1] = np.where(same, labels_BT[:, 1:], IGNORE)
    return tgt


def label_slots(batch: dict, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(loss_pos, loss_tgt), each (B, capacity) int32: per row the positions whose next-token
    prediction is scored and their targets (IGNORE-filled), so the train step applies the
    lm_head to these hidden states only and the (B, T, V) logits never exist."""
    return _slots(next_token_targets(batch["labels"], batch["segment_ids"]), capacity)


def _slots(tgt_BT, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    B = tgt_BT.shape[0]
    pos = np.zeros((B, capacity), np.int32)
    tgt = np.full((B, capacity), IGNORE, np.int32)
    for r in range(B):
        p = np.flatnonzero(tgt_BT[r] != IGNORE)
        if len(p) > capacity:
            raise DataError(f"row {r} has {len(p)} labelled tokens, over the capacity {capacity}")
        pos[r, :len(p)], tgt[r, :len(p)] = p, tgt_BT[r, p]
    return pos, tgt


def with_label_slots(batch: dict, capacity: int | None = None) -> dict:
    """The batch plus loss_pos / loss_tgt; capacity defaults to its own busiest row (rounded),
    and is raised to it when given smaller (never dropping a label)."""
    tgt_BT = next_token_targets(batch["labels"], batch["segment_ids"])
    need = round_capacity(int((tgt_BT != IGNORE).sum(1).max()))
    pos, tgt = _slots(tgt_BT, need if capacity is None else max(capacity, need))
    return {**batch, "loss_pos": pos, "loss_tgt": tgt}


def labelled_per_row(batch: dict) -> np.ndarray:
    return (next_token_targets(batch["labels"], batch["segment_ids"]) != IGNORE).sum(1)


def round_capacity(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def pack_rows(order, lengths, row_len: int, rows_per_batch: int,
              window: int = 4) -> list[list[list[int]]]:
    """Pack `order` into batches of `rows_per_batch` rows of `row_len` tokens, deterministically.

    First fit over a pool of up to `window` x rows_per_batch open rows, in the given order;
    when an example fits no open row and the pool is full, the rows_per_batch fullest rows
    leave as a batch. A wider pool fills rows better at the cost of moving examples a few
    batches from their shuffled place. At the end the pool empties in batches, the last one
    completed with empty rows, so an epoch sees every example exactly once.
    """
    batches, rows, free = [], [], []
    cap = window * rows_per_batch

    def emit(k):
        keep = sorted(sorted(range(len(rows)), key=lambda j: free[j])[:k])
        batches.append([rows[j] for j in keep] + [[] for _ in range(rows_per_batch - len(keep))])
        for j in reversed(keep):
            del rows[j], free[j]

    for i in order:
        n = int(lengths[i])
        r = next((k for k, f in enumerate(free) if f >= n), None)
        if r is None:
            if len(rows) == cap:
                emit(rows_per_batch)
            rows.append([])
            free.append(row_len)
            r = len(rows) - 1
        rows[r].append(int(i))
        free[r] -= n
    while rows:
        emit(min(rows_per_batch, len(rows)))
    return batches


class BatchIterator:
    """Endless, deterministic, resumable batches of `batch_size` (global) rows.

    Epoch e draws the epoch's examples (mixing weights, if any) and shuffles them with
    default_rng([seed, e]). Unpacked: one example per row; one pending batch per bucket is
    filled in that order and emitted when full (leftovers carry up into the next bucket,
    fewer than batch_size examples are dropped per epoch). Packed (`packing=True`): examples
    are packed in order, first fit, several per row, into rows of the largest bucket, so every
    batch has one shape (one compile) and little padding; batch_size then counts rows. The plan
    depends only on (seed, epoch), so `state()` = (epoch, position) restores exactly the same
    remaining batches.

    Each batch also carries `loss_pos` / `loss_tgt` (see `label_slots`) with a static per-row
    capacity per row length, derived from the first epochs' plans; a batch over it raises the
    capacity (one more compile) rather than dropping a label.

    process_index / process_count: yield only this host's rows of each global batch.
    """

    def __init__(self, data: TokenizedData, batch_size: int, buckets, *, seed: int = 0,
                 pad_id: int = 0, shuffle: bool = True, packing: bool = False,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise DataError(f"batch_size {batch_size} does not divide by {process_count} processes")
        self.data, self.batch_size, self.buckets = data, batch_size, list(buckets)
        self.seed, self.pad_id, self.shuffle, self.packing = int(seed), pad_id, shuffle, packing
        local = batch_size // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self._lengths = data.lengths
        self._bucket = bucket_index(self._lengths, self.buckets)
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None
        if not self.plan(0):
            raise DataError(f"{len(data)} examples (after filtering and the val split) make no "
                            f"batch of {batch_size}; lower train.batch_size or add data")
        self.capacity = self._initial_capacity()

    def _pool(self, rng) -> np.ndarray:
        """The epoch's example indices: all of them, or a weighted draw per file."""
        if self.data.weights is None:
            return np.arange(len(self.data))
        w = np.asarray(self.data.weights, np.float64)
        quotas = np.round(w / w.sum() * len(self.data)).astype(np.int64)
        parts = []
        for s, quota in enumerate(quotas):
            members = np.flatnonzero(self.data.source == s)
            reps = -(-quota // len(members))  # ceil: repeat small files as often as needed
            parts.append(np.concatenate([rng.permutation(members) for _ in range(reps)])[:quota])
        return np.concatenate(parts)

    def plan(self, epoch: int) -> list[tuple[int, list]]:
        """The batches of `epoch`, in order: (row length T, rows of example indices)."""
        if self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        order = self._pool(rng)
        if self.shuffle:
            order = rng.permutation(order)
        if self.packing:
            T = self.buckets[-1]
            batches = [(T, rows) for rows in
                       pack_rows(order, self._lengths, T, self.batch_size)]
        else:
            batches = [(int(self.buckets[self._bucket[idx].max()]), [[int(i)] for i in idx])
                       for idx in self._bucket_batches(order)]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def _bucket_batches(self, order) -> list[np.ndarray]:
        B, batches = self.batch_size, []
        pending = [[] for _ in self.buckets]
        for i in order:
            p = pending[self._bucket[i]]
            p.append(i)
            if len(p) == B:
                batches.append(np.array(p))
                p.clear()
        carry = []
        for p in pending:
            carry += p
            while len(carry) >= B:
                batches.append(np.array(carry[:B]))
                carry = carry[B:]
        return batches

    def _initial_capacity(self, epochs: int = 3) -> dict[int, int]:
        """Per row length, labelled tokens a row may hold: the most in the first epochs' plans."""
        n_lab = self.data.label_counts
        cap: dict[int, int] = {}
        for e in range(epochs):
            for T, rows in self.plan(e):
                most = max(int(n_lab[r].sum()) if r else 0 for r in rows)
                cap[T] = max(cap.get(T, 0), most)
        self._plan_epoch = None  # re-plan the current epoch lazily
        return {T: round_capacity(c) for T, c in cap.items()}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        plan = self.plan(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self.plan(self.epoch)
        T, rows = plan[self.position]
        self.position += 1
        batch = with_label_slots(collate_rows(self.data, rows, T, self.pad_id),
                                 self.capacity.get(T, 0))
        used = batch["loss_pos"].shape[1]
        if used > self.capacity.get(T, 0):
            log.warning("a batch row has more labelled tokens than the capacity %d of rows of "
                        "%d: raising it to %d (one more compile)", self.capacity.get(T, 0), T,
                        used)
            self.capacity[T] = used
        return {k: v[self.rows] for k, v in batch.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict, step: int | None = None) -> None:
        """Continue from `state`. step: the checkpoint's step, which the state must have served
        exactly (a damaged or foreign data position is refused, not replayed); None when the
        data changed since (train.allow_data_change): a position past the new data's epoch
        then starts the next epoch."""
        try:
            seed, epoch, position = (int(state[k]) for k in ("seed", "epoch", "position"))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"data state {state!r} is damaged (it needs integer seed, epoch "
                            "and position)") from None
        if seed != self.seed:
            raise DataError(f"data state has seed {seed}, this iterator {self.seed}")
        if epoch < 0 or position < 0:
            raise DataError(f"data state has epoch {epoch}, position {position}: negative")
        n = len(self.plan(epoch))
        if step is None:
            position = min(position, n)
        else:
            served = sum(len(self.plan(e)) for e in range(epoch)) + position
            if position > n or served != step:
                raise DataError(f"data state (epoch {epoch}, position {position} of {n}) has "
                                f"served {served} batches, but its checkpoint is at step {step}: "
                                "the checkpoint's metadata does not belong to this run's data")
        self.epoch, self.position = epoch, position


def packed_plan(data: TokenizedData, batch_size: int, row_len: int) -> tuple[list, int]:
    """(batches of rows of example indices, label-slot capacity) for one pass over `data` in
    file order, first fit into rows of `row_len`: the plan eval_batches(packing=True) collates,
    for callers that map scored slots back to examples."""
    n_lab = data.label_counts
    plan = pack_rows(range(len(data)), data.lengths, row_len, batch_size)
    capacity = round_capacity(max(int(n_lab[r].sum()) for rows in plan for r in rows if r))
    return plan, capacity


def eval_batches(data: TokenizedData, batch_size: int, buckets, pad_id: int = 0, *,
                 packing: bool = False):
    """Every example once, in file order; shapes stay (batch_size, T), the last batch filled
    with empty rows (no tokens, no labels). Unpacked: one example a row, grouped by bucket.
    Packed: first fit into rows of the largest bucket, as training packs, so a validation pass
    costs the rows its tokens fill rather than one row an example; segment ids keep every
    example's loss its own. Label slots hold the busiest row's labels: one shape per T."""
    if packing:
        T = int(buckets[-1])
        plan, capacity = packed_plan(data, batch_size, T)
        for rows in plan:
            yield with_label_slots(collate_rows(data, rows, T, pad_id), capacity)
        return
    bucket = bucket_index(data.lengths, buckets)
    capacity = round_capacity(int(data.label_counts.max()))
    for b in range(len(buckets)):
        members = np.flatnonzero(bucket == b)
        for start in range(0, len(members), batch_size):
            idx = [int(i) for i in members[start:start + batch_size]]
            rows = [[i] for i in idx] + [[] for _ in range(batch_size - len(idx))]
            yield with_label_slots(collate_rows(data, rows, int(buckets[b]), pad_id), capacity)

__all__ = ["BatchIterator", "bucket_index", "collate", "collate_rows", "eval_batches",
           "label_slots", "labelled_per_row", "next_token_targets", "pack_rows", "packed_plan",
           "round_capacity", "with_label_slots"]
