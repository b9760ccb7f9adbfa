"""Training examples, masks, batching, packing, batch order, vocabulary check."""

from __future__ import annotations

import logging

import pandas as pd
import pytest
import torch

from wmtp.data.prompts import mbpp_prompt, mbpp_solution
from wmtp.data.training import (
    Example,
    batch_indices,
    build_examples,
    check_same_vocabulary,
    collate,
    iterate_batches,
    pack,
    read_split,
    split_train_val,
    tokenizer_hash,
)
from wmtp.tiny.models import train_tokenizer


def mbpp_rows(n: int = 6, long_every: int = 0) -> pd.DataFrame:
    """Small MBPP-format frame; every `long_every`-th solution is very long."""
    rows = []
    for i in range(n):
        body = f"    return a * {i} + b\n"
        if long_every and i % long_every == long_every - 1:
            body = "    x = 1\n" * 200 + body
        rows.append(
            {
                "task_id": 100 + i,
                "text": f"Write a function number {i} combining two numbers.",
                "code": f"def f{i}(a, b):\r\n{body}",
                "test_list": [f"assert f{i}(1, 2) == {i + 2}", f"assert f{i}(0, 0) == 0"],
            }
        )
    return pd.DataFrame(rows)


def test_loss_mask_covers_exactly_solution_and_eos(tiny_tokenizer):
    rows = mbpp_rows(3)
    examples = build_examples(rows, tiny_tokenizer, max_seq_len=512)
    assert [e.sample_id for e in examples] == ["100", "101", "102"]
    for example, row in zip(examples, rows.itertuples(), strict=True):
        prompt = tiny_tokenizer(mbpp_prompt(row.text, row.test_list[0]), add_special_tokens=False)[
            "input_ids"
        ]
        solution = tiny_tokenizer(mbpp_solution(row.code), add_special_tokens=False)["input_ids"]
        assert example.input_ids == prompt + solution + [tiny_tokenizer.eos_token_id]
        assert example.loss_mask == [0] * len(prompt) + [1] * (len(solution) + 1)
        masked = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
        assert tiny_tokenizer.decode(masked[:-1]) == mbpp_solution(row.code)
        assert "\r" not in tiny_tokenizer.decode(masked[:-1])


def test_long_examples_are_dropped_and_counted(tiny_tokenizer, caplog):
    rows = mbpp_rows(6, long_every=3)
    with caplog.at_level(logging.WARNING, logger="wmtp.data.training"):
        examples = build_examples(rows, tiny_tokenizer, max_seq_len=200)
    assert [e.sample_id for e in examples] == ["100", "101", "103", "104"]
    assert all(len(e.input_ids) <= 200 for e in examples)
    assert "dropped 2 of 6" in caplog.text


def test_collate_right_pads_for_any_batch_size(tiny_tokenizer):
    examples = build_examples(mbpp_rows(5), tiny_tokenizer, max_seq_len=512)
    for size in (1, 2, 5):
        batch = collate(examples[:size], pad_id=tiny_tokenizer.pad_token_id)
        seq = max(len(e.input_ids) for e in examples[:size])
        assert (
            batch.input_ids.shape
            == batch.loss_mask.shape
            == batch.attention_mask.shape
            == (size, seq)
        )
        assert batch.loss_mask.dtype == torch.bool and batch.input_ids.dtype == torch.long
        for b, example in enumerate(examples[:size]):
            n = len(example.input_ids)
            assert batch.input_ids[b, :n].tolist() == example.input_ids
            assert batch.loss_mask[b, :n].tolist() == [bool(m) for m in example.loss_mask]
            assert batch.attention_mask[b].tolist() == [1] * n + [0] * (seq - n)
            assert not batch.loss_mask[b, n:].any()
            assert (batch.input_ids[b, n:] == tiny_tokenizer.pad_token_id).all()


def test_pack_keeps_masks_and_respects_length():
    examples = [Example(str(i), [i] * (3 + i), [0] * 2 + [1] * (1 + i)) for i in range(6)]
    packed = pack(examples, max_seq_len=10)
    assert all(len(p.input_ids) <= 10 for p in packed)
    assert sum((p.input_ids for p in packed), []) == sum((e.input_ids for e in examples), [])
    assert sum((p.loss_mask for p in packed), []) == sum((e.loss_mask for e in examples), [])
    assert [p.sample_id for p in packed] == ["0+1", "2", "3", "4", "5"]  # lengths 3..8
    with pytest.raises(ValueError, match="> 5"):
        pack(examples, max_seq_len=5)


def test_batch_order_is_seeded_resumable_and_covers_each_epoch():
    n, size = 23, 4
    first = [batch_indices(n, size, seed=7, step=s) for s in range(10)]
    again = [batch_indices(n, size, seed=7, step=s) for s in range(10)]
    other = [batch_indices(n, size, seed=8, step=s) for s in range(10)]
    assert first == again and first != other
    per_epoch = n // size
    epoch0 = sum(first[:per_epoch], [])
    assert len(set(epoch0)) == per_epoch * size  # no repeats within an epoch
    assert first[:per_epoch] != first[per_epoch : 2 * per_epoch]  # new shuffle per epoch
    examples = [Example(str(i), [i + 2, i + 3], [0, 1]) for i in range(n)]
    stream = iterate_batches(examples, size, seed=7, pad_id=0)
    straight = [next(stream) for _ in range(8)]
    resumed = iterate_batches(examples, size, seed=7, pad_id=0, start_step=5)
    for (step_a, a), (step_b, b) in zip(
        straight[5:], [next(resumed) for _ in range(3)], strict=True
    ):
        assert step_a == step_b and a.sample_ids == b.sample_ids
    ranks = [
        next(iterate_batches(examples, 2, seed=7, pad_id=0, rank=r, world_size=2))[1]
        for r in (0, 1)
    ]
    assert sorted(ranks[0].sample_ids + ranks[1].sample_ids) == sorted(straight[0][1].sample_ids)


def test_split_train_val_is_seeded_and_disjoint():
    examples = [Example(str(i), [1, 2], [0, 1]) for i in range(40)]
    train, val = split_train_val(examples, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert not {e.sample_id for e in train} & {e.sample_id for e in val}
    assert split_train_val(examples, 0.1, seed=3) == (train, val)
    assert split_train_val(examples, 0.1, seed=4)[1] != val


def test_read_split_roundtrip_and_missing_columns(tmp_path):
    rows = mbpp_rows(2)
    rows.to_parquet(tmp_path / "train.parquet")
    frame = read_split(tmp_path / "train.parquet")
    assert frame["test_list"].iloc[0] == rows["test_list"].iloc[0]
    rows.drop(columns=["code"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="code"):
        read_split(tmp_path / "bad.parquet")


def _other_tokenizer(vocab_size: int):
    return train_tokenizer(["def add(a, b):\n    return a + b\n" * 50], vocab_size)


def test_vocabulary_check_names_both_models(tiny_tokenizer):
    check_same_vocabulary(tiny_tokenizer, tiny_tokenizer, "base", "ref")
    other = _other_tokenizer(len(tiny_tokenizer))
    with pytest.raises(ValueError, match=r"'models/base'.*'models/ref'.*probe text ids differ"):
        check_same_vocabulary(tiny_tokenizer, other, "models/base", "models/ref")
    with pytest.raises(ValueError, match="vocabulary size"):
        check_same_vocabulary(tiny_tokenizer, _other_tokenizer(280), "a", "b")
    assert tokenizer_hash(tiny_tokenizer) != tokenizer_hash(other)


def test_tokenizer_hash_survives_save_load_and_padding_calls(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    before = tokenizer_hash(tiny_tokenizer)
    tiny_tokenizer(["a", "a b c"], padding=True, truncation=True, max_length=2)
    assert tokenizer_hash(tiny_tokenizer) == before
    tiny_tokenizer.save_pretrained(tmp_path)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path)) == before


def test_training_shows_the_prompt_evaluation_shows(chat_tokenizer, tmp_path):
    """In the chat format as in the raw one, a training example is exactly the
    evaluation prompt of the same MBPP row followed by the solution: the chat
    format's solution also closes the reply's code block, where evaluation stops."""
    import copy

    from wmtp.data.problems import load_mbpp
    from wmtp.data.prompts import (
        chat_completion,
        generation_stops,
        model_prompt,
        set_prompt_format,
        truncate_at_stop,
    )

    tokenizer = copy.deepcopy(chat_tokenizer)
    set_prompt_format(tokenizer, "chat")
    rows = mbpp_rows(3)
    rows.to_parquet(tmp_path / "rows.parquet")
    problems = load_mbpp(tmp_path / "rows.parquet")
    examples = build_examples(rows, tokenizer, max_seq_len=512)
    for example, problem, row in zip(examples, problems, rows.itertuples(), strict=True):
        prompt = model_prompt(tokenizer, "chat", problem.prompt, problem.message)
        prompt_ids = tokenizer(prompt)["input_ids"]  # as the sampler encodes it
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert example.loss_mask == [0] * len(prompt_ids) + [1] * (len(example.input_ids) - len(prompt_ids))
        assert example.input_ids[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
        target = tokenizer.decode(example.input_ids[len(prompt_ids) : -1])
        reply = truncate_at_stop(target, generation_stops("chat", problem.stop))
        judged = chat_completion(reply, problem.stop, problem.entry_point)
        assert judged.strip() == mbpp_solution(row.code).strip()
