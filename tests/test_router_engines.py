"""Router engines: the protocol types, replica dispatch, the simulated engine's fidelity to
the offline simulator, and (marked `engine`) a real vLLM engine in a Ray actor."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time

import numpy as np
import pytest

from cascadia.catalog import get_model
from cascadia.perf.iteration import IterationModel
from cascadia.perf.layout import Layout
from cascadia.sim.cluster import StageDeployment, simulate
from cascadia.sim.config import EngineConfig
from cascadia.specs.gpu import get_gpu
from cascadia.traces import Trace, builtin_trace_path, load_trace
from router.engines.sim import SimulatedEngine, approx_tokens
from router.engines.vllm_ray import replica_placement
from router.pool import PoolFull, ReplicaPool
from router.protocol import Engine, GenerateRequest, TokenChunk

STAGE = StageDeployment(get_model("llama-3-8b"), get_gpu("H100"), (Layout(1),), EngineConfig())


def run(coro):
    return asyncio.run(coro)


# ---------------- protocol ----------------

def test_protocol_dataclasses_validate_and_are_frozen():
    req = GenerateRequest("r1", "hi", max_tokens=5)
    assert (req.temperature, req.top_p, req.stop, req.seed, req.ignore_eos, req.logprobs) == (1.0, 1.0, (), None,
                                                                                           False, True)
    with pytest.raises(Exception):
        req.max_tokens = 7  # frozen
    with pytest.raises(ValueError, match="max_tokens"):
        GenerateRequest("r", "hi", max_tokens=0)
    with pytest.raises(ValueError, match="logprobs"):
        TokenChunk((1, 2), "ab", (-0.1,))
    with pytest.raises(ValueError, match="finish_reason"):
        TokenChunk((), "", (), finished=True, finish_reason="eos")
    assert TokenChunk((1,), "a", ()).logprobs == ()


# ---------------- pool ----------------

class FakeEngine:
    """Streams max_tokens tokens, one per `release()`; records aborts."""

    def __init__(self, name="m"):
        self.name = name
        self.max_model_len = 4096
        self.gate = asyncio.Event()
        self.served: list[str] = []
        self.aborted: list[str] = []

    async def generate(self, req):
        self.served.append(req.request_id)
        finished = False
        try:
            for k in range(req.max_tokens):
                if k:  # the first token comes at once, the rest when the test releases them
                    await self.gate.wait()
                finished = k == req.max_tokens - 1
                yield TokenChunk((k,), "t", (-0.5,), finished=finished, finish_reason="length" if finished else None)
        finally:
            if not finished:
                self.aborted.append(req.request_id)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    async def chat_prompt(self, messages):
        return messages[-1]["content"]

    async def count_tokens(self, text):
        return len(text)

    async def health(self):
        return True

    async def stats(self):
        return {}


async def _first_chunk(pool, req):
    """Start a request and hold it open after its first chunk."""
    gen = pool.generate(req)
    first = await gen.__anext__()
    return gen, first


def test_pool_sends_to_least_outstanding_tokens_and_releases_work():
    async def go():
        a, b = FakeEngine(), FakeEngine()
        pool = ReplicaPool([a, b], max_queue=10)
        assert isinstance(pool, Engine) and isinstance(a, Engine)
        big = GenerateRequest("big", "x" * 400, max_tokens=100)  # 100 + 100 tokens of work
        small = GenerateRequest("small", "y" * 40, max_tokens=10)  # 10 + 10
        g1, _ = await _first_chunk(pool, big)
        g2, _ = await _first_chunk(pool, small)
        assert a.served == ["big"] and b.served == ["small"]
        assert pool.outstanding_tokens == (199, 19)  # prompt/4 + max_tokens - 1 token received
        g3, _ = await _first_chunk(pool, GenerateRequest("third", "z" * 40, max_tokens=10))
        assert b.served == ["small", "third"]  # 19 < 199
        # finishing releases all of a request's work; closing early aborts it in the engine
        b.gate.set()
        rest = [c async for c in g2]
        assert rest[-1].finished and pool.outstanding_tokens[1] == 19
        await g1.aclose()
        # the engine's own close and the pool both abort (engines treat a repeated abort as a no-op)
        assert set(a.aborted) == {"big"} and pool.outstanding_tokens[0] == 0
        assert pool.in_flight == 1
        await g3.aclose()
        assert pool.in_flight == 0 and pool.outstanding_tokens == (0, 0)
    run(go())


def test_pool_prefers_the_replica_with_the_same_prefix_when_loads_are_close():
    async def go():
        a, b = FakeEngine(), FakeEngine()
        pool = ReplicaPool([a, b], max_queue=10, affinity_slack_tokens=64)
        a.gate.set()
        b.gate.set()
        prompt = "You are a helpful assistant. " * 20
        async for _ in pool.generate(GenerateRequest("p1", prompt, max_tokens=3)):
            pass
        g, _ = await _first_chunk(pool, GenerateRequest("other", "q" * 40, max_tokens=10))
        assert a.served == ["p1", "other"]
        # a holds 19 tokens of work, b none: close enough, so the shared prefix wins
        async for _ in pool.generate(GenerateRequest("p2", prompt, max_tokens=3)):
            pass
        assert a.served[-1] == "p2"
        await g.aclose()
    run(go())


def test_pool_queue_is_bounded_and_power_of_two_for_large_pools():
    async def go():
        engines = [FakeEngine() for _ in range(2)]
        pool = ReplicaPool(engines, max_queue=2)
        gens = [(await _first_chunk(pool, GenerateRequest(f"r{i}", "x", max_tokens=5)))[0] for i in range(2)]
        with pytest.raises(PoolFull, match="max_queue 2"):
            async for _ in pool.generate(GenerateRequest("r2", "x", max_tokens=5)):
                pass
        assert pool.rejected == 1
        for g in gens:
            await g.aclose()
        many = ReplicaPool([FakeEngine() for _ in range(16)], max_queue=100, seed=1)
        many._outstanding = [1000] * 16
        many._outstanding[3] = 0
        picks = {many._pick_index() for _ in range(200)}
        assert 3 in picks and len(picks) > 1  # only two are compared each time
    run(go())


# ---------------- placement ----------------

def test_replica_placement_packs_tp_in_a_bundle_and_spreads_pp_stages_on_request():
    p = replica_placement(4, 2, device="GPU", pp_across_nodes=True)
    assert p.bundles == ({"GPU": 4.0, "CPU": 1.0}, {"GPU": 4.0, "CPU": 1.0}) and p.strategy == "SPREAD"
    one_node = replica_placement(2, 2, device="GPU")
    assert one_node.strategy == "STRICT_PACK" and len(one_node.bundles) == 2
    assert replica_placement(2, 1, device="CPU").bundles == ({"CPU": 2.0},)
    with pytest.raises(ValueError):
        replica_placement(0, 1)


# ---------------- local tokenizer of a Ray engine ----------------

class _Remote:
    """`actor.method.remote(...)` of a fake actor: counts calls, answers a fixed value."""

    def __init__(self, calls: list, name: str, answer):
        self.calls, self.name, self.answer = calls, name, answer

    def remote(self, *args):
        self.calls.append((self.name, args))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.answer)
        return fut


class FakeActor:
    def __init__(self):
        self.calls: list = []
        self.chat_prompt = _Remote(self.calls, "chat_prompt", "ACTOR PROMPT")
        self.count_tokens = _Remote(self.calls, "count_tokens", 999)


def _tiny_tokenizer_dir(path) -> str:
    """A word-level tokenizer with a chat template, saved like a model directory's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<user>", "<assistant>", "hello", "there", "name", "colours"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(str(path))
    return str(path)


def test_ray_engine_with_a_local_tokenizer_makes_no_actor_calls_for_templates_and_counts(tmp_path):
    from router.engines.vllm_ray import RayEngine

    model_dir = _tiny_tokenizer_dir(tmp_path / "model")
    actor = FakeActor()
    eng = RayEngine("m", actor, {"max_model_len": 512}, tokenizer_dir=model_dir)

    async def go():
        prompts = await asyncio.gather(*(eng.chat_prompt([{"role": "user", "content": f"hello there {k}"}])
                                         for k in range(5)))
        counts = [await eng.count_tokens(p) for p in prompts]
        return prompts, counts

    prompts, counts = run(go())
    assert actor.calls == []
    assert prompts[0] == "<user> hello there 0 <assistant>"
    # "<", "user", ">" ... the whitespace pre-tokenizer splits on punctuation: count by hand
    assert counts[0] == len("< user > hello there 0 < assistant >".split())
    assert eng.local_tokenizer.available


def test_ray_engine_asks_the_actor_when_the_tokenizer_is_not_on_this_host(tmp_path):
    from router.engines.local_tokenizer import LocalTokenizer
    from router.engines.vllm_ray import RayEngine

    actor = FakeActor()
    remote_only = RayEngine("m", actor, {"max_model_len": 512}, tokenizer_dir=str(tmp_path / "not-here"))

    loads = []

    def broken_loader(path):
        loads.append(path)
        raise OSError("no tokenizer files")

    broken = RayEngine("m", actor, {"max_model_len": 512}, tokenizer_dir=str(tmp_path))
    broken.local_tokenizer = LocalTokenizer(str(tmp_path), loader=broken_loader)

    async def go():
        out = []
        for eng in (remote_only, broken, broken):
            out.append((await eng.chat_prompt([{"role": "user", "content": "hi"}]), await eng.count_tokens("x")))
        return out

    assert run(go()) == [("ACTOR PROMPT", 999)] * 3
    assert [name for name, _ in actor.calls] == ["chat_prompt", "count_tokens"] * 3
    assert loads == [str(tmp_path)]  # a failed load is not retried on every request
    assert "OSError" in broken.local_tokenizer.error and "not a directory" in remote_only.local_tokenizer.error


# ---------------- simulated engine ----------------

def test_simulated_lone_request_matches_the_iteration_model():
    im = IterationModel(STAGE.model, STAGE.gpu, Layout(1))
    prefill = im.iteration_time_s([(4000, 0)], [])
    e2e = prefill + sum(im.iteration_time_s([], [4000 + j]) for j in range(199))
    dilation = 2.0

    async def go():
        eng = SimulatedEngine.from_stage("llama", STAGE, time_dilation=dilation, chunk_interval_s=0.05)
        t0 = time.monotonic()
        first, chunks, text = None, [], ""
        async for c in eng.generate(GenerateRequest("r", "x" * (4 * 4000), max_tokens=200)):
            first = time.monotonic() - t0 if first is None else first
            chunks.append(c)
        end = time.monotonic() - t0
        await eng.shutdown()
        return first * dilation, end * dilation, chunks

    ttft, total, chunks = run(go())
    assert ttft == pytest.approx(prefill, rel=0.1)
    assert total == pytest.approx(e2e, rel=0.1)
    assert sum(len(c.token_ids) for c in chunks) == 200
    assert chunks[0].prompt_tokens == 4000 and chunks[-1].finish_reason == "length"
    assert 5 < len(chunks) < 200  # coalesced, yet streamed
    assert all(len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs) for c in chunks)
    assert "".join(c.text for c in chunks).split()[0]


def test_simulated_answers_confidence_is_per_request_and_independent_of_chunking():
    """The logprob judge's score of a simulated answer depends on its request id only: not
    on how the tokens were chunked (load, chunk interval), and not shrinking toward one
    value for long answers (each answer draws its own mean logprob)."""
    async def answer(chunk_interval_s: float, rid: str, n: int):
        eng = SimulatedEngine.from_stage("llama", STAGE, time_dilation=200.0, chunk_interval_s=chunk_interval_s)
        chunks = [c async for c in eng.generate(GenerateRequest(rid, "x" * 40, max_tokens=n, logprobs=True))]
        await eng.shutdown()
        return len(chunks), [lp for c in chunks for lp in c.logprobs]

    async def go():
        fine, coarse = await answer(0.01, "q1", 300), await answer(10.0, "q1", 300)
        long_scores = [math.exp(sum(lps) / len(lps)) for _, lps in
                       [await answer(1.0, f"long{k}", 400) for k in range(24)]]
        return fine, coarse, long_scores

    (n_fine, fine), (n_coarse, coarse), long_scores = run(go())
    assert n_fine > n_coarse and fine == coarse
    assert max(long_scores) - min(long_scores) > 0.2  # 400-token answers still spread widely


def test_simulated_abort_frees_the_engine():
    async def go():
        eng = SimulatedEngine.from_stage("llama", STAGE, time_dilation=5.0)
        gen = eng.generate(GenerateRequest("a", "x" * 400, max_tokens=2000))
        async with contextlib.aclosing(gen):
            async for _ in gen:
                break
        await asyncio.sleep(0.05)
        stats = await eng.stats()
        await eng.shutdown()
        return stats
    stats = run(go())
    assert stats["requests_aborted"] == 1 and stats["running"] == 0 and stats["outstanding_tokens"] == 0


def test_simulated_engine_matches_offline_simulator_on_a_trace_slice():
    full = load_trace(builtin_trace_path("azure-conv"))
    n = 30
    arrivals = (full.arrival_s[:n] - full.arrival_s[0]) * 0.1  # 10x the rate: requests overlap and batch
    trace = Trace("slice", arrivals, full.input_tokens[:n], full.output_tokens[:n])
    offline = simulate(trace, STAGE).e2e_s
    dilation = 1.0

    async def go():
        eng = SimulatedEngine.from_stage("llama", STAGE, time_dilation=dilation)
        t0 = time.monotonic() + 0.05

        async def one(i):
            await asyncio.sleep(max(0.0, t0 + arrivals[i] / dilation - time.monotonic()))
            sent = time.monotonic()
            req = GenerateRequest(f"r{i}", "x" * (4 * int(trace.input_tokens[i])),
                                  max_tokens=int(trace.output_tokens[i]), ignore_eos=True)
            async for _ in eng.generate(req):
                pass
            return (time.monotonic() - sent) * dilation

        out = await asyncio.gather(*(one(i) for i in range(n)))
        stats = await eng.stats()
        await eng.shutdown()
        return np.array(out), stats

    live, stats = run(go())
    assert stats["requests_done"] == n
    for q in (50, 95):
        assert np.percentile(live, q) == pytest.approx(np.percentile(offline, q), rel=0.1), q
    assert approx_tokens("x" * 9) == 3


# ---------------- the real engine ----------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.engine
def test_ray_vllm_engine_generates_deterministically_aborts_and_leaves_no_process():
    import ray

    from cascadia.model_store import ensure_smollm2
    from cascadia.vllm_adapter import EngineSettings
    from router.engines.vllm_ray import start_vllm_engine

    settings = EngineSettings(model=str(ensure_smollm2()), max_model_len=2048, kv_cache_gib=1.0)

    async def go():
        eng = await start_vllm_engine("smollm2", settings, num_cpus=1, cpu_core=os.cpu_count() - 1)
        assert isinstance(eng, Engine) and await eng.health()
        prompt = await eng.chat_prompt([{"role": "user", "content": "Name three colours."}])
        n_prompt = await eng.count_tokens(prompt)
        # the router renders and counts with its own copy of the tokenizer: same as the engine's
        assert eng.local_tokenizer.available
        chats = [[{"role": "user", "content": "Name three colours."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcode ✓ 東京?"}],
                 [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "And now?\n\n  spaces  "}]]
        for messages in chats:
            local = await eng.chat_prompt(messages)
            assert local == await eng.actor.chat_prompt.remote(messages)
            assert await eng.count_tokens(local) == await eng.actor.count_tokens.remote(local)
        for text in ("plain text", "<|im_start|>user\nx<|im_end|>", ""):
            assert await eng.count_tokens(text) == await eng.actor.count_tokens.remote(text)
        texts, lps = [], []
        for k in range(2):
            chunks = [c async for c in eng.generate(GenerateRequest(f"det{k}", prompt, max_tokens=16,
                                                                    temperature=0.0))]
            texts.append("".join(c.text for c in chunks))
            lps.append([lp for c in chunks for lp in c.logprobs])
            assert chunks[-1].finished and chunks[0].prompt_tokens == n_prompt
            assert len(lps[-1]) == sum(len(c.token_ids) for c in chunks)
        gen = eng.generate(GenerateRequest("cut", prompt, max_tokens=500, temperature=0.0, ignore_eos=True))
        got = 0
        async with contextlib.aclosing(gen):
            async for c in gen:
                got += len(c.token_ids)
                if got >= 2:
                    break
        # the actor records the abort when its cancelled generator unwinds: poll, bounded
        deadline = time.monotonic() + 15
        stats = await eng.stats()
        while (stats["requests_aborted"] < 1 or stats["running"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            stats = await eng.stats()
        return eng.info, texts, lps, stats, got

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        info, texts, lps, stats, got = asyncio.run(go())
    finally:
        ray.shutdown()
    assert texts[0].strip() and texts[0] == texts[1]
    assert lps[0] == pytest.approx(lps[1], abs=1e-4) and all(lp <= 0 for lp in lps[0])
    assert stats["requests_aborted"] == 1 and stats["running"] == 0 and stats["tokens_out"] < 2 * 16 + 100
    pids = [info["pid"], *info["child_pids"]]  # the actor and vLLM's engine core process
    assert len(pids) >= 2
    deadline = time.monotonic() + 20
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, pids)), f"engine processes still running: {[p for p in pids if _alive(p)]}"
    print(f"engine ready {info['engine_ready_s']:.1f} s, with warm-up {info['startup_s']:.1f} s")
