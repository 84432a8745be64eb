"""cart distill's FlexAttention path (packed conversations behind the cartridge, a BlockMask from
document ids) against the dense-mask path, on the tiny model and the CPU."""

from __future__ import annotations

import pytest
import torch

from test_distill import convo_record, random_teacher, write_convos

# eager flex_attention (the CPU reference) says it is unfused: known, and the point here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

QUESTIONS = ["Where do ships dock?", "Who founded the cooperative?", "How many bridges?",
             "What is the tram line?", "Name a number.", "What year is the launch?",
             "Which bay is closed?"]
ANSWERS = ["seven", "Voss", "four", "blue", "nine", "2091", "the north one"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """(model, tokenizer, conversations, cartridge) for a p=8 corpus-initialised cartridge."""
    from cart.distill import DistillConfig, initial_cartridge, load_conversations
    from cart.io import Console
    from cart.models import ModelIdentity, load_config, load_model, load_tokenizer, resolve_model

    ref = resolve_model(str(tiny_model))
    tok = load_tokenizer(ref)
    identity = ModelIdentity.of(ref, load_config(ref), tok)
    head = tok("Orbital freight ships dock at bay seven. " * 8, add_special_tokens=False)["input_ids"]
    teacher = random_teacher(0, len(tok))
    records = [convo_record(tok, identity, q, f"The answer is {a}.", i, teacher,
                            head=head if i == 0 else None)
               for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    path = write_convos(tmp_path_factory.mktemp("flex") / "convos.jsonl", records)
    model = load_model(ref)
    data = load_conversations([str(path)])
    cart, _ = initial_cartridge(DistillConfig(tokens=8, init="corpus"), data, model, tok, identity,
                                Console(True))
    return model, tok, data, cart


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch refuses FlexAttention inputs that need gradients on the CPU by a device check
    (training_attention keeps the CPU on the dense path); its eager implementation -- the math
    reference the GPU kernel is checked against -- runs anywhere. Lifting the check tests what
    this project adds: the mask, the biases, GQA and the gradients' way back to the cartridge."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


def _module(setup, biases: bool):
    from cart.trainable import TrainableCartridge

    model, _, _, cart = setup
    module = TrainableCartridge(cart, model, "kl", "float32")
    if biases:  # compacted cartridges' per-key logit biases, one [kv_heads, p] per layer
        gen = torch.Generator().manual_seed(1)
        object.__setattr__(module, "biases", [torch.randn(k.shape[0], 8, generator=gen)
                                               for k in cart.keys])
    return module


def _run(module, batch, attention: str):
    module.attention = attention
    module.zero_grad(set_to_none=True)
    loss, loss_sum, kl_sum = module(batch, 0.1)
    loss.backward()
    return loss_sum, kl_sum, [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("biases", [False, True])
def test_flex_loss_and_gradients_equal_the_dense_path(setup, cpu_flex_backward, biases):
    from cart.distill import make_batch

    _, tok, data, _ = setup
    rows = [[0, 1, 2, 3], [4, 5, 6]]  # B=2, 4 and 3 conversations, the shorter row padded
    batch = make_batch(rows, data.convos, 8, tok.pad_token_id, "cpu")
    assert batch.mask is not None and (batch.segment == -1).any() and (batch.segment[:, 0] == 0).all()
    module = _module(setup, biases)
    dense = _run(module, batch, "dense")
    flex = _run(module, batch, "flex")
    torch.testing.assert_close(flex[0], dense[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flex[1], dense[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(flex[2], dense[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in flex[2])  # every layer's cartridge K/V is trained
    # without the dense mask (as a GPU batch is built) the flex path reads the segments only
    lean = make_batch(rows, data.convos, 8, tok.pad_token_id, "cpu", dense_mask=False)
    assert lean.mask is None
    torch.testing.assert_close(_run(module, lean, "flex")[0], dense[0], rtol=1e-4, atol=1e-5)


def test_block_mask_is_built_once_per_forward(setup, cpu_flex_backward, monkeypatch):
    import cart.attention
    import torch.nn.attention.flex_attention as fa
    from cart.distill import make_batch

    model, tok, data, _ = setup
    built, seen = [], []
    create, flex = fa.create_block_mask, fa.flex_attention

    def counting_create(*args, **kwargs):
        built.append(create(*args, **kwargs))
        return built[-1]

    def spying_flex(*args, block_mask=None, **kwargs):
        seen.append(block_mask)
        return flex(*args, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(fa, "create_block_mask", counting_create)
    monkeypatch.setattr(fa, "flex_attention", spying_flex)
    monkeypatch.setattr(cart.attention, "_compiled_flex", None)
    module = _module(setup, False)
    module.attention = "flex"
    batch = make_batch([[0, 1, 2], [3, 4, 5]], data.convos, 8, tok.pad_token_id, "cpu",
                       dense_mask=False)
    module(batch, 1.0)
    layers = model.config.num_hidden_layers
    assert len(built) == 1 and len(seen) == layers > 1
    assert all(m is built[0] for m in seen)  # every layer attends under the one BlockMask
    assert tuple(built[0].shape) == (2, 1, batch.input_ids.shape[1], 8 + batch.input_ids.shape[1])


def test_training_attention_chooses_flex_on_cuda_only():
    from cart.attention import training_attention

    assert training_attention("cuda") == training_attention("cuda:1") == "flex"
    assert training_attention(torch.device("cuda", 0)) == "flex"
    assert training_attention("cpu") == training_attention(torch.device("cpu")) == "dense"


def test_make_batch_builds_the_dense_mask_only_for_the_dense_path(setup, monkeypatch):
    import cart.attention
    from cart.distill import make_batch

    _, tok, data, _ = setup
    batch = make_batch([[0, 1, 2]], data.convos, 8, tok.pad_token_id, "cpu")
    assert batch.mask.shape == (1, 1, batch.input_ids.shape[1], batch.input_ids.shape[1])
    monkeypatch.setattr(cart.attention, "training_attention", lambda device: "flex")
    batch = make_batch([[0, 1, 2]], data.convos, 8, tok.pad_token_id, "cpu")
    assert batch.mask is None and batch.segment.shape == batch.input_ids.shape


@pytest.mark.parametrize("layout", ["flat", "biased", "plain"])
def test_the_trained_cartridges_fused_attention_equals_the_blockwise_one(layout):
    """cart distill's dense path (a cartridge that needs gradients behind every row) runs one
    fused SDPA per KV head; it must give _attend_block's outputs and gradients: packed
    conversations, a padding query that reads the cartridge only, a flat cartridge's heads
    reading their own keys."""
    from cart.attention import _attend, _attend_block, _Placement
    from cart.cartridge import flat_layer

    gen = torch.Generator().manual_seed(0)
    b, kv, group, n, d = 2, 3, 2, 12, 8
    if layout == "flat":
        sizes = [5, 1, 7]  # ragged; the middle head keeps its sink only
        keys, values, biases = flat_layer([torch.randn(s, d, generator=gen) for s in sizes],
                                          [torch.randn(s, d, generator=gen) for s in sizes],
                                          [torch.randn(s, generator=gen) for s in sizes])
        pk, pv, bias = keys[None], values[None], biases[None, :, None]
    else:
        pk, pv = torch.randn(1, kv, 6, d, generator=gen), torch.randn(1, kv, 6, d, generator=gen)
        bias = torch.randn(1, kv, 1, 6, generator=gen) if layout == "biased" else None
    pk, pv = pk.requires_grad_(), pv.requires_grad_()
    q = torch.randn(b, kv, group * n, d, generator=gen, requires_grad=True)
    k = torch.randn(b, kv, n, d, generator=gen, requires_grad=True)
    v = torch.randn(b, kv, n, d, generator=gen, requires_grad=True)
    segment = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3])  # row 2 ends in padding
    i = torch.arange(n)
    ok = ((segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0)
          & (i[None, None, :] <= i[None, :, None]))  # [B, n, n]
    ok = ok[:, None, None].expand(b, 1, group, n, n).reshape(b, 1, group * n, n)
    prefix = (pk, pv, bias, _Placement([[0, 1]], b, "cpu"))
    fused, blockwise = _attend(q, k, v, ok, prefix, 0.3), _attend_block(q, k, v, ok, prefix, 0.3)
    torch.testing.assert_close(fused, blockwise, rtol=1e-5, atol=1e-6)
    weights = torch.randn(fused.shape, generator=gen)
    inputs = (pk, pv, q, k, v)
    for a, e in zip(torch.autograd.grad((fused * weights).sum(), inputs),
                    torch.autograd.grad((blockwise * weights).sum(), inputs)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
