"""Every model family against transformers: safetensors, classic configs, GGUF, bf16, and controls.

Each family is a tiny random model with every variant it can have switched on (see
`families.SPECS`). The inputs are longer than every sliding window and rope threshold, so each
variant changes the hidden states, and the negative controls prove it: with the variant switched off
in our config, the comparison must fail.

GGUF comparisons. A GGUF file is compared with transformers reading the same file where
transformers' GGUF reader keeps every field the tiny model sets; otherwise with our own load of the
safetensors the file was written from (which the safetensors test holds to transformers). Variants a
GGUF file cannot carry at all (Mistral's window, Qwen3-MoE's dense layers, and the ones llama.cpp
derives or hardcodes) are switched off in the model the GGUF tests build: `FamilySpec.gguf_overrides`.

The writer self-checks at the end need no part of the engine: the GGUF files have the tensor names,
shapes, values and metadata llama.cpp's converter gives them, and transformers reads them back as the
model they were written from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import families as F
import gguf
import numpy as np
import pytest
import torch

from jaxembed.config import FULL, SLIDING
from jaxembed.weights.loader import Checkpoint, load_checkpoint

from parity import (
    assert_close_hidden,
    assert_close_pooled,
    cosine,
    hidden_error,
    our_hidden,
)
from tiny_models import llama_permute

Q = gguf.GGMLQuantizationType
SEQ = 70  # longer than every window (16) and Phi-3's original context (32)
PHI3_LENGTHS = (24, 70)  # one input within Phi-3's original context, one past it
FAMILIES = F.FAMILY_NAMES

TRANSFORMERS = "transformers from the same GGUF file"
OURS = "our load of the safetensors the file was written from"

# The reference each family's GGUF is held to, and why transformers cannot be it. Each "why" is
# checked by test_transformers_gguf_reader_limits, so the table stays true as transformers changes.
GGUF_REFERENCE: dict[str, tuple[str, str]] = {
    "llama": (OURS, "drops Llama 3 rope scaling (the rope_freqs tensor is not read)"),
    "mistral": (TRANSFORMERS, "window off in the GGUF build (llama architecture has no window "
                              "key); transformers reads the file as a llama"),
    "phi3": (OURS, "drops longrope: rope_factors_long/short, rope.scaling.original_context_length "
                   "and rope.scaling.attn_factor are not read"),
    "gemma": (OURS, "cannot load the 'gemma' architecture at all"),
    "gemma2": (OURS, "drops attn_logit_softcapping/final_logit_softcapping (falls back to 50/30) "
                     "and has no key for query_pre_attn_scalar (falls back to 256)"),
    "gemma3": (OURS, "has no key for query_pre_attn_scalar (falls back to 256) and does not read "
                     "rope.freq_base_swa"),
    "qwen2": (TRANSFORMERS, "keeps every field"),
    "qwen3": (OURS, "drops head_dim (no attention.key_length mapping for qwen3): Qwen3Config's "
                    "128 and a shape mismatch"),
    "qwen3_moe": (OURS, "drops moe_intermediate_size (expert_feed_forward_length): 768 and a "
                        "shape mismatch"),
    "glm4": (OURS, "cannot load the 'glm4' architecture at all"),
}
TRANSFORMERS_CANNOT_LOAD = ("gemma", "glm4")


# ---- the models, built once per session --------------------------------------------------------


class Zoo:
    """Tiny models, GGUF files, our checkpoints and transformers' outputs, each made on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._memo: dict[tuple, Any] = {}

    def _get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def folder(self, family: str, build: str = "full") -> Path:
        seed = FAMILIES.index(family) + 1  # different weights per family
        return self._get(("folder", family, build), lambda: F.build_family(
            family, self.root / f"{family}-{build}", seed=seed, build=build))

    def gguf(self, family: str, build: str = "gguf", qtype: Q = Q.F32) -> Path:
        return self._get(("gguf", family, build, qtype), lambda: F.write_family_gguf(
            self.folder(family, build), self.root / f"{family}-{build}-{qtype.name}.gguf", qtype))

    def dequantized(self, family: str, path: Path) -> Path:
        """The weights of GGUF file `path` (of the "gguf" build) as an HF folder."""
        return self._get(("dequantized", path), lambda: F.dequantized_folder(
            path, self.folder(family, "gguf"), self.root / f"{path.stem}-dequantized"))

    def ours(self, path: Path, dtype: str = "float32") -> Checkpoint:
        return self._get(("ours", path, dtype),
                         lambda: load_checkpoint(path, dtype=dtype, progress=False))

    def transformers(self, path: Path, ids: np.ndarray) -> np.ndarray:
        """transformers' final hidden states for a safetensors folder or a GGUF file."""
        return self._get(("transformers", path, ids.tobytes(), ids.shape),
                         lambda: transformers_hidden(path, ids))


def transformers_hidden(path: Path, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModel, AutoModelForCausalLM

    kw: dict[str, Any] = dict(attn_implementation="eager", dtype=torch.float32)
    if path.suffix == ".gguf":
        # The causal-LM class: its parameter names carry the "model." prefix that gguf's name map
        # needs for fused tensors (Phi-3's qkv_proj and gate_up_proj are unmapped without it).
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw).model
    else:
        model = AutoModel.from_pretrained(path, **kw)
    with torch.no_grad():
        return model.eval()(torch.as_tensor(ids)).last_hidden_state.numpy()


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("families"))


def inputs(family: str) -> list[np.ndarray]:
    """Token ids to compare on: one batch of 2 x SEQ, or for Phi-3 one sequence at a time.

    transformers picks Phi-3's long or short factors by the batch's longest position, and we pick
    them per sequence, so each Phi-3 input runs alone: one shorter than the original context, one
    longer.
    """
    rng = np.random.default_rng(FAMILIES.index(family) + 100)
    vocab = len(json.loads(F.tokenizer_json())["model"]["vocab"])
    if family == "phi3":
        return [rng.integers(0, vocab, (1, n)) for n in PHI3_LENGTHS]
    return [rng.integers(0, vocab, (2, SEQ))]


def assert_matches(ck: Checkpoint, ids: np.ndarray, ref: np.ndarray) -> None:
    ours = our_hidden(ck.params, ck.config, ids)
    assert_close_hidden(ours, ref)
    assert_close_pooled(ours.mean(1), ref.mean(1))


# ---- 1. safetensors (transformers-5 config) against transformers -------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_matches_transformers(zoo, family):
    folder = zoo.folder(family)
    ck = zoo.ours(folder)
    assert ck.format == "safetensors"
    for ids in inputs(family):
        assert_matches(ck, ids, zoo.transformers(folder, ids))


# ---- 2. the classic config style loads the same model ------------------------------------------


@pytest.fixture(scope="session")
def classic(zoo: Zoo) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            folder = zoo.root / f"{family}-classic"
            shutil.copytree(zoo.folder(family), folder)
            F.to_classic_config(folder)
            made[family] = folder
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_classic_config_loads_the_same(zoo, classic, family):
    folder = classic(family)
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg
    ck = zoo.ours(folder)
    assert ck.config == zoo.ours(zoo.folder(family)).config
    for ids in inputs(family):
        assert_matches(ck, ids, zoo.transformers(zoo.folder(family), ids))


# ---- 3. GGUF --------------------------------------------------------------------------------


def gguf_reference(zoo: Zoo, family: str, path: Path, ids: np.ndarray) -> np.ndarray:
    if GGUF_REFERENCE[family][0] == TRANSFORMERS:
        return zoo.transformers(path, ids)
    st = zoo.ours(zoo.folder(family, "gguf"))
    return our_hidden(st.params, st.config, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_reference(zoo, family):
    path = zoo.gguf(family)
    ck = zoo.ours(path)
    assert ck.format == "gguf"
    if family.startswith("gemma"):
        # The converter bakes Gemma's +1 into the norm weights; safetensors keep it in the model.
        assert ck.config.norm_offset == 0.0
        assert zoo.ours(zoo.folder(family, "gguf")).config.norm_offset == 1.0
    for ids in inputs(family):
        assert_matches(ck, ids, gguf_reference(zoo, family, path, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_q8_0_gguf_matches_transformers_on_its_weights(zoo, family):
    """Q8_0 matrices, F32 norms, biases and routers: held to transformers running the same
    dequantized weights (put back in HF layout), whatever its GGUF reader would drop."""
    path = zoo.gguf(family, qtype=Q.Q8_0)
    reference = zoo.dequantized(family, path)
    ck = zoo.ours(path)
    for ids in inputs(family):
        assert_matches(ck, ids, zoo.transformers(reference, ids))


# ---- 4. negative controls: each variant, switched off in our config, must break the match -------


def _rope_scaling(c: Any, **changes: Any) -> dict[str, Any]:
    return {"rope_scaling": dataclasses.replace(c.rope_scaling, **changes)}


def _default_rope(c: Any) -> dict[str, Any]:
    from jaxembed.config import RopeScaling

    return {"rope_scaling": RopeScaling()}


def _no_window(c: Any) -> dict[str, Any]:
    return {"sliding_window": None, "layer_types": (FULL,) * c.num_layers}


# (family, variant guarded, config changes that switch it off)
VARIANT_OFF: list[tuple[str, str, Callable[[Any], dict[str, Any]]]] = [
    ("llama", "llama3_rope", _default_rope),
    ("mistral", "sliding_window", _no_window),
    ("phi3", "longrope", _default_rope),
    ("phi3", "longrope_long_factors", lambda c: _rope_scaling(
        c, long_factor=c.rope_scaling.short_factor)),
    ("phi3", "longrope_attention_factor", lambda c: _rope_scaling(c, attention_factor=1.0)),
    ("gemma", "norm_offset", lambda c: {"norm_offset": 0.0}),
    ("gemma", "embed_scale", lambda c: {"embed_scale": False}),
    ("gemma", "gelu_tanh", lambda c: {"activation": "silu"}),
    ("gemma2", "attn_softcap", lambda c: {"attn_softcap": None}),
    ("gemma2", "query_pre_attn_scalar", lambda c: {"query_scale": c.head_dim**-0.5}),
    ("gemma2", "sliding_window", _no_window),
    ("gemma2", "layer_types", lambda c: {"layer_types": (SLIDING,) * c.num_layers}),
    ("gemma2", "sandwich_norm", lambda c: {"sandwich_norm": False}),
    ("gemma2", "norm_offset", lambda c: {"norm_offset": 0.0}),
    ("gemma3", "qk_norm", lambda c: {"qk_norm": False}),
    ("gemma3", "sandwich_norm", lambda c: {"sandwich_norm": False}),
    ("gemma3", "query_pre_attn_scalar", lambda c: {"query_scale": c.head_dim**-0.5}),
    ("gemma3", "sliding_window", _no_window),
    ("gemma3", "rope_local_theta", lambda c: {"rope_local_theta": None}),
    ("gemma3", "layer_types", lambda c: {"layer_types": (SLIDING,) * c.num_layers}),
    ("qwen2", "qkv_bias", lambda c: {"qkv_bias": False}),
    ("qwen3", "qk_norm", lambda c: {"qk_norm": False}),
    ("qwen3_moe", "qk_norm", lambda c: {"qk_norm": False}),
    ("qwen3_moe", "norm_topk_prob", lambda c: {"norm_topk_prob": False}),
    ("qwen3_moe", "top2_routing", lambda c: {"num_experts_per_tok": 1}),
    ("glm4", "partial_rotary", lambda c: {"rotary_dim": c.head_dim}),
    ("glm4", "rope_interleaved", lambda c: {"rope_interleaved": False}),
    ("glm4", "qkv_bias", lambda c: {"qkv_bias": False}),
    ("glm4", "sandwich_norm", lambda c: {"sandwich_norm": False}),
]


@pytest.mark.parametrize(("family", "variant", "switch_off"), VARIANT_OFF,
                         ids=[f"guards-{f}-{v}" for f, v, _ in VARIANT_OFF])
def test_negative_control_variant_off_fails(zoo, family, variant, switch_off):
    folder = zoo.folder(family)
    ck = zoo.ours(folder)
    cfg = dataclasses.replace(ck.config, **switch_off(ck.config))
    assert cfg != ck.config, f"switching off {variant} changed nothing in the config"
    errors = [hidden_error(our_hidden(ck.params, cfg, ids), zoo.transformers(folder, ids))
              for ids in inputs(family)]
    assert max(errors) > 1e-3, f"{family} {variant} switched off went unnoticed ({errors})"


# ---- 5. bfloat16 ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_stays_close_to_float32(zoo, family):
    folder = zoo.folder(family)
    ck32, ck16 = zoo.ours(folder), zoo.ours(folder, "bfloat16")
    for ids in inputs(family):
        a = our_hidden(ck32.params, ck32.config, ids)
        b = our_hidden(ck16.params, ck16.config, ids)
        assert cosine(a.mean(1), b.mean(1)).min() > 0.999


# ---- builder and writer self-checks (no part of the engine) ------------------------------------


# HF config changes (same seed, same weights) that switch a variant off in transformers: each must
# change transformers' output on the test inputs, or the negative control above proves nothing.
HF_VARIANT_OFF: list[tuple[str, str, dict[str, Any]]] = [
    ("llama", "llama3_rope", dict(rope_parameters=F.default_rope(10000.0))),
    ("mistral", "sliding_window", dict(sliding_window=None)),
    ("phi3", "longrope", dict(rope_parameters=F.default_rope(10000.0, partial_rotary_factor=1.0))),
    ("gemma", "gelu_tanh", dict(hidden_act="silu")),
    ("gemma2", "attn_softcap", dict(attn_logit_softcapping=None)),
    ("gemma2", "query_pre_attn_scalar", dict(query_pre_attn_scalar=32)),
    ("gemma2", "sliding_window", dict(layer_types=["full_attention"] * 4)),
    ("gemma3", "query_pre_attn_scalar", dict(query_pre_attn_scalar=32)),
    ("gemma3", "sliding_window", dict(layer_types=["full_attention"] * 6)),
    ("gemma3", "rope_local_theta", dict(rope_parameters={
        "full_attention": F.default_rope(500_000.0),
        "sliding_attention": F.default_rope(500_000.0)})),
    ("qwen3_moe", "norm_topk_prob", dict(norm_topk_prob=False)),
    ("qwen3_moe", "top2_routing", dict(num_experts_per_tok=1)),
    ("glm4", "partial_rotary", dict(rope_parameters=F.default_rope(
        10000.0, partial_rotary_factor=1.0))),
]


@pytest.mark.parametrize(("family", "variant", "changes"), HF_VARIANT_OFF,
                         ids=[f"{f}-{v}" for f, v, _ in HF_VARIANT_OFF])
def test_variant_acts_in_transformers(zoo, family, variant, changes):
    seed = FAMILIES.index(family) + 1
    off = F.build_family(family, zoo.root / f"{family}-without-{variant}", seed=seed, **changes)
    errors = [hidden_error(transformers_hidden(off, ids), zoo.transformers(zoo.folder(family), ids))
              for ids in inputs(family)]
    assert max(errors) > 1e-3, f"{variant} does not act on the test inputs ({errors})"


@pytest.mark.parametrize("family", FAMILIES)
def test_classic_config_is_read_the_same_by_transformers(zoo, classic, family):
    """The classic rewrite describes the same model: transformers agrees."""
    for ids in inputs(family):
        a = zoo.transformers(classic(family), ids)
        assert hidden_error(a, zoo.transformers(zoo.folder(family), ids)) < 1e-5


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in TRANSFORMERS_CANNOT_LOAD])
def test_gguf_writer_round_trips_through_transformers(zoo, family):
    """transformers reads the GGUF of the "check" build back as the model it was written from:
    names, q/k permutation, +1 norms, fused and stacked tensors are all as its reader expects."""
    path = zoo.gguf(family, "check")
    for ids in inputs(family):
        ref = zoo.transformers(zoo.folder(family, "check"), ids)
        assert hidden_error(zoo.transformers(path, ids), ref) <= 1e-4


@pytest.mark.parametrize("family", [f for f, (ref, _) in GGUF_REFERENCE.items() if ref == OURS])
def test_transformers_gguf_reader_limits(zoo, family):
    """Where GGUF_REFERENCE says transformers cannot be the reference, it indeed cannot."""
    path = zoo.gguf(family)
    ids = inputs(family)[-1]
    if family in TRANSFORMERS_CANNOT_LOAD:
        with pytest.raises(ValueError, match="not supported"):
            zoo.transformers(path, ids)
        return
    try:
        got = zoo.transformers(path, ids)
    except RuntimeError as e:  # a dropped size: transformers refuses the mismatched shapes
        assert "mismatch" in str(e).lower() or "size" in str(e).lower(), e
        return
    assert hidden_error(got, zoo.transformers(zoo.folder(family, "gguf"), ids)) > 1e-3


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents() if key in reader.fields else None


def expected_metadata(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys llama.cpp needs for this tiny model, with their values (None: must be absent)."""
    keys: dict[str, Any] = {
        "block_count": cfg["num_hidden_layers"],
        "embedding_length": cfg["hidden_size"],
        "feed_forward_length": cfg["intermediate_size"],
        "context_length": cfg["max_position_embeddings"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
    }
    if family in ("llama", "mistral"):
        keys |= {"rope.dimension_count": 16, "vocab_size": cfg["vocab_size"],
                 "attention.key_length": 16}
    elif family == "phi3":
        keys |= {"rope.dimension_count": 16, "rope.scaling.original_context_length": 32,
                 "rope.scaling.attn_factor": math.sqrt(1 + math.log(256 / 32) / math.log(32)),
                 "attention.sliding_window": 0}
    elif family == "gemma":
        keys |= {"attention.key_length": 32, "rope.freq_base": None}
    elif family == "gemma2":
        keys |= {"attention.key_length": 32, "attn_logit_softcapping": 5.0,
                 "final_logit_softcapping": 3.0, "attention.sliding_window": 16,
                 "rope.freq_base": None}
    elif family == "gemma3":
        keys |= {"attention.key_length": 32, "rope.freq_base": 500_000.0,
                 "rope.freq_base_swa": 10_000.0, "attention.sliding_window": 16}
    elif family == "qwen2":
        keys |= {"rope.freq_base": 1_000_000.0, "attention.key_length": None}
    elif family == "qwen3":
        keys |= {"attention.key_length": 24, "attention.value_length": 24}
    elif family == "qwen3_moe":
        keys |= {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 64,
                 "attention.key_length": 24}
    elif family == "glm4":
        keys |= {"rope.dimension_count": 8, "attention.key_length": 16}
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_writer_layout(zoo, family):
    """Names valid for the architecture, numpy shapes, values (F32 file) and metadata, each held to
    the HF tensor it came from; every HF tensor is written exactly once."""
    from safetensors.numpy import load_file

    folder = zoo.folder(family, "gguf")
    cfg = json.loads((folder / "config.json").read_text())
    hf = load_file(str(folder / "model.safetensors"))
    spec = F.SPECS[family]
    n_layers = cfg["num_hidden_layers"]
    reader = gguf.GGUFReader(zoo.gguf(family))
    arch = spec.arch_name

    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    for key, want in expected_metadata(family, cfg).items():
        got = _field(reader, f"{arch}.{key}")
        if want is None:
            assert got is None, f"{key} should be absent, is {got}"
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-6), key
        else:
            assert got == want, key

    allowed = set()
    for tensor in gguf.MODEL_TENSORS[spec.arch]:
        base = gguf.TENSOR_NAMES[tensor]
        for bid in range(n_layers) if "{bid}" in base else [0]:
            allowed |= {base.format(bid=bid) + ".weight", base.format(bid=bid) + ".bias"}
    name_map = gguf.get_tensor_name_map(spec.arch, n_layers)
    to_hf = {name_map.get_name(n, try_suffixes=(".weight", ".bias")): n for n in hf}
    unused = set(hf) - ({"lm_head.weight"} if family.startswith("gemma") else set())
    rope = F.rope_params(cfg)

    for t in reader.tensors:
        assert t.name in allowed, f"{t.name} is not a {arch} tensor"
        assert t.tensor_type == Q.F32
        data = np.asarray(t.data)
        assert tuple(int(n) for n in reversed(t.shape)) == data.shape  # ggml order is reversed
        if t.name == "rope_freqs.weight":
            assert family == "llama" and data.shape == (8,) and data.max() == 8.0
            continue
        if t.name.startswith("rope_factors_"):
            kind = t.name.split("_")[2].split(".")[0]
            np.testing.assert_array_equal(data, np.float32(rope[f"{kind}_factor"]))
            continue
        if "_exps." in t.name:  # [E, out, in]: expert e of layer b
            b, which = t.name.split(".")[1], t.name.split(".")[2].split("_")[1]
            assert data.shape[0] == cfg["num_local_experts"]
            for e in range(data.shape[0]):
                src = f"model.layers.{b}.mlp.experts.{e}.{which}_proj.weight"
                np.testing.assert_array_equal(data[e], hf[src])
                unused.remove(src)
            continue
        src = to_hf[t.name]
        unused.remove(src)
        want = hf[src].astype(np.float32)
        if family in ("llama", "mistral") and ".attn_q." in t.name:
            data = F.unpermute(data, cfg["num_attention_heads"])
        elif family in ("llama", "mistral") and ".attn_k." in t.name:
            data = F.unpermute(data, cfg["num_key_value_heads"])
        elif family.startswith("gemma") and src.endswith("norm.weight"):
            data = data - 1
        np.testing.assert_allclose(data, want, rtol=0, atol=1e-6, err_msg=t.name)
    assert not unused, f"HF tensors not written: {sorted(unused)}"


def test_gguf_unpermute_inverts_the_converter_permutation():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    np.testing.assert_array_equal(F.unpermute(llama_permute(w, 4), 4), w)
    assert not np.array_equal(llama_permute(w, 4), w)


@pytest.mark.parametrize("family", ["qwen3_moe", "phi3", "gemma3"])
def test_gguf_writer_quant_types(zoo, family):
    """At Q8_0, matrices (expert stacks included) are Q8_0 and norms, biases, rope factors and the
    MoE router stay F32, as the converter leaves them."""
    reader = gguf.GGUFReader(zoo.gguf(family, qtype=Q.Q8_0))
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for t in reader.tensors:
        f32 = len(t.shape) == 1 or t.name.endswith("_norm.weight") or ".ffn_gate_inp." in t.name
        assert t.tensor_type == (Q.F32 if f32 else Q.Q8_0), t.name
