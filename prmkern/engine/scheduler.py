"""Continuous batching: which sequences run in the next step, and how many of their tokens.

A step is either a prefill step (new and partially prefilled sequences, chunked under a per-step token budget) or a
decode step (one token for every sequence that has all but its newest token in the cache). Prefill goes first, so
new requests join the running batch as soon as memory allows. When the block pool runs dry during decode, the most
recently admitted sequences are preempted: their blocks are freed and they are recomputed later (by prefill, which
the prefix cache mostly skips), so outputs are unchanged. Knows nothing of tensors or models.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from prmkern.engine.block_manager import BlockManager
from prmkern.config import EngineConfig
from prmkern.engine.sequence import Sequence, SequenceStatus
from prmkern.stats import EngineStats


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position whose KV this step computes
    num_new: int  # tokens computed this step
    store_from: int  # positions below this are already in the cache (not written again)
    # Positions from here to end - 1 all need their logits (prompt_logprobs); None: only the last one, if it samples.
    logits_from: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.num_new

    @property
    def samples(self) -> bool:
        """Whether this step produces the sequence's next token (its last uncomputed token is in this step)."""
        return self.end == self.seq.num_tokens

    @property
    def num_logit_rows(self) -> int:
        """Rows of logits the runner returns for this item, in position order."""
        if self.logits_from is not None:
            return self.end - self.logits_from
        return 1 if self.samples else 0


@dataclass
class SchedulerOutput:
    is_prefill: bool
    scheduled: list[ScheduledSeq]
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies, before the forward


# Most positions of one sequence whose logits (vocab wide, float32) one prefill step returns for prompt_logprobs.
PROMPT_LOGIT_ROWS = 1024


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, stats: EngineStats):
        self.config = config
        self.bm = block_manager
        self.stats = stats
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished_early: list[Sequence] = []  # ended by the scheduler (KV pool exhausted), for the engine

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        out = self._schedule_prefill()
        if out is None:
            out = self._schedule_decode()
        return out

    # -- prefill --------------------------------------------------------------------------------------------------
    def _schedule_prefill(self) -> SchedulerOutput | None:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        in_flight: set[int] = set()  # blocks that this step's batch fills, readable by later rows of the batch
        candidates = [s for s in self.running if s.num_uncomputed_tokens > 1] + list(self.waiting)
        occupied = sum(s.params.n if s.needs_fork else 1 for s in self.running)  # chains, counting forks to come
        for seq in candidates:
            if budget == 0:
                break
            if seq.status is SequenceStatus.WAITING:
                chains = seq.params.n if seq.needs_fork else 1
                if self.running and occupied + chains > self.config.max_num_seqs:
                    break
                if not self.bm.allocate(seq):
                    break  # first come, first served: later requests wait behind this one
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                occupied += chains
            skip = self._skip_cached(seq, in_flight)
            if skip is None:
                continue  # another sequence is computing the blocks this one needs next
            start, store_from = skip
            num_new = min(seq.num_tokens - start, budget)
            logits_from = seq.request.first_prompt_row
            if logits_from is not None:
                # prompt_logprobs: logits at position p give the log-probability of prompt token p + 1; pooling:
                # the head's rows from the first pooled position. Bound the rows per step.
                num_new = min(num_new, logits_from + PROMPT_LOGIT_ROWS - start)
                if logits_from >= start + num_new:
                    logits_from = None  # this chunk ends before the first position that is scored
            self.stats.cached_tokens += start - seq.num_computed_tokens
            seq.num_computed_tokens = start
            bs = self.bm.block_size
            in_flight.update(seq.block_table[start // bs:(start + num_new) // bs])
            if seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = start
            scheduled.append(ScheduledSeq(seq, start, num_new, store_from, logits_from))
            budget -= num_new
        return SchedulerOutput(True, scheduled) if scheduled else None

    def _skip_cached(self, seq: Sequence, in_flight: set[int]) -> tuple[int, int] | None:
        """Where this sequence's computation starts: past leading full blocks whose KV is in the cache or is being
        computed earlier in this batch. None if the next block is being computed by another sequence not in this
        batch (wait one step rather than compute it twice)."""
        bs = self.bm.block_size
        pos = seq.num_computed_tokens
        if pos % bs:
            return pos, pos
        # prompt_logprobs and pooling need the hidden state of every position from `need` on: blocks up to it may be
        # skipped.
        first = seq.request.first_prompt_row
        need = seq.num_tokens if first is None else first
        i = pos // bs
        while (i + 1) * bs <= min(seq.num_tokens, need):
            block_id = seq.block_table[i]
            if self.bm.is_computed(block_id) or block_id in in_flight:
                i += 1
                continue
            owner = self.bm.owner(block_id)
            if owner is not None and owner != seq.seq_id:
                return None
            break
        store_from = max(pos, i * bs)
        # The last token is always run through the model: its logits give the next token.
        return min(store_from, seq.num_tokens - 1, need), store_from

    # -- decode ---------------------------------------------------------------------------------------------------
    def _schedule_decode(self) -> SchedulerOutput | None:
        queue = [s for s in self.running if s.num_uncomputed_tokens == 1]
        scheduled: list[ScheduledSeq] = []
        copies: list[tuple[int, int]] = []
        while queue:
            seq = queue.pop(0)
            while (cow := self.bm.append_slot(seq)) is None:
                if queue:
                    self.preempt(queue.pop())  # the most recently admitted gives way
                elif len(self.running) == 1:
                    # Alone and still out of blocks: the whole pool holds this sequence; it cannot grow further.
                    seq.finish_reason, seq.kv_pool_exhausted = "length", True
                    self.finish(seq)
                    self.finished_early.append(seq)
                    break
                else:
                    self.preempt(seq)
                    break
            else:
                copies.extend(cow)
                scheduled.append(ScheduledSeq(seq, seq.num_tokens - 1, 1, seq.num_tokens - 1))
        return SchedulerOutput(False, scheduled, copies) if scheduled else None

    def preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (its request failed)."""
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            seq.status = SequenceStatus.FINISHED
