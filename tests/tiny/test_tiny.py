"""The tiny built-in default: benchmark generator, tokenizer, base and reference models."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from wmtp.core.checkpoints import load_model, read_config
from wmtp.core.model import MTPModel
from wmtp.data.training import check_same_vocabulary, read_split
from wmtp.tiny.build import (
    build_tiny_base,
    build_tiny_ref,
    tiny_knobs,
    write_tiny_mbpp,
    write_tiny_mbpp_split,
)
from wmtp.tiny.data import FAMILIES, MBPP_COLUMNS, make_tiny_mbpp, sample_problems
from wmtp.tiny.models import build_tokenizer, mtp_loss, pack, pretrain, pretraining_lr_at

# Model and corpus small enough for a build in well under a second.
SMALL = dict(
    dim=32,
    n_layers=3,
    n_heads=2,
    n_future_tokens=2,
    ref_n_layers=2,
    vocab_size=300,
    max_seq_len=64,
    corpus_documents=120,
    ref_prompt_documents=40,
    pretrain_steps=3,
    ref_pretrain_steps=3,
    pretrain_batch_size=2,
    pretrain_seq_len=32,
)
COMMENT = re.compile(r"\s*#.*$")


def strip_comments(code: str) -> str:
    """Remove noise comments: generated references contain no '#' otherwise."""
    lines = [COMMENT.sub("", line) for line in code.rstrip("\n").split("\n")]
    return "\n".join(line for line in lines if line.strip()) + "\n"


def shape(text: str) -> str:
    """A problem statement with its constants blanked: the family's phrasing."""
    return re.sub(r"'[a-z]'", "'?'", re.sub(r"-?\d+", "N", text))


@pytest.fixture(scope="module")
def splits():
    """(train, test) of a small tiny-mbpp."""
    made = make_tiny_mbpp(n_train=90, n_test=40, seed=3, noise_comment_prob=0.5, n_validation=30)
    return made["train"], made["test"]


@pytest.fixture(scope="module")
def all_splits():
    return make_tiny_mbpp(n_train=90, n_test=40, seed=3, noise_comment_prob=0.5, n_validation=30)


def test_generator_is_deterministic_and_seeded(splits):
    again = make_tiny_mbpp(n_train=90, n_test=40, seed=3, noise_comment_prob=0.5, n_validation=30)
    other = make_tiny_mbpp(n_train=90, n_test=40, seed=4, noise_comment_prob=0.5, n_validation=30)
    assert splits[0].equals(again["train"]) and splits[1].equals(again["test"])
    assert not splits[1].equals(other["test"])


def test_deterministic_across_hash_seeds():
    script = (
        "import json; from wmtp.tiny.data import make_tiny_mbpp; "
        "s = make_tiny_mbpp(30, 10, 1, 0.5); "
        "print(json.dumps([s[k].code.tolist() + s[k].text.tolist() for k in sorted(s)]))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_mbpp_columns_and_types(splits):
    for frame in splits:
        assert tuple(frame.columns) == MBPP_COLUMNS
        for row in frame.itertuples(index=False):
            assert isinstance(row.task_id, int)
            assert len(row.test_list) == 3 and all(t.startswith("assert ") for t in row.test_list)
            assert row.test_setup_code == "" and list(row.challenge_test_list) == []
            name = re.match(r"assert (\w+)\(", row.test_list[0]).group(1)
            assert f"def {name}(" in row.code
    ids = splits[0].task_id.tolist() + splits[1].task_id.tolist()
    assert len(set(ids)) == len(ids)


def test_every_reference_passes_its_tests_in_a_subprocess(splits):
    programs = [r.code + "\n" + "\n".join(r.test_list) for f in splits for r in f.itertuples()]
    runner = (
        "import json, sys\n"
        "failed = []\n"
        "for i, program in enumerate(json.load(sys.stdin)):\n"
        "    try:\n"
        "        exec(program, {})\n"
        "    except Exception as error:\n"
        "        failed.append((i, repr(error)))\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", runner],
        input=json.dumps(programs),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stdout) == []
    # and a wrong solution does fail them (the asserts check something)
    row = splits[1].iloc[0]
    wrong = row.code.replace("return ", "return None and ", 1)
    done = subprocess.run(
        [sys.executable, "-c", runner],
        input=json.dumps([wrong + "\n" + "\n".join(row.test_list)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert len(json.loads(done.stdout)) == 1


def test_test_problems_are_new_instances_of_train_families(splits):
    train, test = splits
    train_shapes = {shape(t) for t in train.text}
    assert {shape(t) for t in test.text} <= train_shapes
    train_keys = {(r.text, strip_comments(r.code)) for r in train.itertuples()}
    assert not any((r.text, r.code) in train_keys for r in test.itertuples())
    assert len({(r.text, r.code) for r in test.itertuples()}) == len(test)


def test_families_are_balanced():
    problems = sample_problems(3 * len(FAMILIES), random.Random(0), set())
    counts = Counter(p.family for p in problems)
    assert set(counts) == set(FAMILIES) and set(counts.values()) == {3}


def test_noise_only_in_train_and_scaled_by_probability(splits):
    train, test = splits
    assert not any("#" in code for code in test.code)
    noisy_lines = sum(code.count("#") for code in train.code)
    clean_lines = sum(strip_comments(code).count("\n") for code in train.code)
    assert 0.3 < noisy_lines / clean_lines < 0.7  # probability 0.5 per line
    clean_train = make_tiny_mbpp(n_train=90, n_test=40, seed=3, noise_comment_prob=0.0, n_validation=30)["train"]
    assert not any("#" in code for code in clean_train.code)
    assert [strip_comments(c) for c in train.code] == clean_train.code.tolist()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="noise_comment_prob"):
        make_tiny_mbpp(5, 5, 0, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        make_tiny_mbpp(0, 5, 0, 0.5)
    with pytest.raises(ValueError, match="unknown tiny settings"):
        tiny_knobs(dimension=3)


def test_write_tiny_mbpp_round_trips(tmp_path):
    paths = write_tiny_mbpp(
        tmp_path, seed=2, n_train_problems=20, n_test_problems=8, n_validation_problems=6
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    made = make_tiny_mbpp(20, 8, 2, tiny_knobs()["noise_comment_prob"], 6)
    assert sorted(paths) == sorted(made)
    for split, frame in made.items():
        path = paths[split]
        back = read_split(path)
        assert back.code.tolist() == frame.code.tolist()
        assert [list(t) for t in back.test_list] == frame.test_list.tolist()


def test_write_one_split_matches_both(tmp_path):
    write_tiny_mbpp(tmp_path / "both", seed=1, n_train_problems=12, n_test_problems=5, n_validation_problems=4)
    for split in ("train", "validation", "test"):
        path = write_tiny_mbpp_split(
            tmp_path / "one" / f"{split}.parquet",
            split,
            seed=1,
            n_train_problems=12,
            n_test_problems=5,
            n_validation_problems=4,
        )
        assert read_split(path).equals(read_split(tmp_path / "both" / f"{split}.parquet"))
    with pytest.raises(ValueError, match="splits"):
        write_tiny_mbpp_split(tmp_path / "x.parquet", "prompt")


def test_validation_split_is_new_instances_disjoint_from_train_and_test(all_splits):
    """The split tuning uses: the train families, clean like test, no (text, code) and
    no task id shared with train or test; and adding it changes neither of them."""
    train, validation, test = all_splits["train"], all_splits["validation"], all_splits["test"]
    assert len(validation) == 30 and not any("#" in code for code in validation.code)
    assert {shape(t) for t in validation.text} <= {shape(t) for t in train.text}
    validation_keys = {(r.text, r.code) for r in validation.itertuples()}
    assert not validation_keys & {(r.text, strip_comments(r.code)) for r in train.itertuples()}
    assert not validation_keys & {(r.text, r.code) for r in test.itertuples()}
    assert not set(validation.task_id) & (set(train.task_id) | set(test.task_id))
    bigger = make_tiny_mbpp(n_train=90, n_test=40, seed=3, noise_comment_prob=0.5, n_validation=60)
    assert bigger["train"].equals(train) and bigger["test"].equals(test)


def test_tokenizer_round_trips_and_has_pad_eos():
    knobs = tiny_knobs(vocab_size=300, corpus_documents=60)
    tokenizer = build_tokenizer(knobs, seed=0)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert len(tokenizer) == 300
    for text in ("def f(x):\n    return x + 7  # apple\n", "s = 'ünïcödé → ok'\n\tx = [1,2]\n"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    again = build_tokenizer(knobs, seed=0)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_pretraining_lr_schedule():
    assert pretraining_lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert pretraining_lr_at(9, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert pretraining_lr_at(100, 100, 1.0, warmup=10) == pytest.approx(0.1)


def test_pretraining_lowers_the_loss():
    from wmtp.tiny.models import base_corpus, model_config

    knobs = tiny_knobs(**SMALL)
    tokenizer = build_tokenizer(knobs, 0)
    data = pack(base_corpus(knobs, 0), tokenizer, 32)  # (N, 32)
    model = MTPModel(model_config(knobs, len(tokenizer)))
    model.init_weights(0)
    losses = pretrain(model, mtp_loss, data, steps=40, batch_size=4, lr=3e-3, seed=0, desc="test")
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_base_and_ref_load_share_vocab_and_are_reproducible(tmp_path):
    for run in ("a", "b"):
        build_tiny_base(tmp_path / run / "base", seed=5, **SMALL)
        build_tiny_ref(tmp_path / run / "ref", seed=5, **SMALL)
    for role in ("base", "ref"):
        first, second = tmp_path / "a" / role, tmp_path / "b" / role
        assert (first / "model.safetensors").read_bytes() == (
            second / "model.safetensors"
        ).read_bytes()

    base = load_model(tmp_path / "a" / "base")
    assert base.n_heads == 2 and read_config(tmp_path / "a" / "base").dim == 32
    info = json.loads((tmp_path / "a" / "base" / "config.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", info["corpus_sha256"])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "ref")
    assert isinstance(ref, LlamaForCausalLM) and ref.config.num_hidden_layers == 2
    base_tok = AutoTokenizer.from_pretrained(tmp_path / "a" / "base")
    ref_tok = AutoTokenizer.from_pretrained(tmp_path / "a" / "ref")
    check_same_vocabulary(base_tok, ref_tok, "base", "ref")
    assert (base_tok.pad_token_id, base_tok.eos_token_id) == (0, 1)
    ids = torch.tensor([base_tok("def f(x):\n")["input_ids"]])
    assert ref(input_ids=ids).logits.shape[-1] == base.config.vocab_size == len(base_tok)

    build_tiny_base(tmp_path / "c" / "base", seed=6, **SMALL)
    assert (tmp_path / "c" / "base" / "model.safetensors").read_bytes() != (
        tmp_path / "a" / "base" / "model.safetensors"
    ).read_bytes()
