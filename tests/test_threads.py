"""Which threads see a block's adapters: a thread started inside ``lf.applied`` (Hugging Face's streaming
recipe, a pool made inside the block) gets them; a thread started before the block gets the plain model,
even while the block runs; ``block.bind(fn)`` hands them to a pool made earlier; a thread that outlives
its block raises instead of silently computing the base model."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers as tf
from helpers import moved
from models import tiny, tokens

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|down_proj)$"
GEN = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


class WordTokenizer:
    """Just enough of a tokenizer for transformers' TextIteratorStreamer: token i decodes to "t<i> "."""

    def decode(self, ids, **kwargs):
        return "".join(f"t{int(i)} " for i in ids)


def words(ids) -> list[str]:
    return [f"t{int(i)}" for i in ids]


@pytest.fixture(scope="module")
def setup():
    model = tiny("llama")
    params = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS), seed=1, scale=0.3)
    prompt = tokens(1, 5, seed=3)
    with lf.applied(model, params):
        adapted = model.generate(prompt, **GEN)
    base = model.generate(prompt, **GEN)
    assert not torch.equal(adapted, base)  # the adapter changes the tokens, so the tests below can tell
    return model, params, prompt, adapted, base


def test_streaming_recipe_in_a_thread_started_inside_the_block(setup):
    model, params, prompt, adapted, _ = setup
    streamer = tf.TextIteratorStreamer(WordTokenizer(), skip_prompt=True)
    with lf.applied(model, params):
        thread = threading.Thread(target=model.generate, kwargs=dict(inputs=prompt, streamer=streamer, **GEN))
        thread.start()
        text = "".join(streamer)  # the chat front-end's loop: pieces arrive as they are generated
        thread.join()
    assert text.split() == words(adapted[0, prompt.shape[1] :])


def test_a_pool_made_inside_the_block_gets_its_adapters(setup):
    model, params, _, _, _ = setup
    xs = [tokens(2, 5, seed=s) for s in range(4)]
    expected = [lf.call(model, params, x).logits for x in xs]
    with lf.applied(model, params), ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(lambda x: model(x).logits, xs))
        own = model(xs[0]).logits  # the block's own thread runs a forward meanwhile
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(own, expected[0])


def test_a_thread_started_before_the_block_gets_the_plain_model_while_the_block_runs(setup):
    model, params, _, _, _ = setup
    x = tokens(2, 5, seed=9)
    plain, adapted = model(x).logits, lf.call(model, params, x).logits
    go, done, seen = threading.Event(), threading.Event(), []

    def worker():
        go.wait()
        for _ in range(3):
            seen.append(model(x).logits)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with lf.applied(model, params):
        go.set()  # the worker runs while this block is open on the main thread
        inside = [model(x).logits for _ in range(3)]
        assert done.wait(60)
    thread.join()
    assert all(torch.equal(s, plain) for s in seen)
    assert all(torch.equal(i, adapted) for i in inside)


def test_bind_hands_a_block_to_a_pool_made_earlier(setup):
    model, params, _, _, _ = setup
    x = tokens(2, 5, seed=10)
    plain, adapted = model(x).logits, lf.call(model, params, x).logits
    forward = lambda: model(x).logits
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: None).result()  # its worker thread exists before the block
        with lf.applied(model, params) as block:
            assert torch.equal(pool.submit(forward).result(), plain)  # not started inside: the plain model
            bound = block.bind(forward)
            assert torch.equal(pool.submit(bound).result(), adapted)
        with pytest.raises(RuntimeError, match=r"has ended; a forward here would silently be the base model"):
            pool.submit(bound).result()  # the block is over: an error, not the base model
    with pytest.raises(TypeError, match=r"fn must be callable"), lf.applied(model, params) as block:
        block.bind(42)


def test_a_thread_that_outlives_its_block_raises(setup):
    model, params, prompt, _, _ = setup
    release, errors = threading.Event(), []

    def late():
        release.wait()
        try:
            model.generate(prompt, **GEN)
        except RuntimeError as e:
            errors.append(str(e))

    with lf.applied(model, params):
        thread = threading.Thread(target=late, name="late-worker")
        thread.start()
    release.set()  # it generates only after the block has ended
    thread.join()
    assert len(errors) == 1
    assert "late-worker" in errors[0] and "was started inside lf.applied" in errors[0]
    assert "Keep the block open until the thread is done" in errors[0]


def test_threads_inside_lf_call_and_nested_blocks_inherit_the_whole_stack(setup):
    model, params, _, _, _ = setup
    steer = lf.init(0, model, lf.AntiPaSTOConfig(r=4, block_size=2), targets=r"o_proj$")
    steer = lf.with_alpha(moved(steer, seed=2), 1.0)
    x = tokens(2, 5, seed=11)
    expected = lf.call(model, {**params, **steer}, x).logits
    out = []
    with lf.applied(model, params), lf.applied(model, steer):
        thread = threading.Thread(target=lambda: out.append(model(x).logits))
        thread.start()
        thread.join()
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert torch._C._len_torch_function_stack() == 0


def test_lf_call_needs_one_route_index_per_example(setup):
    model, params, _, _, _ = setup
    stacked = lf.stack([params, moved(params, seed=5)])
    for batch, route in [(2, [0]), (4, [0, 1]), (2, [0, 1, 1])]:
        with pytest.raises(ValueError, match=rf"route has {len(route)} entries but the batch \(args\[0\]\) has {batch} examples"):
            lf.call(model, stacked, tokens(batch, 5), route=torch.tensor(route))
    with pytest.raises(ValueError, match=r"the batch \(input_ids\) has 2 examples"):
        lf.call(model, stacked, input_ids=tokens(2, 5), route=torch.tensor([1]))
    x = tokens(2, 5)
    routed = lf.call(model, stacked, x, route=torch.tensor([1, 0])).logits
    torch.testing.assert_close(routed[0], lf.call(model, lf.unstack(stacked)[1], x[:1]).logits[0], rtol=0, atol=1e-5)


def test_a_compiled_call_before_any_eager_one_in_a_fresh_process(tmp_path):
    """torch.compile traces lf.call without ever taking the thread-start lock (which dynamo cannot trace)."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, lite_fn as lf\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "params = lf.init(0, model, lf.LoRAConfig(r=2), targets=r'^0$')\n"
        "f = torch.compile(lambda p, x: lf.call(model, p, x), fullgraph=True, backend='aot_eager')\n"
        "x = torch.randn(3, 8)\n"
        "assert torch.allclose(f(params, x), lf.call(model, params, x), atol=1e-6)\n"
    )
    # dynamo's trace (fullgraph) is what this checks; aot_eager skips inductor's C++ build, which intermittently
    # failed to link here when other processes were compiling at the same time
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
