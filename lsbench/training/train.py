"""`lsbench train`: make early-exit-capable models (the LayerSkip recipe) or their baseline
twins, from scratch or from a pretrained model, on the text of the datasets lsbench knows.

The loop is deliberately small (AdamW, warm-up + cosine, gradient clipping): the recipe needs
a custom forward, a step-indexed curriculum and a wall-clock budget, which in transformers'
Trainer would be a subclass plus two callbacks for the same ~40 lines. The output is a plain
transformers checkpoint (weights, config, fast tokenizer) plus `training_log.json`; nothing of
the recipe survives into the weights' format, so `lsbench sweep --model DIR` loads it as is.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lsbench.backend.early_exit import check_architecture
from lsbench.backend.loading import cache_dir, load_model, resolve_device
from lsbench.errors import LsbenchError
from lsbench.scenario.data import DatasetSpec, Example, load_examples
from lsbench.training.recipe import Recipe, exit_forward, training_forward

# Named from-scratch sizes (Llama layout). "tiny" is the A/B twins' size; "micro" is for tests.
SIZES: dict[str, dict[str, int]] = {
    "micro": dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(num_hidden_layers=8, hidden_size=128, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(num_hidden_layers=12, hidden_size=256, intermediate_size=1024,
                  num_attention_heads=8, num_key_value_heads=4),
}
SCHEDULES = ("cosine", "linear", "constant")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of a trained BPE tokenizer
LOG_FILE = "training_log.json"
HELDOUT_FILE = "heldout.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    out: str  # a bare name (saved under <cache>/trained/NAME) or a directory path
    recipe: Recipe = field(default_factory=Recipe)
    size: str = "tiny"  # a named size (SIZES) or a config .json file; ignored with init
    init: str | None = None  # continue from a pretrained model (hub id, directory, .gguf)
    data: tuple[str, ...] = ("wiki-lead", "lee-news")
    split: str = "train"  # hub datasets only
    data_limit: int = 100_000  # articles per dataset at most
    holdout: int = 0  # articles of `holdout_from` kept out of training (held-out eval/prompts)
    holdout_from: str = ""  # default: the last dataset in `data`
    tokenizer: str = "bpe"  # "bpe": train one on the training text; "model": the init's
    vocab_size: int = 4096
    tokens: int = 850_000  # training token budget (0: none, then time_budget_s must be set)
    time_budget_s: float = 0.0  # wall-clock budget (0: none)
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of the budget
    schedule: str = "cosine"
    weight_decay: float = 0.1
    batch_size: int = 8
    seq_len: int = 256
    log_every: int = 10
    threads: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.time_budget_s < 0 or (not self.tokens
                                                          and not self.time_budget_s):
            raise LsbenchError("give a token budget (--tokens) and/or a wall-clock budget "
                               "(--time-budget)")
        if self.schedule not in SCHEDULES:
            raise LsbenchError(f"unknown schedule {self.schedule!r}; choose "
                               f"{', '.join(SCHEDULES)}")
        if self.tokenizer not in ("bpe", "model"):
            raise LsbenchError(f"unknown tokenizer {self.tokenizer!r}; choose bpe or model")
        if self.tokenizer == "model" and not self.init:
            raise LsbenchError("--tokenizer model needs --init (a model to take it from)")
        if self.init and self.tokenizer == "bpe":
            raise LsbenchError("a pretrained model keeps its own tokenizer: use --tokenizer "
                               "model with --init")
        if self.batch_size < 1 or self.seq_len < 8 or self.vocab_size < 300:
            raise LsbenchError("batch size must be >= 1, seq_len >= 8 and vocab size >= 300")
        if not self.data:
            raise LsbenchError("no training data: give at least one --data")


def output_dir(out: str) -> Path:
    """A bare name (no path separator) lives in the trained-model cache, where `locate_model`
    finds it by name; anything else is a directory path."""
    if os.sep in out or "/" in out or out.startswith((".", "~")):
        return Path(out).expanduser()
    return cache_dir() / "trained" / out


# --- data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[Example]


def load_corpus(cfg: TrainConfig) -> Corpus:
    """Training texts of every dataset, minus the held-out articles (a seeded selection of
    `holdout_from`; no held-out text appears in training)."""
    source = cfg.holdout_from or cfg.data[-1]
    if cfg.holdout and source not in cfg.data:
        raise LsbenchError(f"holdout dataset {source!r} is not among the training data")
    heldout: list[Example] = []
    if cfg.holdout:
        # A seed of its own: the held-out set must not move when the training seed does.
        heldout, _ = load_examples(DatasetSpec(source, split=cfg.split, limit=cfg.holdout,
                                               seed=1234))
    # By text, not only by id: lee-news repeats 7 of its articles under two line numbers.
    held_text = {e.article for e in heldout}
    texts: list[str] = []
    for name in cfg.data:
        examples, _ = load_examples(DatasetSpec(name, split=cfg.split, limit=cfg.data_limit,
                                                seed=0))
        # Keep corpus order (ids) rather than the seeded selection's, and drop held-out ones.
        keep = [e for e in examples if e.article not in held_text]
        keep.sort(key=lambda e: (len(e.example_id), e.example_id))
        texts += [e.article for e in keep]
    if not texts:
        raise LsbenchError("no training text left after holding out")
    return Corpus(texts, heldout)


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as PreTrainedTokenizerFast with
    <s> prepended (base models expect BOS) and no chat template (lsbench then uses the plain
    "Article: ...\\nSummary:" prompt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents as BOS + tokens + EOS, concatenated and cut into [N, seq_len] rows."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        stream += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    n = len(stream) // seq_len
    if n == 0:
        raise LsbenchError(f"not enough text for one sequence of {seq_len} tokens")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def heldout_rows(tokenizer, heldout: list[Example], seq_len: int) -> torch.Tensor | None:
    """The held-out articles packed for `evaluate`; None without any."""
    if not heldout:
        return None
    held_text = [e.article for e in heldout]
    held_tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 2 for t in held_text)
    # A few short held-out articles may not fill one training-length row.
    return pack(tokenizer, held_text, min(seq_len, held_tokens))


class Batches:
    """Seeded epochs over the packed rows: the same seed gives both twins the same data order."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int):
        self.rows, self.batch_size = rows, batch_size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self) -> torch.Tensor:
        while len(self.order) < self.batch_size:
            epoch = list(range(len(self.rows)))
            self.rng.shuffle(epoch)
            self.order += epoch
        take, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return self.rows[take]


# --- model ---------------------------------------------------------------------------------

def build_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    from transformers import AutoConfig, LlamaForCausalLM

    if cfg.size in SIZES:
        shape = dict(SIZES[cfg.size])
        model_type = "llama"
    else:
        path = Path(cfg.size)
        if not path.is_file():
            raise LsbenchError(f"unknown size {cfg.size!r}: choose {', '.join(SIZES)} or give "
                               "a config .json file")
        shape = json.loads(path.read_text())
        model_type = shape.pop("model_type", "llama")
    shape.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    shape.setdefault("max_position_embeddings", max(2048, cfg.seq_len))
    shape.setdefault("tie_word_embeddings", False)
    config = AutoConfig.for_model(model_type, **shape)
    check_architecture(config)
    torch.manual_seed(cfg.seed)  # the same seed gives both twins the same initial weights
    if model_type == "llama":
        return LlamaForCausalLM(config)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


# --- schedule and loop ---------------------------------------------------------------------

def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """Linear warm-up over the first `warmup` of the budget, then cosine/linear decay to
    min_lr_ratio * lr (or constant)."""
    if cfg.warmup > 0 and progress < cfg.warmup:
        return cfg.lr * progress / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    rest = min(1.0, (progress - cfg.warmup) / max(1e-9, 1 - cfg.warmup))
    decay = 0.5 * (1 + math.cos(math.pi * rest)) if cfg.schedule == "cosine" else 1 - rest
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 8) -> dict:
    """Held-out next-token loss at every exit depth, and how often each exit's argmax agrees
    with the last layer's (a teacher-forced proxy for greedy draft acceptance)."""
    was_training = model.training
    model.eval()
    num_layers = len(model.model.layers)
    exits = list(range(1, num_layers + 1))
    sums = {e: 0.0 for e in exits}
    agree = {e: 0 for e in exits}
    count = 0
    for start in range(0, len(rows), batch_size):
        ids = rows[start: start + batch_size]
        out = exit_forward(model, ids, exits=exits, keep_argmax=True)
        n = ids.shape[0] * (ids.shape[1] - 1)
        for e in exits:
            sums[e] += float(out.exit_losses[e]) * n
        count += n
        assert out.argmax is not None
        for e in exits:
            agree[e] += int((out.argmax[e] == out.argmax[num_layers]).sum())
    model.train(was_training)
    return {"loss": {e: sums[e] / count for e in exits},
            "agreement": {e: agree[e] / count for e in exits}, "tokens": count}


@dataclass
class TrainResult:
    path: Path
    log: dict


def train(cfg: TrainConfig, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Train under `cfg` and save checkpoint + log to output_dir(cfg.out)."""
    emit = on_log or (lambda _record: None)
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    corpus = load_corpus(cfg)
    if cfg.init:
        loaded = load_model(cfg.init, dtype="float32", device=device)
        model, tokenizer = loaded.model, loaded.tokenizer
        torch.manual_seed(cfg.seed)
    else:
        tokenizer = train_bpe(corpus.train, cfg.vocab_size)
        model = build_model(cfg, tokenizer)
    model.to(device).train()
    rows = pack(tokenizer, corpus.train, cfg.seq_len)
    held_rows = heldout_rows(tokenizer, corpus.heldout, cfg.seq_len)
    batches = Batches(rows, cfg.batch_size, cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = cfg.tokens // tokens_per_step if cfg.tokens else 0
    if cfg.tokens and total_steps < 1:
        raise LsbenchError(f"token budget {cfg.tokens} is less than one batch "
                           f"({tokens_per_step} tokens)")
    # Norms and embeddings are not decayed (the usual GPT/Llama practice).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": other, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    # Layer dropout draws from its own generator: the twins' data order and init match even
    # though only one of them draws dropout masks.
    dropout_rng = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict] = []
    loop_start = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - loop_start
        progress = max(step / total_steps if total_steps else 0.0,
                       elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0)
        if progress >= 1.0:
            break
        lr = learning_rate(cfg, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = batches.next().to(device)
        out = training_forward(model, ids, cfg.recipe, step, progress, dropout_rng)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            exit_loss = {e: float(v.detach()) for e, v in sorted(out.exit_losses.items())}
            record = {"step": step, "tokens": step * tokens_per_step,
                      "time_s": round(time.perf_counter() - loop_start, 3), "lr": lr,
                      "loss": float(out.loss.detach()), "exit_loss": exit_loss}
            history.append(record)
            emit(record)
    train_s = time.perf_counter() - loop_start
    model.eval()
    heldout = evaluate(model, held_rows.to(device)) if held_rows is not None else None
    log = {"config": {**asdict(cfg), "recipe": asdict(cfg.recipe)},
           "recipe_name": "baseline" if cfg.recipe.is_baseline else "layerskip",
           "steps": step, "tokens_seen": step * tokens_per_step, "train_s": train_s,
           "step_s": train_s / max(step, 1), "train_rows": len(rows),
           "train_tokens_available": rows.numel(),
           "num_parameters": sum(p.numel() for p in model.parameters()),
           "heldout": heldout, "history": history,
           "total_s": time.perf_counter() - started}
    path = save(model, tokenizer, cfg, log, corpus.heldout)
    return TrainResult(path, log)


def save(model: torch.nn.Module, tokenizer, cfg: TrainConfig, log: dict,
         heldout: list[Example]) -> Path:
    """Write the checkpoint next to its final place, then swap it in (no half-written model
    under a name that resolves)."""
    target = output_dir(cfg.out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1))
        if heldout:
            (tmp / HELDOUT_FILE).write_text("".join(
                json.dumps({"id": e.example_id, "article": e.article,
                            "reference": e.reference}) + "\n" for e in heldout))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

