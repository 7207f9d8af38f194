"""Prompt formats, n-shot examples and stop strings (issue 21, item 5)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lsbench.errors import LsbenchError
from lsbench.results.store import ResultStore
from lsbench.scenario.data import (
    INSTRUCTION,
    DatasetSpec,
    Example,
    build_prompt,
    build_prompts,
    cut_at_stop,
    load_examples,
    load_shots,
    stop_string_ids,
)
from lsbench.scenario.jobs import sweep_job
from lsbench.scenario.runner import JobOutcome, run_job
from tests.conftest import tiny_tokenizer
from tests.test_cli import assert_refused, invoke, no_measuring, sweep_args  # noqa: F401
from tests.test_data import cnn_rows, write_parquet
from tests.test_runner import job_settings, write_jsonl

ARTICLE = "the news said w1 w2 w3"


# A chat template in the tiny vocabulary's words: "said" opens a user turn, "summary" an
# assistant turn.
CHAT = ("<s> {% for m in messages %}{{ 'said' if m['role'] == 'user' else 'summary' }} "
        "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}summary{% endif %}")


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT
    return tok


def instruction(tok) -> str:
    """The instruction as the tiny vocabulary reads it back (most of its words are <unk>)."""
    return tok.decode(tok.encode(INSTRUCTION, add_special_tokens=False))


def text_of(tok, prompt) -> str:
    return tok.decode(prompt.ids)


def test_each_format_writes_its_prompt():
    tok = tiny_tokenizer()  # no chat template: the default is article-summary
    default = build_prompt(tok, ARTICLE, 100)
    assert (default.format, text_of(tok, default)) == ("article-summary",
                                                       f"Article: {ARTICLE} Summary:")
    assert build_prompt(tok, ARTICLE, 100, fmt="article-summary") == default
    plain = build_prompt(tok, ARTICLE, 100, fmt="plain")
    assert (plain.format, text_of(tok, plain)) == ("plain", ARTICLE)
    with pytest.raises(LsbenchError, match="needs a tokenizer with a chat template"):
        build_prompt(tok, ARTICLE, 100, fmt="chat")
    with pytest.raises(LsbenchError, match="unknown prompt format 'xml'"):
        build_prompt(tok, ARTICLE, 100, fmt="xml")


def test_a_chat_template_tokenizer_defaults_to_chat_and_can_use_the_blog_format():
    tok = chat_tokenizer()
    chat = build_prompt(tok, ARTICLE, 100)
    unk = instruction(tok)
    assert chat.format == "chat"
    assert text_of(tok, chat) == f"<s> said {unk} {ARTICLE} summary"
    blog = build_prompt(tok, ARTICLE, 100, fmt="article-summary")
    assert text_of(tok, blog) == f"Article: {ARTICLE} Summary:"


def test_shots_come_before_the_article_with_their_references():
    tok = tiny_tokenizer()
    shots = (Example("a", "w10 w11 w12", "w10"), Example("b", "w20 w21", "w21"))
    p = build_prompt(tok, ARTICLE, 100, shots=shots)
    assert text_of(tok, p) == ("Article: w10 w11 w12 Summary: w10 Article: w20 w21 Summary: "
                               f"w21 Article: {ARTICLE} Summary:")
    chat = build_prompt(chat_tokenizer(), ARTICLE, 100, shots=shots[:1])
    unk = instruction(tok)
    assert text_of(tok, chat) == (f"<s> said {unk} w10 w11 w12 summary w10 said {unk} "
                                  f"{ARTICLE} summary")
    # A shot's article is cut to the same budget as the evaluated one.
    cut = build_prompt(tok, ARTICLE, 2, shots=shots[:1])
    assert text_of(tok, cut) == "Article: w10 w11 Summary: w10 Article: the news Summary:"
    with pytest.raises(LsbenchError, match="not plain"):
        build_prompt(tok, ARTICLE, 100, fmt="plain", shots=shots)


def _jsonl(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"id": f"e{i}", "article": f"w{i} w{i + 1} the news",
                                        "reference": f"w{i}"}) + "\n" for i in range(n)))
    return path


def test_shots_never_hold_the_evaluated_example_and_are_deterministic(tmp_path):
    spec = DatasetSpec(f"jsonl:{_jsonl(tmp_path, 6)}", limit=6)
    examples, _ = load_examples(spec)
    shots = load_shots(spec, 3, examples)
    assert shots == load_shots(spec, 3, examples)
    for ex, own in zip(examples, shots, strict=True):
        assert len(own) == 3 and ex.example_id not in [s.example_id for s in own]
    # An example gets the same shots whatever the evaluated selection (limit, seed).
    few, _ = load_examples(dataclasses.replace(spec, limit=2, seed=7))
    by_id = {ex.example_id: own for ex, own in zip(examples, shots, strict=True)}
    for ex, own in zip(few, load_shots(spec, 3, few), strict=True):
        assert own == by_id[ex.example_id]
    with pytest.raises(LsbenchError, match="5 other example"):
        load_shots(spec, 6, examples)


def test_hub_shots_come_from_the_train_split(tmp_path):
    write_parquet(tmp_path / "3.0.0" / "test-00000-of-00001.parquet", cnn_rows(5, "test"))
    write_parquet(tmp_path / "3.0.0" / "train-00000-of-00001.parquet", cnn_rows(7, "train"))
    spec = DatasetSpec("cnn_dailymail", limit=3, data_files=str(tmp_path))
    examples, _ = load_examples(spec)
    shots = load_shots(spec, 2, examples)
    assert {s.example_id.split("-")[0] for own in shots for s in own} == {"train"}
    assert shots[0] == shots[1] == load_shots(spec, 2, examples)[2]
    single = DatasetSpec("cnn_dailymail", data_files=str(tmp_path / "3.0.0" /
                                                         "test-00000-of-00001.parquet"))
    with pytest.raises(LsbenchError, match="cannot load the train split"):
        load_shots(single, 1, examples)
    (tmp_path / "3.0.0" / "train-00000-of-00001.parquet").unlink()
    with pytest.raises(LsbenchError, match="n-shot examples come from the train split") as e:
        load_shots(spec, 1, examples)
    assert "\n" not in str(e.value)


def test_prompts_of_a_dataset_with_shots(tmp_path):
    spec = DatasetSpec(f"jsonl:{_jsonl(tmp_path, 4)}", limit=2)
    examples, _ = load_examples(spec)
    tok = tiny_tokenizer()
    prompts = build_prompts(tok, spec, examples, 100, "article-summary", 1)
    for ex, p, own in zip(examples, prompts, load_shots(spec, 1, examples), strict=True):
        assert text_of(tok, p) == (f"Article: {own[0].article} Summary: {own[0].reference} "
                                   f"Article: {ex.article} Summary:")


def test_stop_strings():
    assert cut_at_stop("w1 w2 Article: w3", ["Article:"]) == "w1 w2 "
    assert cut_at_stop("w1 w2 w3", ["w3", "w2"]) == "w1 "  # the first occurrence of any
    assert cut_at_stop("w1 w2", ["w9"]) == "w1 w2"
    tok = tiny_tokenizer()
    assert stop_string_ids(tok, ["Article:", "w1 w2"]) == (tok.convert_tokens_to_ids("Article:"),)


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--prompt-format", "xml"], "unknown prompt format 'xml'"),
    (["--n-shot", -1], "n_shot must be >= 0"),
    (["--prompt-format", "plain", "--n-shot", 1], "not plain"),
])
def test_bad_prompt_options_are_one_error_line(no_measuring, tiny_model_dir: Path,  # noqa: F811
                                               tmp_path: Path, extra, fragment):
    data = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "r.parquet"
    assert_refused(invoke(*sweep_args(tiny_model_dir, data, out), *extra), fragment)
    assert no_measuring == [] and not out.exists()


def test_prompt_options_in_a_sweep_file_and_their_type_checked(tmp_path: Path):
    from lsbench.scenario.jobs import Settings, base_job

    path = tmp_path / "s.toml"
    path.write_text('model = "m"\n[data]\nprompt_format = "article-summary"\nn_shot = 2\n'
                    '[decoding]\nstop = ["Article:", "w1"]\n')
    job = base_job(Settings.from_file(path), [], "sweep")
    assert (job.prompt_format, job.n_shot, job.stop_strings) == ("article-summary", 2,
                                                                 ("Article:", "w1"))
    path.write_text('model = "m"\n[data]\nn_shot = "2"\n')
    with pytest.raises(LsbenchError, match="n_shot must be of type int"):
        base_job(Settings.from_file(path), [], "sweep")


def test_resume_never_mixes_prompt_formats_or_shots(tiny_model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "d.jsonl")
    store = ResultStore(tmp_path / "r.parquet")

    def job(**values):
        return sweep_job(job_settings(tiny_model_dir, data, sweep__exit_layers="2",
                                      sweep__num_speculations="2", **values), 4)

    default, plain = job(), job(data__prompt_format="plain")
    blog = job(data__prompt_format="article-summary")
    assert run_job(default, store) == JobOutcome(4, 0)
    assert run_job(plain, store) == JobOutcome(4, 0)  # nothing reused
    assert run_job(blog, store) == JobOutcome(4, 0)  # explicit differs from the default's id
    shots = job(data__prompt_format="article-summary", data__n_shot=1)
    assert run_job(shots, store) == JobOutcome(4, 0)
    assert run_job(plain, store) == JobOutcome(0, 4)  # its own rows are resumed
    df = store.rows()
    assert len(df) == 16 and df.run_id.nunique() == 8
    fmt = df.groupby("run_id").prompt_format.unique().map(lambda v: tuple(v))
    assert all(len(v) == 1 for v in fmt)
    assert set(df.prompt_format) == {"article-summary", "plain"}
    assert set(df.n_shot) == {0, 1}
    tokens = df.groupby(["prompt_format", "n_shot", "example_id"]).prompt_tokens.unique()
    for ex in df.example_id.unique():  # the format's words, then a shot, add tokens
        plain_n, = tokens["plain", 0, ex]
        blog_n, = tokens["article-summary", 0, ex]
        shot_n, = tokens["article-summary", 1, ex]
        assert plain_n + 2 == blog_n < shot_n


def test_a_one_token_stop_string_ends_decoding_and_cuts_the_text(tiny_model_dir: Path,
                                                                  tmp_path: Path):
    data = write_jsonl(tmp_path / "d.jsonl")
    settings = {"data__limit": 1, "decoding__max_new_tokens": 12, "sweep__exit_layers": "2",
                "sweep__num_speculations": "2"}
    free = ResultStore(tmp_path / "free.parquet")
    run_job(sweep_job(job_settings(tiny_model_dir, data, **settings), 4), free)
    ar = free.rows().query("strategy == 'ar'").iloc[0]
    tok = tiny_tokenizer()
    words = ar.output_text.split()
    stop = words[len(words) // 2]  # a word the free run emits, after its first occurrence
    cut = words.index(stop)
    stopped = ResultStore(tmp_path / "stopped.parquet")
    run_job(sweep_job(job_settings(tiny_model_dir, data, decoding__stop=[stop], **settings), 4),
            stopped)
    for r in stopped.rows().to_dict("records"):
        assert list(r["output_ids"]) == list(ar.output_ids[:cut + 1]), r["strategy"]
        assert list(r["stop_strings"]) == [stop]
        assert r["output_text"].split() == words[:cut]
        assert tok.convert_tokens_to_ids(stop) == r["output_ids"][-1]


@pytest.mark.parametrize("command", [["compare", "--early-exit", 2], ["scan"]])
def test_compare_and_scan_take_the_prompt_options(no_measuring, tiny_model_dir: Path,  # noqa: F811
                                                  tmp_path: Path, command):
    data = write_jsonl(tmp_path / "d.jsonl")
    assert_refused(invoke(*command, "--model", tiny_model_dir, "--dataset", f"jsonl:{data}",
                          "--prompt-format", "xml", "--out", tmp_path / "r.parquet"),
                   "unknown prompt format 'xml'")
