"""The DiMOO network (engine/dimoo/model.py) against a naive float64 re-implementation written from the
formulas of ../shared/DIMOO.md 1.3 (LLaDA block, RoPE, RMSNorm, SwiGLU), and its padding mask."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.dimoo.model import DimooConfig, DimooModel, apply_rope, rope_angles, tiny_dimoo_config

CFG = tiny_dimoo_config(40, codebook_size=16, d_model=32, n_layers=2, n_heads=4, rope_theta=500000.0)
GQA = tiny_dimoo_config(40, codebook_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _random_model(cfg, gen, dtype=torch.float32):
    """Weights N(0, 1/fan_in) and norms ~1 +- 0.3: big enough that every term shows in the output."""
    model = DimooModel(cfg, attn_backend="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model.to(dtype).eval()


def naive_forward(model, input_ids, mask, positions=None):
    """float64, one query at a time: logits [B, L, V]. RoPE rotates each pair (x_j, x_{j+d/2}) by the angle
    p * theta^(-2j/d); a query attends to the keys with mask 1 only; RMSNorm w * x / sqrt(mean x^2 + eps)."""
    c = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    pre = "model.transformer."
    b, length = input_ids.shape
    hd, half = c.head_dim, c.head_dim // 2
    positions = torch.arange(length).expand(b, length) if positions is None else positions

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def rope(v, p):  # v [d] one head at position p
        out = v.clone()
        for j in range(half):
            a = p * c.rope_theta ** (-2.0 * j / hd)
            out[j] = v[j] * math.cos(a) - v[j + half] * math.sin(a)
            out[j + half] = v[j + half] * math.cos(a) + v[j] * math.sin(a)
        return out

    x = sd[pre + "wte.weight"][input_ids]
    for i in range(c.n_layers):
        blk = f"{pre}blocks.{i}."
        n = rms(x, sd[blk + "attn_norm.weight"])
        q, k, v = (n @ sd[blk + f"{p}.weight"].T for p in ("q_proj", "k_proj", "v_proj"))
        att = torch.zeros_like(x)
        group = c.n_heads // c.kv_heads
        for r in range(b):
            keys = [j for j in range(length) if mask[r, j]]
            for h in range(c.n_heads):
                kh = h // group
                ks = [rope(k[r, j, kh * hd:(kh + 1) * hd], int(positions[r, j])) for j in keys]
                for t in range(length):
                    qt = rope(q[r, t, h * hd:(h + 1) * hd], int(positions[r, t]))
                    s = torch.stack([qt @ kj for kj in ks]) / math.sqrt(hd)
                    p = torch.exp(s - s.max())
                    p = p / p.sum()
                    att[r, t, h * hd:(h + 1) * hd] = sum(pj * v[r, j, kh * hd:(kh + 1) * hd] for pj, j in zip(p, keys))
        x = x + att @ sd[blk + "attn_out.weight"].T
        n = rms(x, sd[blk + "ff_norm.weight"])
        g, u = n @ sd[blk + "ff_proj.weight"].T, n @ sd[blk + "up_proj.weight"].T
        x = x + (g / (1 + torch.exp(-g)) * u) @ sd[blk + "ff_out.weight"].T
    return rms(x, sd[pre + "ln_f.weight"]) @ sd[pre + "ff_out.weight"].T


def _batch(gen, cfg, lengths, pad_id=None):
    """Random ids [B, max(lengths)] right-padded with random ids (or `pad_id`), and the 0/1 mask."""
    length = max(lengths)
    ids = torch.randint(0, cfg.vocab_rows, (len(lengths), length), generator=gen)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    if pad_id is not None:
        ids = torch.where(mask.bool(), ids, pad_id)
    return ids, mask


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("cfg", [CFG, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-4), (torch.bfloat16, 0.15)])
def test_forward_equals_naive_float64(gen, cfg, dtype, tol):
    """Padded batch (right padding of random ids): every real position's logits match the reference; the
    tolerance is set by the dtype (logits are O(1..10) here; bf16 has 8 mantissa bits over 2 layers)."""
    model = _random_model(cfg, gen)
    ids, mask = _batch(gen, cfg, [7, 4])
    ref = naive_forward(model, ids, mask)
    out = model.to(dtype)(ids, mask).logits.double()
    real = mask.bool()
    err = (out[real] - ref[real]).abs().max() / ref[real].abs().max()
    assert err < tol, float(err.detach())
    assert ref[real].std() > 0.3  # not a degenerate reference


def test_rope_equals_pairwise_rotation(gen):
    """apply_rope with rope_angles against rotating each (x_j, x_{j+d/2}) pair by p * theta^(-2j/d)."""
    b, nh, length, d, theta = 2, 3, 5, 8, 500000.0
    x = torch.randn(b, nh, length, d, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 5000, (b, length), generator=gen)
    out = apply_rope(x.float(), *rope_angles(pos, d, theta)).double()
    j = torch.arange(d // 2, dtype=torch.float64)
    ang = pos[:, None, :, None].double() * theta ** (-2 * j / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    ref = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    # fp32 angles of positions up to 5000: |error| <= ~5000 * 2^-24 rad
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    small = torch.randint(0, 64, (b, length), generator=gen)
    out = apply_rope(x.float(), *rope_angles(small, d, theta)).double()
    ang = small[:, None, :, None].double() * theta ** (-2 * j / d)
    ref = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_position_ids_are_used(gen):
    model = _random_model(CFG, gen).double()
    ids, mask = _batch(gen, CFG, [6, 6])
    pos = torch.randint(0, 100, ids.shape, generator=gen)
    torch.testing.assert_close(model(ids, mask, position_ids=pos).logits, naive_forward(model, ids, mask, pos),
                               atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_is_the_same_alone_or_beside_a_longer_padded_partner(gen, dtype):
    """Row A (9 tokens) alone, and right-padded to 14 in a batch with a 14-token row B: A's logits agree
    (bit for bit when the kernels reduce in the same order, else to fp32 rounding); the content of the padding
    never matters (same batch shape, other pad ids: bit for bit)."""
    model = _random_model(CFG, gen, dtype)
    ids, mask = _batch(gen, CFG, [9, 14])
    with torch.no_grad():
        alone = model(ids[:1, :9]).logits.float()
        batched = model(ids, mask).logits.float()
        repadded = model(torch.where(mask.bool(), ids, torch.randint_like(ids, 0, CFG.vocab_rows)), mask).logits
    assert torch.equal(batched[0, :9], repadded.float()[0, :9])  # padding content: no effect at all
    assert torch.equal(batched[1], repadded.float()[1])
    tol = 1e-5 if dtype == torch.float32 else 0.0625  # bf16: one rounding step of O(8) logits
    torch.testing.assert_close(batched[0, :9], alone[0], atol=tol, rtol=0)


def test_negative_control_attending_padding_is_caught(gen, monkeypatch):
    """With the mask dropped inside attention (the released code's bug, DIMOO.md section 4 row 1) the same
    comparisons fail by far more than their tolerance: the test above can fail."""
    model = _random_model(CFG, gen)
    ids, mask = _batch(gen, CFG, [9, 14])
    with torch.no_grad():
        alone = model(ids[:1, :9]).logits
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, k, v, attn_mask=None, is_causal=False: sdpa(q, k, v, is_causal=is_causal))
        batched = model(ids, mask).logits
        repadded = model(torch.where(mask.bool(), ids, torch.randint_like(ids, 0, CFG.vocab_rows)), mask).logits
    assert (batched[0, :9] - alone[0]).abs().max() > 1e-2
    assert (batched[0, :9] - repadded[0, :9]).abs().max() > 1e-2


def test_padded_rows_give_finite_outputs_and_all_padding_is_refused(gen):
    model = _random_model(CFG, gen)
    ids, mask = _batch(gen, CFG, [1, 6])
    assert torch.isfinite(model(ids, mask).logits).all()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, mask[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.clamp(max=0) + CFG.vocab_rows, mask)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0], mask[0])


# ----------------------------------------------------------------------------- heads and training
def test_slice_logits_and_hidden_states_agree(gen):
    model = _random_model(CFG, gen)
    ids, mask = _batch(gen, CFG, [8, 5])
    sl = model.ids.image_slice
    full = model(ids, mask, return_hidden=True)
    part = model(ids, mask, vocab=sl)
    assert part.logits.shape == (2, 8, CFG.codebook_size) and full.logits.shape == (2, 8, CFG.vocab_rows)
    torch.testing.assert_close(part.logits, full.logits[..., sl], atol=1e-6, rtol=0)
    torch.testing.assert_close(full.hidden @ model.head_weight(sl).T, part.logits, atol=1e-6, rtol=0)
    assert model(ids, mask, return_logits=False).logits is None


def test_gradient_checkpointing_gives_the_same_gradients(gen):
    model = _random_model(CFG, gen)
    ids, mask = _batch(gen, CFG, [8, 5])
    target = torch.randint(0, CFG.codebook_size, (2, 8), generator=gen)

    def grads():
        model.zero_grad()
        logits = model(ids, mask, vocab=model.ids.image_slice).logits
        F.cross_entropy(logits[mask.bool()], target[mask.bool()]).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    again = grads()
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    assert all(g.abs().sum() > 0 for g in plain)  # every parameter takes part


def test_config_checks():
    with pytest.raises(ValueError, match="n_heads"):
        DimooConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_kv_heads"):
        DimooConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="embedding_size"):
        DimooConfig(vocab_size=100, embedding_size=50)
    d = CFG.to_json_dict()
    assert DimooConfig.from_json_dict(d, codebook_size=CFG.codebook_size) == CFG
    for key, bad in (("alibi", True), ("weight_tying", True), ("block_type", "sequential"),
                     ("include_bias", True), ("rope", False)):
        with pytest.raises(ValueError, match=key):
            DimooConfig.from_json_dict({**d, key: bad})
    with pytest.raises(ValueError, match="attn_backend"):
        DimooModel(CFG, attn_backend="eager")
    with pytest.raises(ValueError, match="attn_backend"):  # flash_varlen on CPU fp32
        DimooModel(CFG, attn_backend="flash_varlen")(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_token_id"):  # neither layout
        DimooModel(DimooConfig.from_json_dict({**d, "mask_token_id": 3}, codebook_size=CFG.codebook_size))
    # dropout is accepted (DiMOO's values are unverified) and never applied: train mode == eval mode
    drop = DimooModel(DimooConfig.from_json_dict({**d, "attention_dropout": 0.1}, codebook_size=16))
    ids = torch.arange(6)[None]
    assert torch.equal(drop.train()(ids).logits, drop.eval()(ids).logits)


# ----------------------------------------------------------------------------- GPU backends
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["sdpa", "flash_varlen"])
def test_cuda_bf16_backends_match_the_reference_and_ignore_padding(gen, backend):
    """On CUDA in bf16 (the real model's setting): each backend against the float64 reference on the real
    positions, and a row alone vs beside a longer padded partner. flash_varlen needs flash-attn."""
    if backend == "flash_varlen":
        pytest.importorskip("flash_attn")
    model = _random_model(CFG, gen)
    ids, mask = _batch(gen, CFG, [9, 14])
    ref = naive_forward(model, ids, mask)
    model = model.to("cuda", torch.bfloat16)
    model.attn_backend = backend
    with torch.no_grad():
        out = model(ids.cuda(), mask.cuda()).logits.double().cpu()
        alone = model(ids[:1, :9].cuda()).logits.double().cpu()
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() / ref[real].abs().max() < 0.15
    torch.testing.assert_close(out[0, :9], alone[0], atol=0.0625, rtol=0)


# ----------------------------------------------------------------------------- the toy world's tiny DiMOO
def test_tiny_dimoo_is_seeded_compact_and_reloads_with_its_codebook(tmp_path, gen):
    from engine.dimoo.model import tiny_dimoo
    from engine.dimoo.vq import toy_vqmodel

    state = torch.random.get_rng_state()
    model = tiny_dimoo(128, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG untouched
    c = model.config
    assert (c.d_model, c.n_layers, c.mlp_hidden_size, c.codebook_size, c.vocab_rows) == (64, 2, 128, 64, 201)
    assert model.ids.image_slice == slice(137, 201) and model.ids.mask == c.mask_token_id == 128
    assert model.ids.grid_length(4, 4) == 20
    same, other = tiny_dimoo(128, seed=5).state_dict(), tiny_dimoo(128, seed=6).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    assert not torch.equal(other["model.transformer.wte.weight"], same["model.transformer.wte.weight"])
    model.save_pretrained(tmp_path)
    toy_vqmodel(64).save_pretrained(tmp_path / "vqvae")
    again = DimooModel.from_pretrained(tmp_path, dtype="float32")  # codebook 64 read from vqvae/config.json
    assert again.config == c and again.ids == model.ids
    ids, mask = _batch(gen, c, [6, 3])
    assert torch.equal(again(ids, mask).logits, model(ids, mask).logits)
