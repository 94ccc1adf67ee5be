"""One simulated continuous-batching engine (a replica, or one pipeline virtual engine).

Scheduling follows vLLM: every iteration first advances all running decodes by one token,
then continues partial prefills, then admits waiting requests (FIFO) while the token
budget, the running-sequence cap and free KV blocks allow; chunked prefill splits a prompt
over iterations. When decodes need a KV block and none is free, the most recently admitted
running request is preempted (recompute: its blocks are freed and it waits at the head of
the queue to prefill prompt + generated tokens again).

Decoding sequences are not touched one by one each iteration: every decode advances in
every iteration, so a decode's progress is `steps + offset`, and a run of iterations in
which nothing but decoding can happen (no arrival, no completion, no admission, no block
shortage) is priced in one vectorised call and applied at once ("fast-forward"). With
`fast_forward=False` every run is one iteration: the results are the same.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque

import numpy as np

from cascadia.perf.iteration import IterationModel
from cascadia.sim.config import EngineConfig

MAX_RUN_STEPS = 4096


class SimSeq:
    """A request's visit to one stage."""

    __slots__ = ("rid", "prompt", "output", "computed", "generated", "off", "fin", "shared_blocks",
                 "arrival_s", "first_token_s", "finish_s", "hash_ids", "decoding", "epoch", "preemptions")

    def __init__(self, rid: int, prompt: int, output: int, arrival_s: float, hash_ids=None):
        self.rid = rid
        self.prompt = prompt
        self.output = output
        self.computed = 0  # tokens in the KV cache (valid while prefilling)
        self.generated = 0
        self.off = 0  # while decoding: computed = engine.steps + off
        self.fin = 0  # while decoding: engine.steps value at which it finishes
        self.shared_blocks = 0  # prefix-cache blocks it reuses without allocating
        self.arrival_s = arrival_s
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.hash_ids = hash_ids
        self.decoding = False  # in the engine's decode set (progress kept as steps + off)
        self.epoch = 0  # bumps on every entry to the decode set; stale heap entries differ
        self.preemptions = 0

    def remaining_tokens(self) -> int:
        return (self.prompt + self.generated - self.computed) + (self.output - self.generated)


class SimEngine:
    """State of one engine; the cluster loop calls `add`, `start` and `finish_run`."""

    def __init__(self, model: IterationModel, config: EngineConfig, kv_blocks: int, *,
                 fast_forward: bool = True, hash_block_tokens: int = 512, name: str = ""):
        self.im = model
        self.cfg = config
        self.bs = config.block_size_tokens
        self.total_blocks = kv_blocks
        self.used_blocks = 0
        self.fast_forward = fast_forward
        self.name = name
        self.waiting: deque[SimSeq] = deque()
        self.waiting_tokens = 0
        self.running: list[SimSeq] = []  # admission order (preemption takes from the end)
        self.prefilling: list[SimSeq] = []
        # decode set, kept as aggregates
        self.steps = 0
        self.n_dec = 0
        self.sum_off = 0
        self.sum_fin = 0
        self.fin_heap: list[tuple[int, int, int, SimSeq]] = []  # (fin, rid, epoch, seq)
        self.residues = [0] * self.bs  # decodes by (off mod block size)
        # the run in flight
        self.busy = False
        self.run_start_s = 0.0
        self.run_ends: np.ndarray | None = None  # iteration end times of a multi-step run
        self.run_end = 0.0
        self.run_steps = 0
        self.run_chunks: list[tuple[SimSeq, int]] = []
        self.run_decodes = True  # False for a prefill-only iteration (decodes stalled)
        self.wake_pending = False
        self.version = 0
        self.busy_s = 0.0
        self.iterations = 0
        self.preemptions = 0
        self.prefix_cache: OrderedDict[int, None] = OrderedDict()
        self.hash_block_tokens = hash_block_tokens
        self.prefix_capacity = max(1, kv_blocks * self.bs // hash_block_tokens)
        self.prefix_hit_tokens = 0

    # ---------------- bookkeeping ----------------
    def outstanding_tokens(self, now: float) -> int:
        """Tokens still to compute for everything here (prompt remainders + outputs)."""
        steps = self.steps
        if self.busy and self.run_steps > 1 and not self.run_chunks:
            steps += int(np.searchsorted(self.run_ends, now, side="right"))
        dec = self.sum_fin - self.n_dec * steps
        pre = sum(s.remaining_tokens() for s in self.prefilling)
        return dec + pre + self.waiting_tokens

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.bs)

    def _dec_add(self, s: SimSeq) -> None:
        s.off = s.computed - self.steps
        s.fin = s.prompt + s.output - 1 - s.off
        self.n_dec += 1
        self.sum_off += s.off
        self.sum_fin += s.fin
        self.residues[s.off % self.bs] += 1
        s.decoding = True
        s.epoch += 1
        heapq.heappush(self.fin_heap, (s.fin, s.rid, s.epoch, s))

    def _dec_remove(self, s: SimSeq) -> None:
        self.n_dec -= 1
        self.sum_off -= s.off
        self.sum_fin -= s.fin
        self.residues[s.off % self.bs] -= 1
        s.computed = self.steps + s.off
        s.generated = s.computed + 1 - s.prompt
        s.decoding = False  # its fin_heap entry is dropped lazily

    def _dec_new_blocks(self, steps_ahead: int) -> int:
        """Blocks the decode set allocates in the iteration `steps_ahead` from now."""
        return self.residues[(-(self.steps + steps_ahead)) % self.bs]

    # ---------------- arrivals ----------------
    def fits(self, s: SimSeq) -> bool:
        """Whether the request can ever be held: vLLM rejects a request longer than its
        KV cache up front instead of letting it block the queue."""
        return self._blocks_for(s.prompt + s.output) <= self.total_blocks

    def add(self, s: SimSeq, now: float) -> None:
        self.waiting.append(s)
        self.waiting_tokens += s.remaining_tokens()
        if self.busy and self.run_steps > 1:
            self._truncate_run(now)

    def _truncate_run(self, now: float) -> None:
        """An arrival during a fast-forwarded run: the run ends after the iteration in
        progress, exactly where a step-by-step engine would first see the arrival."""
        done = int(np.searchsorted(self.run_ends, now, side="right"))
        keep = min(done + 1, self.run_steps)
        if keep < self.run_steps:
            self.run_steps = keep
            self.run_ends = self.run_ends[:keep]
            self.run_end = float(self.run_ends[-1])
            self.version += 1

    @property
    def run_end_s(self) -> float:
        return self.run_end

    # ---------------- scheduling ----------------
    def _seq_blocks(self, s: SimSeq) -> int:
        return max(0, self._blocks_for(s.computed) - s.shared_blocks)

    def _unschedule(self, s: SimSeq) -> None:
        """Take a sequence already removed from `running` out of the batch bookkeeping and
        free its KV blocks."""
        if s.decoding:
            self._dec_remove(s)
        else:
            self.prefilling.remove(s)
        self.used_blocks -= self._seq_blocks(s)

    def drop(self, s: SimSeq) -> None:
        """Forget a request whose client went away: out of the queue, or out of the batch
        with its KV blocks freed (call between runs: a running batch is fixed)."""
        if s in self.waiting:
            self.waiting.remove(s)
            self.waiting_tokens -= s.remaining_tokens()
        elif s in self.running:
            self.running.remove(s)
            self._unschedule(s)

    def end_run_early(self, now: float) -> None:
        """End a fast-forwarded run after the iteration in progress at `now` (what an
        arrival does), so a change to the batch takes effect where a real engine's would."""
        if self.busy and self.run_steps > 1:
            self._truncate_run(now)

    def _preempt(self) -> SimSeq:
        """Free the most recently admitted running request and queue it first again."""
        victim = self.running.pop()
        self._unschedule(victim)
        victim.computed = 0
        victim.shared_blocks = 0
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        self.waiting_tokens += victim.remaining_tokens()
        return victim

    def start(self, now: float) -> bool:
        """Schedule the next run at `now`; False when there is nothing to do."""
        cfg = self.cfg
        free = self.total_blocks - self.used_blocks
        preempted = False
        if not cfg.enable_chunked_prefill and self.waiting:
            # vLLM without chunked prefill: an iteration that can admit prompts runs
            # only prefills, and every running decode stalls for it
            chunks = self._admit(cfg.max_num_batched_tokens, free)
            if chunks:
                return self._launch(now, chunks, decodes=False)
        # 1. decodes: one token each, allocating a block where a sequence crosses one
        need = self._dec_new_blocks(0)
        while need > free and self.running:
            self._preempt()
            preempted = True
            free = self.total_blocks - self.used_blocks
            need = self._dec_new_blocks(0)
        budget = cfg.max_num_batched_tokens - self.n_dec
        chunks: list[tuple[SimSeq, int]] = []
        free -= need
        # 2. partial prefills, in admission order
        for s in list(self.prefilling):
            if budget <= 0:
                break
            if s not in self.prefilling:  # preempted while making room for an earlier one
                continue
            n = min(s.prompt + s.generated - s.computed, budget)
            extra = self._blocks_for(s.computed + n) - self._blocks_for(s.computed)
            while extra > free and self.running:
                victim = self._preempt()
                preempted = True
                need = self._dec_new_blocks(0)
                free = self.total_blocks - self.used_blocks - need
                if victim is s:
                    break
            if s not in self.prefilling:
                continue
            free -= extra
            self.used_blocks += extra
            chunks.append((s, n))
            budget -= n
        # 3. admissions (vLLM admits nothing in an iteration that preempted; without
        # chunked prefill they were tried above, in a prefill-only iteration)
        if not preempted and cfg.enable_chunked_prefill:
            chunks += self._admit(budget, free)
        self.used_blocks += need
        if not chunks and self.n_dec == 0:
            self.used_blocks -= need
            self.busy = False
            return False
        return self._launch(now, chunks, decodes=True, preempted=preempted, free=free)

    def _admit(self, budget: int, free: int) -> list[tuple[SimSeq, int]]:
        """Admit waiting requests (FIFO) while budget, running cap and free blocks allow."""
        cfg = self.cfg
        chunks: list[tuple[SimSeq, int]] = []
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            s = self.waiting[0]
            if s.computed == 0 and cfg.enable_prefix_caching and s.hash_ids:
                self._match_prefix(s)
            todo = s.prompt + s.generated - s.computed
            if not cfg.enable_chunked_prefill and todo > budget:
                break
            n = min(todo, budget)
            blocks = max(0, self._blocks_for(s.computed + n) - s.shared_blocks)
            if blocks > free:
                break
            self.waiting.popleft()
            self.waiting_tokens -= s.remaining_tokens()
            free -= blocks
            self.used_blocks += blocks
            self.running.append(s)
            self.prefilling.append(s)
            chunks.append((s, n))
            budget -= n
        return chunks

    def _launch(self, now: float, chunks: list[tuple[SimSeq, int]], *, decodes: bool, preempted: bool = False,
                free: int = 0) -> bool:
        """Price the run (one iteration with prefill chunks, or a run of decode-only
        iterations) and mark the engine busy until it ends."""
        n = self.n_dec if decodes else 0
        ctx = n * self.steps + self.sum_off if decodes else 0
        if chunks:
            steps = 1
            tokens, pairs, kv_read = float(n), float(ctx + n), float(ctx)
            for s, c in chunks:
                tokens += c
                pairs += c * s.computed + c * (c + 1) / 2.0
                kv_read += s.computed
            times = None
            t_one = self.im.time_one(tokens, float(n + len(chunks)), pairs, kv_read)
        else:
            steps = self._run_length(free) if self.fast_forward and not preempted else 1
            if steps > 1:
                times = self.im.decode_run_times_s(n, ctx, steps)
            else:
                times = None
                t_one = self.im.time_one(float(n), float(n), float(ctx + n), float(ctx))
        self.run_chunks = chunks
        self.run_decodes = decodes
        self.run_steps = steps
        self.run_start_s = now
        if times is None:
            self.run_end = now + t_one
            self.run_ends = None
        else:
            self.run_ends = now + np.cumsum(times)
            self.run_end = float(self.run_ends[-1])
        self.busy = True
        self.version += 1
        return True

    def _dec_blocks_over(self, first: int, last: int) -> int:
        """Blocks decodes allocate in iterations first..last-1 from now."""
        if last - first <= 2 * self.bs:
            return sum(self._dec_new_blocks(j) for j in range(first, last))
        idx = (-(self.steps + np.arange(first, last))) % self.bs
        return int(np.asarray(self.residues)[idx].sum())

    def _run_length(self, free_after_first: int) -> int:
        """How many decode-only iterations can run before something else can happen."""
        # Admission was just tried and failed (or nothing waits); it stays impossible while
        # only decodes run, since they never free blocks or running slots.
        heap = self.fin_heap
        while heap and (not heap[0][3].decoding or heap[0][3].epoch != heap[0][2]):
            heapq.heappop(heap)
        k = min(heap[0][0] - self.steps, MAX_RUN_STEPS) if heap else 1
        k = max(k, 1)
        if k > 1 and free_after_first < self.n_dec * (-(-k // self.bs) + 1):
            # blocks may run out: stop before the first iteration that would preempt
            idx = (-(self.steps + np.arange(1, k))) % self.bs
            cum = np.cumsum(np.asarray(self.residues)[idx])
            short = np.nonzero(cum > free_after_first)[0]
            if short.size:
                k = int(short[0]) + 1
        return k

    def _match_prefix(self, s: SimSeq) -> None:
        hits = 0
        for h in s.hash_ids:
            if h in self.prefix_cache:
                self.prefix_cache.move_to_end(h)
                hits += 1
            else:
                break
        cached = min(hits * self.hash_block_tokens, s.prompt - 1)
        cached -= cached % self.bs
        if cached > 0:
            s.computed = cached
            s.shared_blocks = cached // self.bs
            self.prefix_hit_tokens += cached
            self.waiting_tokens -= cached

    def _remember_prefix(self, s: SimSeq) -> None:
        for h in s.hash_ids:
            self.prefix_cache[h] = None
            self.prefix_cache.move_to_end(h)
        while len(self.prefix_cache) > self.prefix_capacity:
            self.prefix_cache.popitem(last=False)

    def finish_run(self, now: float) -> list[SimSeq]:
        """Apply the run that ended at `now`; returns sequences that completed."""
        steps = self.run_steps
        self.iterations += steps
        self.busy_s += now - self.run_start_s
        self.busy = False
        done: list[SimSeq] = []
        if steps > 1:
            self.used_blocks += self._dec_blocks_over(1, steps)
        if self.run_decodes:
            self.steps += steps
        for s, c in self.run_chunks:
            s.computed += c
            if s.computed == s.prompt + s.generated:
                s.generated += 1
                if s.first_token_s < 0:
                    s.first_token_s = now
                self.prefilling.remove(s)
                if self.cfg.enable_prefix_caching and s.hash_ids:
                    self._remember_prefix(s)
                if s.generated >= s.output:
                    self._release(s, now)
                    done.append(s)
                else:
                    # computed counts this iteration's step already: off relative to new steps
                    self._dec_add(s)
        heap = self.fin_heap
        while heap and heap[0][0] <= self.steps:
            _, _, epoch, s = heapq.heappop(heap)
            if not s.decoding or s.epoch != epoch:
                continue
            self._dec_remove(s)
            self._release(s, now)
            done.append(s)
        self.run_chunks = []
        return done

    def _release(self, s: SimSeq, now: float) -> None:
        self.used_blocks -= self._seq_blocks(s)
        s.finish_s = now
        self.running.remove(s)
