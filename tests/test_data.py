"""Datasets, selection, fingerprints and prompts, all from local files: no hub is reached.

Hub datasets are exercised through `data_files` copies with their real column names; the text
in every file written here is synthetic.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lsbench.errors import LsbenchError
from lsbench.scenario import data
from lsbench.scenario.data import (
    DATASETS,
    INSTRUCTION,
    DatasetSpec,
    Example,
    build_prompt,
    check_dataset,
    load_examples,
)

WORDS = [f"w{i}" for i in range(50)]
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "Article:", "Summary:", "user:", "assistant:",
         *INSTRUCTION.split(), *WORDS]


def word_tokenizer(chat_template: str | None = None, bos_eos: bool = False):
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_eos:  # like tokenizers that wrap every text in BOS ... EOS
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>")
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


CHAT_TEMPLATE = ("<s> {% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def ids_of(examples: list[Example]) -> list[str]:
    return [e.example_id for e in examples]


# --- hub datasets through local copies -------------------------------------------------


def cnn_rows(n: int, prefix: str = "cnn") -> list[dict]:
    return [{"article": f"{prefix} article {i}: {words(30, i)}",
             "highlights": f"{prefix} highlight {i}", "id": f"{prefix}-{i:03d}"}
            for i in range(n)]


def xsum_rows(n: int) -> list[dict]:
    return [{"document": f"xsum document {i}: {words(40, i)}", "summary": f"xsum summary {i}",
             "id": str(1000 + i)} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_cnn_dailymail_from_local_json_maps_columns(tmp_path):
    rows = cnn_rows(20)
    path = write_jsonl(tmp_path / "cnn.json", rows)
    examples, fingerprint = load_examples(DatasetSpec("cnn_dailymail", limit=5,
                                                      data_files=str(path)))
    assert len(examples) == 5
    assert len(set(ids_of(examples))) == 5
    by_id = {r["id"]: r for r in rows}
    for e in examples:
        assert e.article == by_id[e.example_id]["article"]
        assert e.reference == by_id[e.example_id]["highlights"]
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)


def test_xsum_from_local_parquet_maps_columns(tmp_path):
    rows = xsum_rows(12)
    path = write_parquet(tmp_path / "xsum.parquet", rows)
    examples, _ = load_examples(DatasetSpec("xsum", limit=100, data_files=str(path)))
    assert sorted(ids_of(examples)) == sorted(r["id"] for r in rows)  # limit > size: all rows
    by_id = {r["id"]: r for r in rows}
    for e in examples:
        assert (e.article, e.reference) == (by_id[e.example_id]["document"],
                                            by_id[e.example_id]["summary"])


def test_local_directory_uses_config_folder_and_split_files(tmp_path):
    # the layout of a clone of abisee/cnn_dailymail: one folder per config, files per split
    write_parquet(tmp_path / "1.0.0" / "test-00000-of-00001.parquet", cnn_rows(4, "old"))
    write_parquet(tmp_path / "3.0.0" / "test-00000-of-00001.parquet", cnn_rows(6, "test"))
    write_parquet(tmp_path / "3.0.0" / "train-00000-of-00001.parquet", cnn_rows(6, "train"))
    test, _ = load_examples(DatasetSpec("cnn_dailymail", limit=50, data_files=str(tmp_path)))
    assert sorted(ids_of(test)) == [f"test-{i:03d}" for i in range(6)]
    train, _ = load_examples(DatasetSpec("cnn_dailymail", split="train", limit=50,
                                         data_files=str(tmp_path)))
    assert sorted(ids_of(train)) == [f"train-{i:03d}" for i in range(6)]
    with pytest.raises(LsbenchError, match="no 'validation' files"):
        load_examples(DatasetSpec("cnn_dailymail", split="validation", data_files=str(tmp_path)))


def test_rows_without_id_column_use_row_index(tmp_path):
    path = tmp_path / "xsum.csv"
    path.write_text("document,summary\n" + "".join(f"doc {i} {words(5)},sum {i}\n"
                                                   for i in range(10)))
    examples, _ = load_examples(DatasetSpec("xsum", limit=4, data_files=str(path)))
    for e in examples:
        assert e.article.startswith(f"doc {e.example_id} ")
        assert e.reference == f"sum {e.example_id}"


def test_missing_column_is_a_user_error(tmp_path):
    rows = [{"article": "text", "summary": "wrong column", "id": "1"}]
    path = write_jsonl(tmp_path / "cnn.jsonl", rows)
    with pytest.raises(LsbenchError, match="lacks column\\(s\\) highlights") as err:
        load_examples(DatasetSpec("cnn_dailymail", data_files=str(path)))
    assert "\n" not in str(err.value)


def test_bad_data_files_are_user_errors(tmp_path):
    with pytest.raises(LsbenchError, match="data_files not found"):
        load_examples(DatasetSpec("xsum", data_files=str(tmp_path / "nope.parquet")))
    with pytest.raises(LsbenchError, match="only applies to"):
        load_examples(DatasetSpec("lee-news", data_files=str(tmp_path)))
    corrupt = tmp_path / "test.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(LsbenchError, match="cannot load dataset 'xsum' from data_files"):
        load_examples(DatasetSpec("xsum", data_files=str(corrupt)))


def test_hub_call_and_failure_are_wrapped(monkeypatch):
    import datasets

    calls = []

    def fake_hub(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(xsum_rows(3) if "xsum" in path else cnn_rows(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    examples, _ = load_examples(DatasetSpec("xsum", split="validation", revision="abc123"))
    assert calls == [("EdinburghNLP/xsum", None, "validation", "abc123")]
    assert len(examples) == 3
    load_examples(DatasetSpec("cnn_dailymail"))
    assert calls[-1] == ("abisee/cnn_dailymail", "3.0.0", "test", None)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\n(offline mode?)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(LsbenchError) as err:
        load_examples(DatasetSpec("cnn_dailymail"))
    message = str(err.value)
    assert message.startswith("cannot load dataset 'cnn_dailymail' from the hub")
    assert "Couldn't reach" in message and "\n" not in message


def hub_repos(monkeypatch, tmp_path, name: str, config: str, rows: list[dict]) -> list:
    """Route datasets.load_dataset for `name`'s hub id to local directories laid out like the
    repository (only a loading script, as EdinburghNLP/xsum holds) and like its Parquet
    conversion branch (<config>/<split>/0000.parquet); the real loader reads both."""
    import datasets

    hub_id = data._HUB[name].path
    script_repo = tmp_path / "main" / name  # datasets finds <dir>/<dir name>.py
    script_repo.mkdir(parents=True)
    (script_repo / f"{name}.py").write_text("import datasets  # a loading script\n")
    converted = tmp_path / "parquet"
    for split in ("test", "train"):
        write_parquet(converted / config / split / "0000.parquet",
                      [{**r, "id": f"{split}-{r['id']}"} for r in rows])
    real, calls = datasets.load_dataset, []

    def routed(path, *args, revision=None, **kwargs):
        calls.append((path, revision, kwargs.get("data_dir")))
        assert path == hub_id
        local = converted if revision == data.PARQUET_REVISION else script_repo
        return real(str(local), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", routed)
    return calls


@pytest.mark.parametrize("name, config, rows", [("xsum", "default", xsum_rows(7)),
                                                ("cnn_dailymail", "3.0.0", cnn_rows(7))])
def test_a_script_only_hub_repo_loads_from_its_parquet_conversion(monkeypatch, tmp_path,
                                                                  name, config, rows):
    calls = hub_repos(monkeypatch, tmp_path, name, config, rows)
    examples, _ = load_examples(DatasetSpec(name, limit=50))
    assert sorted(ids_of(examples)) == sorted(f"test-{r['id']}" for r in rows)
    source = data._HUB[name]
    by_id = {f"test-{r['id']}": r for r in rows}
    for e in examples:
        assert (e.article, e.reference) == (by_id[e.example_id][source.article],
                                            by_id[e.example_id][source.reference])
    assert calls == [(source.path, None, None), (source.path, data.PARQUET_REVISION, config)]
    train, _ = load_examples(DatasetSpec(name, split="train", limit=3))
    assert all(e.example_id.startswith("train-") for e in train)


def test_a_script_refusal_with_a_pinned_revision_or_no_conversion_is_one_error(monkeypatch,
                                                                              tmp_path):
    hub_repos(monkeypatch, tmp_path, "xsum", "default", xsum_rows(3))
    with pytest.raises(LsbenchError, match="scripts are no longer supported") as err:
        load_examples(DatasetSpec("xsum", revision="abc123"))  # a pinned revision is kept
    assert "\n" not in str(err.value)
    (tmp_path / "parquet" / "default").rename(tmp_path / "parquet" / "other")
    with pytest.raises(LsbenchError, match="cannot load dataset 'xsum' from the hub") as err:
        load_examples(DatasetSpec("xsum"))
    assert "\n" not in str(err.value)


# --- embedded corpora ------------------------------------------------------------------------

# find_spec rather than importorskip: lsbench reads gensim's data files without importing it,
# and the import alone costs a second.
needs_gensim = pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                                  reason="gensim not installed")


@needs_gensim
def test_lee_news_is_the_300_articles_without_references():
    examples, _ = load_examples(DatasetSpec("lee-news", limit=1000))
    assert len(examples) == 300
    assert sorted(ids_of(examples), key=int) == [str(i) for i in range(300)]
    assert all(e.reference is None for e in examples)
    assert all(len(e.article.split()) >= 40 and "\n" not in e.article for e in examples)


@needs_gensim
def test_wiki_lead_splits_articles_into_lead_and_plain_body():
    examples, _ = load_examples(DatasetSpec("wiki-lead", limit=1000))
    assert 80 <= len(examples) <= 106  # the dump holds 106 articles that are not redirects
    assert len(set(ids_of(examples))) == len(examples)
    markup = re.compile(r"\{\{|\}\}|\]\]|<ref|</?[a-z]+>|'''|^=+|&[a-z]+;", re.M)
    for e in examples:
        assert e.example_id.isdigit()
        assert len(e.reference.split()) >= 20 and len(e.article.split()) >= 100
        assert not markup.search(e.reference), e.reference[:200]
        assert not markup.search(e.article), e.article[:200]
        assert e.reference.split("\n")[0] not in e.article  # the lead is not part of the body


@needs_gensim
def test_embedded_corpora_are_cached_and_fast():
    load_examples(DatasetSpec("wiki-lead"))
    load_examples(DatasetSpec("lee-news"))
    assert data._wiki_lead.cache_info().currsize == 1
    assert data._lee_news.cache_info().currsize == 1


def test_missing_gensim_is_a_user_error(monkeypatch):
    monkeypatch.delenv(data.GENSIM_DATA_ENV, raising=False)  # no folder standing in for it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gensim" else real(name, *a))
    for name in ("lee-news", "wiki-lead"):
        with pytest.raises(LsbenchError, match=f"dataset '{name}' needs gensim: pip install"):
            check_dataset(name)
        with pytest.raises(LsbenchError, match="needs gensim"):
            load_examples(DatasetSpec(name))


# --- jsonl -------------------------------------------------------------------------------


def test_jsonl_article_and_prompt_keys(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"article": "first text", "reference": "first ref", "id": "a"},
        {"prompt": "second text"},
        {"article": "third text", "id": 7},
    ])
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")  # blank lines are skipped
    examples, _ = load_examples(DatasetSpec(f"jsonl:{path}", limit=10))
    assert sorted(examples, key=lambda e: e.article) == [
        Example("a", "first text", "first ref"),
        Example("1", "second text", None),  # no id: position among the records
        Example("7", "third text", None),
    ]


@pytest.mark.parametrize("lines, message", [
    (['{"article": "ok"}', '{"article": "ok"', '{"article": "ok"}'], ":2: invalid JSON"),
    (['{"article": "ok"}', '{"reference": "no text"}'], ":2: needs a non-empty 'article'"),
    (['["not", "an", "object"]'], ":1: expected a JSON object"),
    (['{"article": "ok", "reference": 3}'], ":1: 'reference' must be a string"),
    (['{"article": "a", "id": "x"}', '{"article": "b", "id": "x"}'], ":2: duplicate id 'x'"),
    (["", "  "], "no examples"),
])
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LsbenchError, match=re.escape(message)) as err:
        load_examples(DatasetSpec(f"jsonl:{path}"))
    assert "\n" not in str(err.value)


# --- selection and fingerprint ------------------------------------------------------------


@pytest.fixture
def jsonl_30(tmp_path) -> str:
    rows = [{"article": f"article {i} {words(8, i)}", "id": f"e{i}"} for i in range(30)]
    return f"jsonl:{write_jsonl(tmp_path / 'thirty.jsonl', rows)}"


def test_selection_is_deterministic_and_seeded(jsonl_30):
    first, fp1 = load_examples(DatasetSpec(jsonl_30, limit=8, seed=0))
    again, fp2 = load_examples(DatasetSpec(jsonl_30, limit=8, seed=0))
    other, fp3 = load_examples(DatasetSpec(jsonl_30, limit=8, seed=1))
    assert first == again and fp1 == fp2
    assert len(first) == 8 and len(set(ids_of(first))) == 8
    assert ids_of(first) != ids_of(other) and fp1 != fp3
    # a sample, not the file's first rows
    assert ids_of(first) != [f"e{i}" for i in range(8)]


def test_larger_limit_extends_smaller_one(jsonl_30):
    small, fp_small = load_examples(DatasetSpec(jsonl_30, limit=3))
    large, fp_large = load_examples(DatasetSpec(jsonl_30, limit=10))
    assert large[:3] == small
    assert fp_small != fp_large
    everything, _ = load_examples(DatasetSpec(jsonl_30, limit=500))
    assert sorted(ids_of(everything)) == sorted(f"e{i}" for i in range(30))


def test_fingerprint_follows_text_not_path(tmp_path, jsonl_30):
    _, fingerprint = load_examples(DatasetSpec(jsonl_30))
    text = Path(jsonl_30.removeprefix("jsonl:")).read_text()
    copy = tmp_path / "copy.jsonl"
    copy.write_text(text)
    assert load_examples(DatasetSpec(f"jsonl:{copy}"))[1] == fingerprint
    copy.write_text(text.replace("\"article ", "\"Article "))  # same ids, other text
    assert load_examples(DatasetSpec(f"jsonl:{copy}"))[1] != fingerprint


def test_limit_must_be_positive(jsonl_30):
    with pytest.raises(LsbenchError, match="at least 1"):
        load_examples(DatasetSpec(jsonl_30, limit=0))


# --- check_dataset -------------------------------------------------------------------------


def test_check_dataset_accepts_known_names_and_existing_jsonl_loading_nothing(
        jsonl_30, monkeypatch, tmp_path):
    import datasets

    def no_loading(*args, **kwargs):
        raise AssertionError("check_dataset loaded data")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    for loader in ("_lee_news", "_wiki_lead", "_jsonl", "_load_hub"):
        monkeypatch.setattr(data, loader, no_loading)
    checked = []
    for name in DATASETS:
        if name in ("lee-news", "wiki-lead") and importlib.util.find_spec("gensim") is None:
            continue
        assert check_dataset(name) is None
        checked.append(name)
    assert {"cnn_dailymail", "xsum"} <= set(checked)
    check_dataset(jsonl_30)
    # the file is what was checked: gone, the same name is refused
    Path(jsonl_30[len("jsonl:"):]).unlink()
    with pytest.raises(LsbenchError, match="dataset file not found"):
        check_dataset(jsonl_30)
    # gensim's corpora are accepted without gensim when its data folder is named
    monkeypatch.setenv(data.GENSIM_DATA_ENV, str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    check_dataset("lee-news")
    monkeypatch.delenv(data.GENSIM_DATA_ENV)
    with pytest.raises(LsbenchError, match="needs gensim"):
        check_dataset("lee-news")


@pytest.mark.parametrize("name, message", [
    ("cnn", "unknown dataset 'cnn'; choose one of: cnn_dailymail, xsum, lee-news, wiki-lead, "
            "jsonl:PATH"),
    ("jsonl:", "needs a path"),
    ("jsonl:/no/such/file.jsonl", "dataset file not found: /no/such/file.jsonl"),
])
def test_check_dataset_refusals(name, message):
    with pytest.raises(LsbenchError, match=re.escape(message)) as err:
        check_dataset(name)
    assert "\n" not in str(err.value)


# --- prompts ---------------------------------------------------------------------------------


def decoded(tok, ids: list[int]) -> str:
    return tok.decode(ids)


def test_plain_prompt_without_chat_template():
    tok = word_tokenizer()
    prompt = build_prompt(tok, words(6), max_input_tokens=100)
    assert prompt.format == "article-summary" and not prompt.truncated
    assert decoded(tok, prompt.ids) == f"Article: {words(6)} Summary:"
    assert decoded(tok, prompt.ids).endswith("Summary:")


def test_plain_prompt_keeps_bos_but_drops_eos():
    tok = word_tokenizer(bos_eos=True)
    prompt = build_prompt(tok, words(4), max_input_tokens=100)
    assert prompt.ids[0] == tok.bos_token_id
    assert prompt.ids[-1] == tok.convert_tokens_to_ids("Summary:")
    assert tok.eos_token_id not in prompt.ids


def test_chat_template_prompt():
    tok = word_tokenizer(CHAT_TEMPLATE)
    prompt = build_prompt(tok, words(5), max_input_tokens=100)
    assert prompt.format == "chat" and not prompt.truncated
    assert decoded(tok, prompt.ids) == f"<s> user: {INSTRUCTION} {words(5)} assistant:"
    assert prompt.ids.count(tok.bos_token_id) == 1  # the template's BOS only, not doubled


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE])
def test_truncation_respects_the_article_budget(template):
    tok = word_tokenizer(template)
    long_article = words(40)
    prompt = build_prompt(tok, long_article, max_input_tokens=10)
    assert prompt.truncated
    text = decoded(tok, prompt.ids)
    assert words(10) in text and words(11) not in text
    overhead = len(build_prompt(tok, "", max_input_tokens=10).ids)
    assert len(prompt.ids) == overhead + 10
    exact = build_prompt(tok, words(10), max_input_tokens=10)  # exactly at the budget
    assert not exact.truncated and exact.ids == prompt.ids


def test_prompt_budget_must_be_positive():
    with pytest.raises(LsbenchError, match="max_input_tokens"):
        build_prompt(word_tokenizer(), "w1", max_input_tokens=0)
