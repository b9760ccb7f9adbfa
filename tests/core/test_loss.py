"""The memory-efficient weighted MTP loss equals the plain formula on `model(input_ids)`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import wmtp.core.loss
from wmtp.core.loss import weighted_mtp_loss, weighted_mtp_loss_details
from wmtp.core.model import MTPModel


def naive_loss(model, input_ids, loss_mask, weights, attention_mask=None):
    """The loss formula of wmtp.core.loss written literally on the (B, S, H, V) logits; also returns
    each head's unweighted mean CE."""
    logits = model(input_ids, attention_mask)  # (B, S, H, V)
    batch, seq, n_heads, vocab = logits.shape
    valid_all = loss_mask.bool() if attention_mask is None else loss_mask.bool() & attention_mask.bool()
    total, head_ce = 0.0, []
    for k in range(n_heads):
        valid = valid_all[:, k + 1 :]  # (B, S-k-1): target t+k+1
        ce = F.cross_entropy(
            logits[:, : seq - k - 1, k].reshape(-1, vocab), input_ids[:, k + 1 :].reshape(-1), reduction="none"
        ).view(batch, -1)
        count = valid.sum()
        if count:
            total = total + (weights[:, k + 1 :] * ce * valid).sum() / count
        head_ce.append((ce * valid).sum().item() / max(int(count), 1))
    return total / n_heads, torch.tensor(head_ce)


def make_model(n_heads: int = 2, seed: int = 0) -> MTPModel:
    model = MTPModel(tiny_config(n_layers=n_heads + 2, n_future_tokens=n_heads))
    model.init_weights(seed)
    return model


def make_batch(seed: int, batch: int = 3, seq: int = 14, vocab: int = 97):
    """Prompt-then-solution rows with right padding of different lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    loss_mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        length = seq - 3 * b
        prompt = 2 + b
        attention_mask[b, length:] = 0
        input_ids[b, length:] = 0
        loss_mask[b, prompt:length] = True
    weights = torch.rand(batch, seq, generator=generator) * 2.5 + 0.05
    return input_ids, loss_mask, attention_mask, weights


def grads_of(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(got, expected):
    for name, g in expected.items():
        assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4])
@pytest.mark.parametrize("as_callable", [False, True])
def test_value_and_gradients_equal_naive(n_heads, as_callable):
    model = make_model(n_heads, seed=n_heads)
    input_ids, loss_mask, attention_mask, weights = make_batch(n_heads)
    expected_loss, expected_head_ce = naive_loss(model, input_ids, loss_mask, weights, attention_mask)
    expected = grads_of(model, expected_loss)

    source = (lambda ce_head0, hidden: weights) if as_callable else weights
    out = weighted_mtp_loss_details(model, input_ids, loss_mask, source, attention_mask)
    assert torch.allclose(out.loss, expected_loss, atol=1e-6)
    assert torch.allclose(out.head_ce, expected_head_ce, atol=1e-5)
    assert_grads_close(grads_of(model, out.loss), expected)


def test_unit_weights_give_mean_of_head_ces_and_no_padding_mask_works():
    model = make_model(3)
    input_ids, _, _, _ = make_batch(1)
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    out = weighted_mtp_loss_details(model, input_ids, loss_mask, torch.ones(input_ids.shape))
    assert torch.allclose(out.loss, out.head_ce.mean(), atol=1e-6)
    expected_loss, _ = naive_loss(model, input_ids, loss_mask, torch.ones(input_ids.shape))
    assert torch.allclose(out.loss, expected_loss, atol=1e-6)


def test_many_chunks_give_the_same_result(monkeypatch):
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(2)
    expected_loss, _ = naive_loss(model, input_ids, loss_mask, weights, attention_mask)
    expected = grads_of(model, expected_loss)
    monkeypatch.setattr(wmtp.core.loss, "CHUNK_ELEMENTS", 97 * 3)  # 3 rows per chunk
    loss = weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    assert_grads_close(grads_of(model, loss), expected)


def test_padding_and_invalid_positions_never_count():
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(3)
    reference = weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask)
    expected = grads_of(model, reference)

    changed_ids = input_ids.clone()
    changed_ids[attention_mask == 0] = 5  # another padding token id
    changed_weights = weights.clone()
    changed_weights[~loss_mask] = 100.0  # weights of prompt and padding targets
    stray_mask = loss_mask | (attention_mask == 0)  # loss_mask wrongly set on padding
    loss = weighted_mtp_loss(model, changed_ids, stray_mask, changed_weights, attention_mask)
    assert torch.allclose(loss, reference, atol=1e-6)
    assert_grads_close(grads_of(model, loss), expected)


def test_batch_rows_are_independent():
    """Each row's CE is the same alone or in a padded batch (batch size > 1 is safe)."""
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(4)
    batch = weighted_mtp_loss_details(model, input_ids, loss_mask, weights, attention_mask)
    for b in range(input_ids.shape[0]):
        length = int(attention_mask[b].sum())
        alone = weighted_mtp_loss_details(
            model, input_ids[b : b + 1, :length], loss_mask[b : b + 1, :length], weights[b : b + 1, :length]
        )
        assert torch.allclose(batch.ce_head0[b, :length], alone.ce_head0[0], atol=1e-5)
        assert torch.all(batch.ce_head0[b, length:] == 0)


def test_head_with_no_valid_target():
    model = make_model(3)
    input_ids, _, _, weights = make_batch(5, batch=2)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, 1:3] = True  # targets 1 and 2: heads 0 and 1 have some, head 2 (targets >= 3) none
    expected_loss, _ = naive_loss(model, input_ids, loss_mask, weights)
    expected = grads_of(model, expected_loss)
    out = weighted_mtp_loss_details(model, input_ids, loss_mask, weights)
    assert out.head_ce[2] == 0 and out.head_ce[0] > 0
    assert torch.allclose(out.loss, expected_loss, atol=1e-6)
    got = grads_of(model, out.loss)
    assert_grads_close(got, expected)
    assert all(torch.all(g == 0) for name, g in got.items() if name.startswith("heads.2."))


def test_no_valid_target_at_all_gives_zero_loss_and_zero_grads():
    model = make_model(2)
    input_ids, _, _, weights = make_batch(6)
    loss = weighted_mtp_loss(model, input_ids, torch.zeros_like(input_ids), weights)
    assert loss.item() == 0.0
    assert all(torch.all(g == 0) for g in grads_of(model, loss).values())


def test_gradients_never_flow_through_weights():
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(7)
    weights.requires_grad_(True)
    weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask).backward()
    assert weights.grad is None

    # A callable whose weights depend on the model: still no gradient through them.
    expected_loss, _ = naive_loss(model, input_ids, loss_mask, weights.detach(), attention_mask)
    expected = grads_of(model, expected_loss)
    probe = model.tok_embeddings.weight

    def weights_from_model(ce_head0, hidden):
        assert not ce_head0.requires_grad and not hidden.requires_grad
        return weights.detach() + 0.0 * probe.sum()

    loss = weighted_mtp_loss(model, input_ids, loss_mask, weights_from_model, attention_mask)
    assert_grads_close(grads_of(model, loss), expected)


def test_callable_gets_head0_ce_and_trunk_output():
    model = make_model(3)
    input_ids, loss_mask, attention_mask, weights = make_batch(8)
    seen = {}

    def weight_fn(ce_head0, hidden):
        seen["ce"], seen["hidden"] = ce_head0, hidden
        return weights

    out = weighted_mtp_loss_details(model, input_ids, loss_mask, weight_fn, attention_mask)
    with torch.no_grad():
        hidden, _ = model.trunk(input_ids, attention_mask)
        logits = model.next_token_logits(input_ids, attention_mask)  # (B, S, V)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, S-1)
    valid = loss_mask & attention_mask.bool()
    expected_ce = torch.zeros(input_ids.shape)
    expected_ce[:, 1:] = torch.where(valid[:, 1:], ce, 0.0)
    assert torch.allclose(seen["ce"], expected_ce, atol=1e-5)
    assert torch.allclose(out.ce_head0, expected_ce, atol=1e-5)
    assert torch.allclose(seen["hidden"], hidden, atol=1e-6)
    assert torch.equal(out.weights, torch.where(valid, weights, 0.0))


def test_callable_with_wrong_shape_raises():
    model = make_model(2)
    input_ids, loss_mask, _, _ = make_batch(9)
    with pytest.raises(ValueError, match="callable must return"):
        weighted_mtp_loss(model, input_ids, loss_mask, lambda ce, h: ce[:, 1:])
    with pytest.raises(ValueError, match="must match"):
        weighted_mtp_loss(model, input_ids, loss_mask, torch.ones(3, 2))


def test_backward_scales_with_incoming_gradient_as_deepspeed_needs():
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(10)
    once = grads_of(model, weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask))
    scaled = grads_of(model, 0.25 * weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask))
    assert_grads_close({k: 4 * v for k, v in scaled.items()}, once)


def test_no_grad_gives_value_only():
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(11)
    with torch.no_grad():
        loss = weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask)
        expected, _ = naive_loss(model, input_ids, loss_mask, weights, attention_mask)
    assert loss.grad_fn is None and torch.allclose(loss, expected, atol=1e-6)


def test_frozen_trunk_trains_heads_only():
    model = make_model(2)
    input_ids, loss_mask, attention_mask, weights = make_batch(12)
    expected = grads_of(model, naive_loss(model, input_ids, loss_mask, weights, attention_mask)[0])
    for p in [*model.tok_embeddings.parameters(), *model.layers.parameters()]:
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-4), name
        else:
            assert p.grad is None


def test_never_builds_all_heads_logits(monkeypatch):
    """The loss must not go through `model.forward`, which stacks H heads' logits."""
    model = make_model(3)
    input_ids, loss_mask, attention_mask, weights = make_batch(13)

    def forbidden(*args, **kwargs):
        raise AssertionError("model.forward called")

    monkeypatch.setattr(model, "forward", forbidden)
    weighted_mtp_loss(model, input_ids, loss_mask, weights, attention_mask).backward()


def deepspeed_sgd_step(model, loss_fn, batches, zero_stage: int) -> dict[str, torch.Tensor]:
    """One optimizer step of a 1-process DeepSpeed engine (SGD, grad accumulation
    over `batches`); returns the updated parameters."""
    import deepspeed

    from wmtp.stages.train import _init_distributed

    _init_distributed("cpu")  # an in-process store: no TCP port to collide on
    config = {
        "train_micro_batch_size_per_gpu": batches[0][0].shape[0],
        "gradient_accumulation_steps": len(batches),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for input_ids, loss_mask, attention_mask, weights in batches:
        engine.backward(loss_fn(engine.module, input_ids, loss_mask, weights, attention_mask))
        engine.step()
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_engine_backward_gives_the_naive_update(zero_stage):
    batches = [make_batch(20), make_batch(21)]

    def naive(model, *args):
        return naive_loss(model, *args)[0]

    expected = deepspeed_sgd_step(make_model(2), naive, batches, zero_stage)
    got = deepspeed_sgd_step(make_model(2), weighted_mtp_loss, batches, zero_stage)
    start = dict(make_model(2).named_parameters())
    for name, value in expected.items():
        assert not torch.equal(value, start[name]), f"{name} was not updated"
        assert torch.allclose(got[name], value, atol=1e-6, rtol=1e-4), name


def test_zero3_partitioned_parameters_are_refused():
    model = make_model(2)
    model.output.weight.ds_status = "NOT_AVAILABLE"  # what ZeRO-3 attaches to partitioned parameters
    input_ids, loss_mask, _, weights = make_batch(14)
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        weighted_mtp_loss(model, input_ids, loss_mask, weights)
