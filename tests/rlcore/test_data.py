"""Data loading errors, prompt handling, synthetic tasks and the resumable sampler."""

import pytest

from conftest import write_jsonl
from rlcore.config import DataConfig, TaskConfig
from rlcore.data import DataError, PromptSampler, load_prompts, read_rows, tokenize_prompts
from rlcore.models import char_tokenizer
from rlcore.tasks import Arithmetic


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_missing_prompt_field_names_file_row_and_key(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"question": "2+2=", "answer": "4"}])
    cfg = DataConfig(train_files=[str(f)])
    with pytest.raises(DataError) as e:
        load_prompts(cfg, tok, seed=0)
    msg = str(e.value)
    assert "d.jsonl" in msg and "row 2" in msg and "'prompt'" in msg and "data.prompt_key" in msg  # 1-based


def test_missing_reward_field_names_row(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    with pytest.raises(DataError, match=r"row 2.*'answer'"):
        load_prompts(DataConfig(train_files=[str(f)]), tok, seed=0)


def test_long_prompts_dropped_and_counted(tmp_path, tok):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9" * 50, "answer": "x"}, {"prompt": "3+4=", "answer": "7"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    train, evals = load_prompts(DataConfig(train_files=[str(f)], max_prompt_tokens=10), tok, seed=0)
    assert evals is None and len(train) == 2 and train.num_dropped == 1
    assert train.texts == ["1+1=", "3+4="] and train.token_ids[0] == tok("1+1=")["input_ids"]


def test_chat_messages_use_the_template(tmp_path, tok):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "1+1="}], "answer": "2"}])
    train, _ = load_prompts(DataConfig(train_files=[str(f)], messages_key="messages"), tok, seed=0)
    assert train.texts == ["user: 1+1=\nassistant: "]


def test_prompt_with_chat_template_flag(tmp_path, tok):
    train = tokenize_prompts([{"prompt": "hi", "answer": "x"}], tok, DataConfig(apply_chat_template=True), "t")
    assert train.texts == ["user: hi\nassistant: "]


def test_parquet_and_missing_file(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "answer": "b"}]).to_parquet(str(tmp_path / "d.parquet"))
    assert read_rows(str(tmp_path / "d.parquet")) == [{"prompt": "a", "answer": "b"}]
    with pytest.raises(DataError, match="nope.jsonl"):
        read_rows(str(tmp_path / "nope.jsonl"))


def test_arithmetic_eval_split_is_disjoint_and_correct():
    task = Arithmetic(num_digits=2, ops="+-*")
    train, evals = task.rows("train", 3000, seed=0), task.rows("eval", 200, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    for r in train[:200]:
        assert int(r["answer"]) == eval(r["prompt"][:-1]) >= 0
    assert task.rows("train", 50, seed=0) == train[:50]  # deterministic


def test_synthetic_task_through_load_prompts(tok):
    cfg = DataConfig(task=TaskConfig(num_digits=3, num_train=100, num_eval=20))
    train, evals = load_prompts(cfg, tok, seed=0)
    assert len(train) == 100 and len(evals) == 20 and all("answer" in r for r in train.rows)


def test_sampler_covers_each_epoch_once_and_resumes_exactly():
    s = PromptSampler(10, seed=3)
    first_epoch = s.next_batch(4) + s.next_batch(4) + s.next_batch(2)
    assert sorted(first_epoch) == list(range(10))
    s.next_batch(3)
    state = s.state_dict()
    expected = [s.next_batch(4) for _ in range(5)]
    resumed = PromptSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch(4) for _ in range(5)] == expected


def test_sampler_rank_slices_partition_the_global_batch():
    ranks = [PromptSampler(20, seed=0, rank=r, world_size=2) for r in range(2)]
    single = PromptSampler(20, seed=0)
    assert ranks[0].next_batch(8) + ranks[1].next_batch(8) == single.next_batch(8)


def test_sampler_refuses_state_of_other_data():
    s = PromptSampler(10, seed=0)
    with pytest.raises(DataError, match="same data"):
        s.load_state_dict({"epoch": 0, "position": 3, "num_prompts": 11})


def test_prompts_with_characters_the_tokenizer_cannot_encode_are_dropped_counted_and_named(tmp_path, tok):
    """The built-in tokenizer covers printable ASCII; "×" and "é" used to become <eos> inside the prompt."""
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2×3=", "answer": "6"}, {"prompt": "café 1+2=", "answer": "3"},
            {"prompt": "3 + 4 =\n", "answer": "7"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    train, _ = load_prompts(DataConfig(train_files=[str(f)]), tok, seed=0)
    assert train.texts == ["1+1=", "3 + 4 =\n"] and train.num_unencodable == 2
    assert "d.jsonl' row 2" in train.unencodable_note and "'×'" in train.unencodable_note
    assert tok.eos_token_id not in [i for ids in train.token_ids for i in ids]
    only_bad = write_jsonl(tmp_path / "bad.jsonl", rows[1:3])
    with pytest.raises(DataError, match=r"no usable prompts \(0 longer .*, 2 with characters the tokenizer cannot "
                                        r"encode; .*bad\.jsonl' row 1"):
        load_prompts(DataConfig(train_files=[str(only_bad)]), tok, seed=0)


def test_malformed_json_line_names_file_and_1_based_row(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": 2\n{"prompt": "c", "answer": "3"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl' row 2 \(line 3\) is not valid JSON: .* column \d+"):
        read_rows(str(f))
    f.write_text('{"prompt": "a", "answer": "1"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"row 2 \(line 2\) is a JSON list"):
        read_rows(str(f))


@pytest.mark.parametrize("content, reason", [("", "is empty"), ("\n\n", "holds only blank lines")])
def test_empty_jsonl_says_so(tmp_path, content, reason):
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=rf"empty\.jsonl' {reason}"):
        read_rows(str(f))


def test_more_prompts_per_step_than_the_data_holds_is_refused():
    from rlcore.recipe import compose
    from rlcore.trainer import check_enough_prompts

    cfg, _ = compose(None, ["train.prompts_per_step=64", "data.train_files=[/data/small.jsonl]"])
    with pytest.raises(DataError, match=r"train\.prompts_per_step=64 but data\.train_files \['/data/small\.jsonl'\] "
                                        r"gives only 40 usable prompts.*at most 40"):
        check_enough_prompts(cfg, 40)
    cfg, _ = compose(None, ["train.prompts_per_step=64", "data.task.num_train=50"])
    with pytest.raises(DataError, match=r"data\.task\.num_train=50"):
        check_enough_prompts(cfg, 50)
    check_enough_prompts(cfg, 64)
