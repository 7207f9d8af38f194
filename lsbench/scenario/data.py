"""Summarization examples and prompts.

Hub datasets (cnn_dailymail, xsum) go through `datasets`; the two embedded corpora (lee-news,
wiki-lead) ship with gensim's test data, so a benchmark can run with no hub at all; `jsonl:PATH`
takes the user's own articles. Every source yields `Example`s in a fixed order, and a seeded
selection picks the same ones on every call.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import importlib.util
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from xml.etree import ElementTree

from lsbench.errors import LsbenchError, one_line

DATASETS: tuple[str, ...] = ("cnn_dailymail", "xsum", "lee-news", "wiki-lead")
JSONL_PREFIX = "jsonl:"
INSTRUCTION = "Summarize the following article."
PLAIN_TEMPLATE = "Article: {article}\nSummary:"  # the LayerSkip benchmark's prompt
# How a prompt is written (`--prompt-format`): "" picks chat where the tokenizer has a chat
# template, else article-summary.
PROMPT_FORMATS = ("chat", "article-summary", "plain")
SHOT_SEED = 0  # n-shot examples: the same ones whatever the evaluated selection's seed

_LEE_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# The gensim test-data file each embedded corpus reads.
GENSIM_FILES = {"lee-news": _LEE_FILE, "wiki-lead": _WIKI_FILE}
# A folder holding those files, read instead of an installed gensim's test data (the offline
# GPU bundle carries the two files, not the 27 MB gensim wheel).
GENSIM_DATA_ENV = "LSBENCH_GENSIM_DATA"
_WIKI_MIN_LEAD_WORDS = 20
_WIKI_MIN_BODY_WORDS = 100
# Generic `datasets` builders for local copies of the hub datasets, by file extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # one of DATASETS or "jsonl:PATH"
    split: str = "test"  # hub datasets only
    revision: str | None = None  # hub datasets only
    limit: int = 8  # number of examples selected
    seed: int = 0  # selects the same examples every time
    data_files: str | None = None  # local file/dir replacing the hub for cnn_dailymail/xsum


@dataclass(frozen=True)
class Example:
    example_id: str  # stable id within the dataset
    article: str
    reference: str | None  # reference summary, None when the dataset has none


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    format: str  # one of PROMPT_FORMATS
    truncated: bool  # article was cut to the token budget


@dataclass(frozen=True)
class _HubSource:
    path: str
    config: str | None
    article: str
    reference: str
    parquet_config: str  # its folder on the Parquet conversion branch


_HUB = {
    "cnn_dailymail": _HubSource("abisee/cnn_dailymail", "3.0.0", "article", "highlights",
                                "3.0.0"),
    "xsum": _HubSource("EdinburghNLP/xsum", None, "document", "summary", "default"),
}
# The hub's Parquet conversion of every dataset repository: one folder per config holding
# <split>/0000.parquet..., readable by datasets releases that refuse loading scripts.
PARQUET_REVISION = "refs/convert/parquet"


def check_dataset(name: str) -> None:
    """Refuse an unknown name, a missing jsonl file or a missing gensim; loads nothing."""
    if name.startswith(JSONL_PREFIX):
        path = name[len(JSONL_PREFIX):]
        if not path:
            raise LsbenchError("dataset 'jsonl:' needs a path, e.g. jsonl:articles.jsonl")
        if not Path(path).is_file():
            raise LsbenchError(f"dataset file not found: {path}")
        return
    if name not in DATASETS:
        valid = ", ".join([*DATASETS, "jsonl:PATH"])
        raise LsbenchError(f"unknown dataset {name!r}; choose one of: {valid}")
    if (name in GENSIM_FILES and not os.environ.get(GENSIM_DATA_ENV)
            and importlib.util.find_spec("gensim") is None):
        raise LsbenchError(f"dataset {name!r} needs gensim: pip install gensim")


def _selection(n: int, limit: int, seed: int) -> list[int]:
    """The first `limit` indices of a seeded permutation of range(n), in that order: a larger
    limit extends a smaller one, so runs with different limits share their first examples."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:limit]


def load_examples(spec: DatasetSpec) -> tuple[list[Example], str]:
    """Selected examples and a fingerprint (16 hex chars of sha256 over the spec and the
    selected examples' ids and text). Local paths are left out of the fingerprint so that a
    local copy and the hub agree when their text does."""
    check_dataset(spec.name)
    if spec.limit < 1:
        raise LsbenchError(f"dataset limit must be at least 1, got {spec.limit}")
    if spec.data_files is not None and spec.name not in _HUB:
        raise LsbenchError(f"data_files only applies to {' and '.join(_HUB)}, not {spec.name!r}")
    if spec.name in _HUB:
        examples = _load_hub(spec, _HUB[spec.name])
    else:
        if spec.name == "lee-news":
            corpus = _lee_news()
        elif spec.name == "wiki-lead":
            corpus = _wiki_lead()
        else:
            corpus = _jsonl(spec.name[len(JSONL_PREFIX):])
        examples = [corpus[i] for i in _selection(len(corpus), spec.limit, spec.seed)]
    return examples, _fingerprint(spec, examples)


def _fingerprint(spec: DatasetSpec, examples: list[Example]) -> str:
    source = {"name": "jsonl" if spec.name.startswith(JSONL_PREFIX) else spec.name,
              "limit": spec.limit, "seed": spec.seed}
    if spec.name in _HUB:
        source.update(split=spec.split, revision=spec.revision)
    payload = {"spec": source,
               "examples": [[e.example_id, e.article, e.reference] for e in examples]}
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- hub datasets (or local copies with the same columns) ---------------------------------


def _local_files(spec: DatasetSpec, source: _HubSource) -> tuple[str, list[str]]:
    """(builder, files) for `data_files`: one file as given, or a directory's files for the
    split (names starting with it, as in the hub repos: test-00000-of-00001.parquet)."""
    root = Path(spec.data_files or "")
    if root.is_file():
        files = [root]
    elif root.is_dir():
        if source.config and (root / source.config).is_dir():
            root = root / source.config  # a clone of the hub repo holds one folder per config
        files = sorted(p for p in root.rglob(f"{spec.split}*") if p.suffix in _BUILDERS)
        if not files:
            exts = "/".join(_BUILDERS)
            raise LsbenchError(f"no {spec.split!r} files ({exts}) under {root}")
    else:
        raise LsbenchError(f"data_files not found: {root}")
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if len(builders) != 1 or None in builders:
        raise LsbenchError(f"data_files must be all one of {', '.join(_BUILDERS)}: {root}")
    return builders.pop(), [str(p) for p in files]


def _is_script_refusal(exc: Exception) -> bool:
    """datasets' refusal of a repository that holds a loading script (>= 4.0: scripts are
    no longer supported; older releases: trust_remote_code is needed to run it)."""
    text = str(exc)
    return "scripts are no longer supported" in text or "trust_remote_code" in text


def _load_from_hub(datasets, spec: DatasetSpec, source: _HubSource):
    """The split from the hub; from its Parquet conversion branch when the repository holds
    only a loading script that this datasets release refuses (and no revision was asked)."""
    try:
        return datasets.load_dataset(source.path, source.config, split=spec.split,
                                     revision=spec.revision)
    except Exception as exc:
        if spec.revision is not None or not _is_script_refusal(exc):
            raise
    return datasets.load_dataset(source.path, data_dir=source.parquet_config,
                                 split=spec.split, revision=PARQUET_REVISION)


def _load_hub(spec: DatasetSpec, source: _HubSource) -> list[Example]:
    import datasets  # heavy import, only paid by the hub datasets

    try:
        if spec.data_files is not None:
            where = f"data_files {spec.data_files}"
            builder, files = _local_files(spec, source)
            ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            where = f"the hub ({source.path})"
            ds = _load_from_hub(datasets, spec, source)
    except LsbenchError:
        raise
    except Exception as exc:  # hub, network and parse errors all mean "cannot load"
        raise LsbenchError(f"cannot load dataset {spec.name!r} from {where}: "
                           f"{one_line(exc)}") from exc
    missing = [c for c in (source.article, source.reference) if c not in ds.column_names]
    if missing:
        raise LsbenchError(f"dataset {spec.name!r} from {where} lacks column(s) "
                           f"{', '.join(missing)}; has {', '.join(ds.column_names)}")
    indices = _selection(len(ds), spec.limit, spec.seed)
    rows = ds.select(indices)  # select first: materializing a whole split is slow
    has_id = "id" in ds.column_names
    return [Example(example_id=str(row["id"]) if has_id else str(index),
                    article=str(row[source.article]),
                    reference=None if row[source.reference] is None
                    else str(row[source.reference]))
            for index, row in zip(indices, rows, strict=True)]


# --- embedded corpora from gensim's test data ----------------------------------------------


def gensim_file(name: str, filename: str) -> Path:
    """Path of a file in gensim's test data (what gensim.test.utils.datapath returns), found
    without importing gensim: that import alone takes about a second. $LSBENCH_GENSIM_DATA,
    when set, is the folder to read instead."""
    override = os.environ.get(GENSIM_DATA_ENV)
    if override:
        path = Path(override) / filename
        if not path.is_file():
            raise LsbenchError(f"dataset {name!r}: {GENSIM_DATA_ENV}={override} lacks {filename}")
        return path
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LsbenchError(f"dataset {name!r} needs gensim: pip install gensim")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / filename
    if not path.is_file():
        raise LsbenchError(f"dataset {name!r}: gensim's test data lacks {filename}")
    return path


@functools.lru_cache(maxsize=1)
def _lee_news() -> tuple[Example, ...]:
    lines = gensim_file("lee-news", _LEE_FILE).read_text(encoding="utf-8").splitlines()
    # ids are line numbers, which stay stable as long as gensim ships the same file
    return tuple(Example(example_id=str(i), article=line.strip(), reference=None)
                 for i, line in enumerate(lines) if line.strip())


def _wiki_pages(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """(title, namespace, page id, wikitext) of each page of a MediaWiki XML dump."""
    with bz2.open(path) as f:
        title = ns = page_id = None
        text = ""
        for _, elem in ElementTree.iterparse(f, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "page":
                yield title or "", ns or "", page_id or "", text
                elem.clear()  # keeps memory flat while streaming
                title = ns = page_id = None
                text = ""
            elif tag == "title":
                title = elem.text
            elif tag == "ns":
                ns = elem.text
            elif tag == "id" and page_id is None:  # the page's id comes before revision ids
                page_id = elem.text
            elif tag == "text":
                text = elem.text or ""


_RE_HEADING = re.compile(r"^(=+)\s*([^=\n].*?)\s*\1\s*$", re.M)
# Appendix sections are citations and link lists, not prose.
_APPENDIX = {"see also", "references", "notes", "external links", "further reading",
             "bibliography", "sources", "citations", "footnotes", "notes and references"}
_RE_COMMENT = re.compile(r"<!--.*?-->", re.S)
_RE_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_RE_DROP_ELEMENT = re.compile(
    r"<(math|gallery|timeline|score|chem|syntaxhighlight|source|imagemap)\b[^>]*>.*?</\1>",
    re.S | re.I)
_RE_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
# Two inline templates whose text belongs to the sentence; all other templates are dropped.
_RE_LANG = re.compile(r"\{\{lang\|[^|{}]*\|([^|{}]*)(?:\|[^{}]*)?\}\}", re.I)
_RE_CONVERT = re.compile(r"\{\{convert\|([\d.,]+)\|([^|{}]+)(?:\|[^{}]*)?\}\}", re.I)
_RE_NESTING = re.compile(r"\{\{|\}\}|^[ \t]*\{\||^[ \t]*\|\}", re.M)  # templates, tables
_RE_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_RE_MEDIA_LINK = re.compile(r"^\s*(?:file|image|media|category):", re.I)
_RE_LANGUAGE_LINK = re.compile(r"^\s*[a-z]{2,3}(?:-[a-z]+)?:", re.I)
_RE_EXTERNAL_LINK = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
# The clean-up below runs on whole texts, so "space" means any whitespace but a newline.
_RE_EMPHASIS = re.compile(r"'{2,}")  # bold, italics; 4+ where a template between was removed
_RE_SPACES = re.compile(r"[^\S\n]+")
_RE_EMPTY_PARENS = re.compile(r"\( ?(?:[,;:] ?)*\)")
_RE_PARENS_LEADING_PUNCT = re.compile(r"\( ?(?:[,;:] ?)+")
_RE_PARENS_TRAILING_PUNCT = re.compile(r"(?: ?[,;:])+ ?\)")
_RE_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:)])")


def _strip_nested(text: str) -> str:
    """Drop templates {{...}} and tables {|...|}, which nest, with one depth-counting scan."""
    out, depth, last = [], 0, 0
    for m in _RE_NESTING.finditer(text):
        if m.group().lstrip().startswith("{"):
            if depth == 0:
                out.append(text[last:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                last = m.end()
    if depth == 0:
        out.append(text[last:])
    return "".join(out)


def _link_text(m: re.Match[str]) -> str:
    target, label = m.group(1), m.group(2)
    # images with their captions, categories, and unlabelled links to other languages
    if _RE_MEDIA_LINK.match(target) or (label is None and _RE_LANGUAGE_LINK.match(target)):
        return ""
    return target if label is None else label


def _wiki_to_text(raw: str) -> str:
    """Plain-text paragraphs of a piece of wikitext, one per line."""
    for pattern in (_RE_COMMENT, _RE_REF, _RE_DROP_ELEMENT):
        raw = pattern.sub("", raw)
    raw = _RE_CONVERT.sub(r"\1 \2", _RE_LANG.sub(r"\1", raw))
    raw = _strip_nested(raw)
    for _ in range(3):  # links nest only inside image captions: inner links first
        raw, changed = _RE_LINK.subn(_link_text, raw)
        if not changed:
            break
    raw = _RE_EXTERNAL_LINK.sub(r"\1", raw)
    text = _RE_EMPHASIS.sub("", _RE_TAG.sub("", raw))
    text = _RE_SPACES.sub(" ", html.unescape(text))
    # templates removed inside parentheses leave "(; , Akhilleus, )"
    text = _RE_EMPTY_PARENS.sub("", text)
    text = _RE_PARENS_LEADING_PUNCT.sub("(", text)
    text = _RE_PARENS_TRAILING_PUNCT.sub(")", text)
    text = _RE_SPACES.sub(" ", _RE_SPACE_BEFORE_PUNCT.sub(r"\1", text))
    paragraphs = []
    for line in text.split("\n"):
        line = line.strip()
        # headings, list items, table and formula leftovers are structure, not prose;
        # short lines are stray labels and table cells
        if (line and line[0] not in "*#:;|!{}[]=" and not _RE_HEADING.match(line)
                and line.count(" ") >= 4):
            paragraphs.append(line)
    return "\n".join(paragraphs)


def _lead_and_body(raw: str) -> tuple[str, str]:
    """Wikitext before the first heading, and from there up to the appendix sections."""
    headings = list(_RE_HEADING.finditer(raw))
    if not headings:
        return raw, ""
    body_end = next((h.start() for h in headings
                     if len(h.group(1)) == 2 and h.group(2).lower() in _APPENDIX), len(raw))
    return raw[:headings[0].start()], raw[headings[0].start():body_end]


@functools.lru_cache(maxsize=1)
def _wiki_lead() -> tuple[Example, ...]:
    examples = []
    for title, ns, page_id, raw in _wiki_pages(gensim_file("wiki-lead", _WIKI_FILE)):
        # articles only: no talk/user pages, redirects or disambiguation lists
        if (ns != "0" or raw[:50].lstrip().lower().startswith("#redirect")
                or title.endswith("(disambiguation)")):
            continue
        lead, body = (_wiki_to_text(part) for part in _lead_and_body(raw))
        if (len(lead.split()) >= _WIKI_MIN_LEAD_WORDS
                and len(body.split()) >= _WIKI_MIN_BODY_WORDS):
            examples.append(Example(example_id=page_id, article=body, reference=lead))
    return tuple(examples)


# --- the user's own articles ---------------------------------------------------------------


def _jsonl(path: str) -> tuple[Example, ...]:
    examples: list[Example] = []
    seen: set[str] = set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LsbenchError(f"cannot read {path}: {one_line(exc)}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LsbenchError(f"{where}: invalid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise LsbenchError(f"{where}: expected a JSON object")
        key = "article" if "article" in record else "prompt"  # article wins when both are set
        article, reference = record.get(key), record.get("reference")
        if not isinstance(article, str) or not article.strip():
            raise LsbenchError(f"{where}: needs a non-empty 'article' or 'prompt' string")
        if reference is not None and not isinstance(reference, str):
            raise LsbenchError(f"{where}: 'reference' must be a string")
        example_id = str(record["id"]) if record.get("id") is not None else str(len(examples))
        if example_id in seen:
            raise LsbenchError(f"{where}: duplicate id {example_id!r}")
        seen.add(example_id)
        examples.append(Example(example_id=example_id, article=article, reference=reference))
    if not examples:
        raise LsbenchError(f"{path}: no examples")
    return tuple(examples)


# --- prompts ---------------------------------------------------------------------------------


def check_prompt_format(fmt: str, n_shot: int = 0) -> None:
    """Refuse an unknown format, a negative shot count, or shots in the plain format."""
    if fmt and fmt not in PROMPT_FORMATS:
        raise LsbenchError(f"unknown prompt format {fmt!r}; choose {', '.join(PROMPT_FORMATS)}")
    if n_shot < 0:
        raise LsbenchError(f"n_shot must be >= 0, got {n_shot}")
    if n_shot and fmt == "plain":
        raise LsbenchError("n-shot examples need a format that marks where a summary goes: "
                           "chat or article-summary, not plain")


def load_shots(spec: DatasetSpec, n_shot: int, examples: Sequence[Example]
               ) -> list[tuple[Example, ...]]:
    """For each evaluated example, `n_shot` examples with their reference summaries, never the
    example itself. Hub datasets draw them from their train split; the embedded corpora and
    jsonl files have none and draw them from their other examples. The pool is ordered by a
    permutation seeded with SHOT_SEED and does not depend on the evaluated selection, so an
    example gets the same shots whatever --limit or --seed select."""
    if n_shot == 0:
        return [() for _ in examples]
    if spec.name in _HUB:
        if spec.data_files is not None and not Path(spec.data_files).is_dir():
            raise LsbenchError(f"cannot load the train split of {spec.name!r} for n-shot "
                               f"examples: data_files {spec.data_files} is one file, one "
                               "split; give the folder that holds the train files")
        train = replace(spec, split="train", limit=n_shot + 1, seed=SHOT_SEED)
        try:
            pool = _load_hub(train, _HUB[spec.name])
        except LsbenchError as exc:
            raise LsbenchError(f"n-shot examples come from the train split: {exc}") from None
    else:
        corpus = (_lee_news() if spec.name == "lee-news" else _wiki_lead()
                  if spec.name == "wiki-lead" else _jsonl(spec.name[len(JSONL_PREFIX):]))
        pool = [corpus[i] for i in _selection(len(corpus), len(corpus), SHOT_SEED)]
    pool = [e for e in pool if e.reference]
    shots = []
    for ex in examples:
        own = [e for e in pool if e.example_id != ex.example_id and e.article != ex.article]
        if len(own) < n_shot:
            raise LsbenchError(f"dataset {spec.name!r} has {len(own)} other example(s) with a "
                               f"reference summary, fewer than n_shot = {n_shot}")
        shots.append(tuple(own[:n_shot]))
    return shots


def _cut(tokenizer, article: str, max_input_tokens: int) -> tuple[str, bool]:
    ids = tokenizer.encode(article, add_special_tokens=False)
    if len(ids) <= max_input_tokens:
        return article, False
    return tokenizer.decode(ids[:max_input_tokens]), True


def build_prompt(tokenizer, article: str, max_input_tokens: int, *, fmt: str = "",
                 shots: Sequence[Example] = ()) -> Prompt:
    """Token ids of a summarization prompt for `article`, cut to `max_input_tokens` article
    tokens first (each shot's article too). Formats (PROMPT_FORMATS): `chat`, the tokenizer's
    chat template (instruct models answer badly without it; shots are earlier user/assistant
    turns); `article-summary`, the completion prompt "Article: ...\nSummary:" of the
    LayerSkip benchmark (shots are earlier article/summary pairs); `plain`, the article
    alone. "" picks chat where the tokenizer has a template, else article-summary."""
    if max_input_tokens < 1:
        raise LsbenchError(f"max_input_tokens must be at least 1, got {max_input_tokens}")
    check_prompt_format(fmt, len(shots))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    fmt = fmt or ("chat" if has_template else "article-summary")
    article, truncated = _cut(tokenizer, article, max_input_tokens)
    pairs = [(_cut(tokenizer, e.article, max_input_tokens)[0], e.reference or "")
             for e in shots]
    if fmt == "chat":
        if not has_template:
            raise LsbenchError("prompt format 'chat' needs a tokenizer with a chat template; "
                               "this one has none: use article-summary or plain")
        messages = []
        for shot, summary in pairs:
            messages += [{"role": "user", "content": f"{INSTRUCTION}\n\n{shot}"},
                         {"role": "assistant", "content": summary}]
        messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{article}"})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        # the template writes its own BOS/special tokens; adding them again would double them
        ids = tokenizer.encode(text, add_special_tokens=False)
        return Prompt(ids=list(ids), format=fmt, truncated=truncated)
    if fmt == "plain":
        text = article
    else:
        text = "".join(PLAIN_TEMPLATE.format(article=shot) + f" {summary}\n\n"
                       for shot, summary in pairs) + PLAIN_TEMPLATE.format(article=article)
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    # keep the BOS a base model expects, but a prompt must not end in EOS
    eos = getattr(tokenizer, "eos_token_id", None)
    if len(ids) > 1 and eos is not None and ids[-1] == eos:
        ids.pop()
    return Prompt(ids=ids, format=fmt, truncated=truncated)


def build_prompts(tokenizer, spec: DatasetSpec, examples: Sequence[Example],
                  max_input_tokens: int, fmt: str = "", n_shot: int = 0) -> list[Prompt]:
    """build_prompt for every example, with its `load_shots` shots."""
    check_prompt_format(fmt, n_shot)
    return [build_prompt(tokenizer, ex.article, max_input_tokens, fmt=fmt, shots=shots)
            for ex, shots in zip(examples, load_shots(spec, n_shot, examples), strict=True)]


def stop_string_ids(tokenizer, stops: Sequence[str]) -> tuple[int, ...]:
    """Token ids of the stop strings that are one token: the engine stops on them."""
    ids = [tokenizer.encode(s, add_special_tokens=False) for s in stops]
    return tuple(dict.fromkeys(i[0] for i in ids if len(i) == 1))


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (the stop string left out)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]
