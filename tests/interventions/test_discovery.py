"""Site discovery beyond the stock classes: subclasses, PEFT, unregistered model types, a registered
new architecture, and raw module sites on a plain ``nn.Sequential``."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import steerlab as sl
from steerlab.interventions import adapters
from tests.archs import ARCHS, tiny_inputs, tiny_model
from tests.interventions._helpers import wrapped
from tests.interventions._reference import lin
from tests.interventions.test_sites import _check_all_sites


def test_subclass_of_llama_resolves_like_llama():
    class MyLlama(T.LlamaForCausalLM):
        def extra(self):
            return 1

    torch.manual_seed(0)
    model = MyLlama(ARCHS["llama"]()).eval()
    _check_all_sites(model, "llama", tiny_inputs("llama", seq=6, pad=2, side="left"))


def test_unregistered_model_type_resolves_by_structure():
    class OtherConfig(T.LlamaConfig):
        model_type = "someones_llama_fork"

    torch.manual_seed(0)
    kw = {k: v for k, v in ARCHS["llama"]().to_diff_dict().items() if k != "model_type"}
    model = T.LlamaForCausalLM(OtherConfig(**kw)).eval()
    assert model.config.model_type == "someones_llama_fork"
    with wrapped(model) as lab:
        assert lab.facts.map.structural
    _check_all_sites(model, "llama", tiny_inputs("llama", seq=6, pad=2, side="right"))


def test_peft_lora_model():
    base = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    inputs = tiny_inputs("llama", seq=6, pad=1, side="left")
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
    with wrapped(model) as lab:
        assert lab.n_layers == 3 and not lab.sites.missing
        got = lab.collect(inputs, ["blocks.*.resid_post", "blocks.1.resid_pre", "blocks.1.attn.q", "blocks.1.attn.k"])
        res = lab.run(inputs)
        assert torch.equal(res.logits, plain.logits)
        assert not any(p.requires_grad for p in model.parameters())
    assert any(p.requires_grad for p in model.parameters())  # unwrap gives PEFT its trainable LoRA back
    for L in range(2):
        assert torch.equal(got[f"blocks.{L}.resid_post"], plain.hidden_states[L + 1])
    blk = base.model.layers[1]
    n1 = blk.input_layernorm(got["blocks.1.resid_pre"])
    q = blk.self_attn.q_proj  # a LoRA layer now: W x + (alpha / r) B A x
    want_q = lin(n1, q.base_layer) + (8 / 4) * lin(lin(n1, q.lora_A["default"]), q.lora_B["default"])
    assert not torch.allclose(want_q, lin(n1, q.base_layer), atol=1e-3)  # the adapter is active
    torch.testing.assert_close(got["blocks.1.attn.q"].flatten(2), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["blocks.1.attn.k"].flatten(2), lin(n1, blk.self_attn.k_proj), atol=1e-5, rtol=1e-5)


# -- a new architecture, registered in a few lines ----------------------------------------------------


class TinyConfig(T.PretrainedConfig):
    model_type = "steerlab_test_tinyformer"

    def __init__(self, vocab_size=50, hidden_size=16, num_attention_heads=2, num_hidden_layers=2, **kw):
        super().__init__(**kw)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_attention_heads, self.num_hidden_layers = num_attention_heads, num_hidden_layers


class Mixer(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        z = F.scaled_dot_product_attention(split(self.wq(x)), split(self.wk(x)), split(self.wv(x)), is_causal=True)
        return self.wo(z.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm_a, self.mixer, self.norm_b = nn.LayerNorm(d), Mixer(d, h), nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.mixer(self.norm_a(x))
        return x + self.down(F.gelu(self.up(self.norm_b(x))))


class TinyFormer(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.tok = nn.Embedding(config.vocab_size, d)
        self.blocks = nn.ModuleList(Block(d, config.num_attention_heads) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.tok

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        x = self.tok(input_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


@pytest.fixture
def tinyformer():
    arch = sl.Architecture(
        model_types=(TinyConfig.model_type,),
        block={
            "resid_pre": ":input",
            "attn.q": "mixer.wq:output",
            "attn.k": "mixer.wk:output",
            "attn.v": "mixer.wv:output",
            "attn.z": "mixer.wo:input",
            "attn.out": "mixer:output",
            "resid_mid": "norm_b:input!",
            "mlp.pre": "up:output",
            "mlp.post": "down:input",
            "mlp.out": "down:output",
            "resid_post": ":output",
        },
    )
    sl.register_architecture(arch)
    torch.manual_seed(0)
    try:
        yield TinyFormer(TinyConfig()).eval()
    finally:  # the registry is process-wide: leave it as found
        adapters._REGISTRY.pop(TinyConfig.model_type, None)
        adapters._STRUCTURAL.remove(arch)


def test_register_architecture_for_a_new_model(tinyformer):
    model = tinyformer
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    with wrapped(model) as lab:
        cat = lab.sites
        assert not cat.missing and tuple(cat["blocks.1.attn.z"]["shape"]) == ("batch", "pos", 2, 8)
        got = lab.collect(ids, cat.names())
        v = torch.randn(16, generator=torch.Generator().manual_seed(2))
        steered = lab.run(ids, [sl.Add("blocks.0.resid_mid", v, positions=-1)]).logits
    # by hand
    x = model.tok(ids)
    assert torch.equal(got["embed"], x)
    for L, blk in enumerate(model.blocks):
        assert torch.equal(got[f"blocks.{L}.resid_pre"], x)
        q = lin(blk.norm_a(x), blk.mixer.wq)
        torch.testing.assert_close(got[f"blocks.{L}.attn.q"].flatten(2), q)
        z = got[f"blocks.{L}.attn.z"]
        qh, kh, vh = (lin(blk.norm_a(x), w).view(2, 5, 2, 8) for w in (blk.mixer.wq, blk.mixer.wk, blk.mixer.wv))
        scores = torch.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(8)
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(z, torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vh), atol=1e-6, rtol=1e-5)
        attn = lin(z.flatten(2), blk.mixer.wo)
        torch.testing.assert_close(got[f"blocks.{L}.attn.out"], attn)
        mid = x + attn
        torch.testing.assert_close(got[f"blocks.{L}.resid_mid"], mid)
        pre = lin(blk.norm_b(mid), blk.up)
        torch.testing.assert_close(got[f"blocks.{L}.mlp.pre"], pre)
        torch.testing.assert_close(got[f"blocks.{L}.mlp.post"], F.gelu(pre))
        x = mid + lin(F.gelu(pre), blk.down)
        torch.testing.assert_close(got[f"blocks.{L}.resid_post"], x)
    torch.testing.assert_close(got["final_norm"], model.norm(x))
    torch.testing.assert_close(got["logits"], lin(model.norm(x), model.head))
    # an in-place resid_mid edit reaches both the MLP and the residual path
    with torch.no_grad():
        x0 = model.tok(ids)
        blk = model.blocks[0]
        mid = x0 + blk.mixer(blk.norm_a(x0))
        mid[:, -1] += v
        x1 = mid + blk.down(F.gelu(blk.up(blk.norm_b(mid))))
        want = model.head(model.norm(model.blocks[1](x1)))
    torch.testing.assert_close(steered, want, atol=1e-6, rtol=1e-6)


def test_raw_module_sites_on_a_plain_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, x2 = torch.randn(3, 8), torch.randn(3, 8)
    with wrapped(mlp, example_input=torch.randn(2, 8)) as lab:
        cat = lab.sites
        assert {"module:0:input", "module:1:output", "module:2:output"} <= set(cat.names())
        assert tuple(cat["module:1:output"]["shape"]) == ("batch", 16)
        hid = lab.collect(x, "module:1:output")["module:1:output"]
        zeroed = lab.run(x, [sl.Zero("module:1:output", dims=[0, 3, 5])]).output
        swapped = lab.run(x, [sl.Interchange("module:0:output", source=x2)]).output
        scaled = lab.run(x, [sl.Scale("module:2:input", factor=2.0)]).output
    with torch.no_grad():
        h = torch.relu(mlp[0](x))
        assert torch.equal(hid.reshape(3, 16), h)
        hz = h.clone()
        hz[:, [0, 3, 5]] = 0
        torch.testing.assert_close(zeroed, mlp[2](hz))
        torch.testing.assert_close(swapped, mlp[2](torch.relu(mlp[0](x2))))
        torch.testing.assert_close(scaled, mlp[2](2 * h))
        assert not torch.allclose(zeroed, mlp(x))
