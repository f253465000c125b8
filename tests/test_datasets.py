"""Datasets as TRL and verl users have them: chat-message prompts rendered with the chat template,
dotted paths into nested fields, directories of files, and hub ids read only from the local cache."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minpro_cli.config import load_recipe
from minpro_cli.errors import MinproError
from minpro_cli.eval import run_eval
from minpro_cli.modeling import load_policy
from minpro_cli.rollout import run_rollout
from minpro_cli.rollouts import read_rollouts
from minpro_cli.tasks import load_problems
from minpro_cli.train import run_train

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
# a template made of characters the embedded character-level tokenizer knows
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
QUESTIONS = [("Compute 2+3.", "5"), ("Compute 7-4.", "3"), ("Compute 9+1.", "10"), ("Compute 6-6.", "0")]


def trl_rows() -> list[dict]:
    """TRL's conversational prompt-only format, with the answer in `solution`."""
    return [{"prompt": [{"role": "user", "content": q}], "solution": a} for q, a in QUESTIONS]


def verl_table() -> pa.Table:
    """verl's RL parquet layout: chat prompt, reward_model.ground_truth, extra_info.index."""
    return pa.Table.from_pylist([
        {"data_source": "arith", "ability": "math",
         "prompt": [{"role": "system", "content": "Answer in a box."}, {"role": "user", "content": q}],
         "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"index": i, "split": "train"}}
        for i, (q, a) in enumerate(QUESTIONS)
    ])  # fmt: skip


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The embedded model with a chat template added to its tokenizer."""
    policy = load_policy("embedded")
    policy.tokenizer.chat_template = TEMPLATE
    directory = tmp_path_factory.mktemp("chat-model")
    policy.model.save_pretrained(directory)
    policy.tokenizer.save_pretrained(directory)
    return directory


def test_trl_and_verl_layouts_give_chat_problems(tmp_path):
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps(r) + "\n" for r in trl_rows()))
    problems = load_problems(str(trl), preset="trl")
    assert problems[0].messages == [{"role": "user", "content": "Compute 2+3."}]
    assert (problems[0].question, problems[0].answer, problems[0].id) == ("Compute 2+3.", "5", "trl-0")

    pq.write_table(verl_table(), tmp_path / "verl.parquet")
    problems = load_problems(str(tmp_path / "verl.parquet"), preset="verl")
    assert [p.id for p in problems] == ["0", "1", "2", "3"] and problems[1].answer == "3"
    assert problems[1].messages[0] == {"role": "system", "content": "Answer in a box."}
    # the same without a preset: dotted paths into the nested fields
    same = load_problems(str(tmp_path / "verl.parquet"), "prompt", "reward_model.ground_truth", "extra_info.index")
    assert same == problems


def test_a_list_where_text_is_expected_names_the_field_and_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"question": "q1", "answer": "1"}) + "\n" + json.dumps({"question": "q2", "answer": [1, 2]}) + "\n")
    with pytest.raises(MinproError, match=r"t.jsonl:2: field 'answer' holds a list, not text"):
        load_problems(str(path))
    path.write_text(json.dumps({"question": {"text": "q"}, "answer": "1"}) + "\n")
    with pytest.raises(MinproError, match=r"t.jsonl:1: field 'question' holds a dict, not text.*dotted path"):
        load_problems(str(path))


def test_a_directory_of_files_is_read_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "b", "question": "q", "answer": "2"}) + "\n")
    pq.write_table(pa.table({"id": ["a"], "question": ["q"], "answer": ["1"]}), tmp_path / "a.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.id for p in load_problems(str(tmp_path))] == ["a", "b"]


def test_a_hub_id_not_in_the_local_cache_is_one_line_on_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MinproError) as caught:
        load_problems("openai/gsm8k", split="train", subset="main")
    message = str(caught.value)
    assert "'openai/gsm8k' is not a local path" in message and "never downloads" in message
    assert "load_dataset('openai/gsm8k', 'main', split='train').to_parquet('gsm8k-train.parquet')" in message
    assert "\n" not in message
    with pytest.raises(MinproError, match="task file not found: data/train.jsonl"):  # a path, not a hub id
        load_problems("data/train.jsonl")


def test_chat_datasets_train_and_evaluate_with_the_chat_template(tmp_path, chat_model):
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps(r) + "\n" for r in trl_rows()))
    pq.write_table(verl_table(), tmp_path / "verl.parquet")
    common = [f"model.path={chat_model}", "sampler.options.max_new_tokens=16", "train.group_size=2",
              "train.prompts_per_iteration=4", "train.iterations=1", "optim.warmup_steps=0"]
    verl = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'verl'}", *common, f"data.train={tmp_path / 'verl.parquet'}",
                                    "data.preset=verl", "rollout.num_prompts=4", "rollout.group_size=2"])
    rows = read_rollouts(run_rollout(verl)).to_pylist()
    tokenizer = load_policy(chat_model).tokenizer
    expected = tokenizer.apply_chat_template(verl_table()["prompt"][0].as_py(), add_generation_prompt=True, tokenize=False)
    assert rows[0]["prompt"] == expected == "system: Answer in a box.\nuser: Compute 2+3.\nassistant: "
    assert rows[0]["prompt_token_ids"] == tokenizer.encode(expected, add_special_tokens=False)
    assert rows[0]["reference_answer"] == "5"
    assert (run_train(verl) / "model.safetensors").is_file()

    trl_recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'trl'}", *common, f"data.eval={trl}", "data.preset=trl",
                                          "eval.n_samples=2", "eval.k=[1, 2]"])
    result = run_eval(trl_recipe, tmp_path / "trl-eval.json")
    assert result["n_problems"] == 4
    samples = read_rollouts(tmp_path / "trl-eval.samples.parquet").to_pylist()
    assert samples[0]["prompt"] == "user: Compute 2+3.\nassistant: "


def test_chat_prompts_need_a_chat_template(tmp_path):
    trl = tmp_path / "trl.jsonl"
    trl.write_text("".join(json.dumps(r) + "\n" for r in trl_rows()))
    recipe = load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'r'}", f"data.train={trl}", "data.preset=trl",
                                      "rollout.num_prompts=2", "rollout.group_size=1"])
    with pytest.raises(MinproError, match="problem 'trl-0' is a list of chat messages, but the tokenizer .* no chat template"):
        run_rollout(recipe)


# ---- datasets as people keep them on disk (issue 27) -----------------------------------------------

ROWS = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(QUESTIONS)]


def as_problems(spec: Path | str, split: str = "train") -> list[tuple[str, str, str]]:
    return [(p.id, p.question, p.answer) for p in load_problems(str(spec), split=split)]


EXPECTED = [(r["id"], r["question"], r["answer"]) for r in ROWS]


def test_datasets_save_to_disk_folders_are_read_with_the_split_chosen(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert as_problems(tmp_path / "one") == EXPECTED
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS[3:])}).save_to_disk(str(tmp_path / "dict"))
    assert as_problems(tmp_path / "dict", "train") == EXPECTED[:3]
    assert as_problems(tmp_path / "dict", "test") == EXPECTED[3:]
    with pytest.raises(MinproError, match="splits train, test, none of them 'validation'; set data.train_split"):
        as_problems(tmp_path / "dict", "validation")


def test_json_lines_under_a_json_name_gzipped_lines_and_arrow_files_are_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_json(str(tmp_path / "lines.json"))  # JSON Lines, as Dataset.to_json writes by default
    assert as_problems(tmp_path / "lines.json") == EXPECTED
    import gzip

    with gzip.open(tmp_path / "rows.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in ROWS)
    assert as_problems(tmp_path / "rows.jsonl.gz") == EXPECTED
    dataset.save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")  # the IPC stream `datasets` writes
    assert as_problems(arrow) == EXPECTED
    import pyarrow.feather  # noqa: F401 — the IPC file format too

    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(ROWS).schema) as w:
        w.write_table(pa.Table.from_pylist(ROWS))
    assert as_problems(tmp_path / "file.arrow") == EXPECTED


def test_a_verl_folder_of_train_and_test_parquet_gives_each_split(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[3:]), tmp_path / "test.parquet")
    assert as_problems(tmp_path, "train") == EXPECTED[:3]  # not one task with duplicate ids
    assert as_problems(tmp_path, "test") == EXPECTED[3:]
    with pytest.raises(MinproError, match="named by split \\(test, train\\) and none is 'dev'"):
        as_problems(tmp_path, "dev")


def test_a_hub_model_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    """A cache laid out as huggingface_hub lays it out, built here: nothing is downloaded."""
    from minpro_cli.modeling import embedded_model_dir, resolve_model_path

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--someorg--tiny-model"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for file in embedded_model_dir().iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("someorg/tiny-model") == snapshot
    policy = load_policy("someorg/tiny-model")
    assert policy.vocab_size == load_policy("embedded").vocab_size
    with pytest.raises(MinproError, match="'someorg/absent' is not a local directory.*hf download someorg/absent"):
        load_policy("someorg/absent")


def test_chat_messages_stored_in_a_csv_are_chat_prompts_not_their_repr(tmp_path):
    import csv

    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["prompt", "solution"])
        writer.writeheader()
        writer.writerow({"prompt": json.dumps([{"role": "user", "content": "Compute 2+3."}]), "solution": "5"})
        writer.writerow({"prompt": repr([{"role": "user", "content": "Compute 7-4."}]), "solution": "3"})  # pandas
    problems = load_problems(str(tmp_path / "chat.csv"), preset="trl")
    assert [p.messages for p in problems] == [[{"role": "user", "content": "Compute 2+3."}],
                                              [{"role": "user", "content": "Compute 7-4."}]]  # fmt: skip
    assert [p.question for p in problems] == ["Compute 2+3.", "Compute 7-4."]


def test_trl_preset_leaves_text_prompts_as_text_as_trl_does(tmp_path, chat_model):
    from minpro_cli.sampling import Plugins, sampling_job

    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"prompt": q, "solution": a}) + "\n" for q, a in QUESTIONS))
    base = [f"run_dir={tmp_path / 'run'}", f"model.path={chat_model}", f"data.train={tmp_path / 'text.jsonl'}"]
    policy = load_policy(chat_model)
    problem = load_problems(str(tmp_path / "text.jsonl"), preset="trl")[0]
    trl = load_recipe(QUICKSTART, [*base, "data.preset=trl", "data.prompt_template='{question}'"])
    assert sampling_job(trl, policy, Plugins.of(trl)).prompt(problem) == "Compute 2+3."  # as given, no template
    plain = load_recipe(QUICKSTART, base)
    assert sampling_job(plain, policy, Plugins.of(plain)).prompt(problem).startswith("user: ")  # auto: the chat template
    chat = load_problems(_trl_file(tmp_path), preset="trl")[0]
    assert sampling_job(trl, policy, Plugins.of(trl)).prompt(chat).startswith("user: ")  # chat prompts keep the template


def _trl_file(tmp_path: Path) -> str:
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows()))
    return str(tmp_path / "chat.jsonl")


def test_hive_partitioned_rollout_folders_read_as_rollouts(tmp_path):
    rollouts = run_rollout(load_recipe(QUICKSTART, [f"run_dir={tmp_path / 'run'}", "rollout.num_prompts=3",
                                                    "rollout.group_size=2", "sampler.options.max_new_tokens=8"]))
    table = pq.read_table(rollouts)
    pq.write_to_dataset(table, tmp_path / "hive", partition_cols=["prompt_id", "sample_index"])
    assert not any("prompt_id" in pq.read_schema(f).names for f in (tmp_path / "hive").rglob("*.parquet"))
    back = read_rollouts(tmp_path / "hive")
    key = ["prompt_id", "sample_index"]
    ordered = sorted(back.to_pylist(), key=lambda r: [r[k] for k in key])
    assert ordered == sorted(read_rollouts(rollouts).to_pylist(), key=lambda r: [r[k] for k in key])
