"""Reading PEFT LoRA folders: the fused layout, PEFT's scaling, and every refusal naming its cause."""

import json
import math
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_lora import make_lora_adapter
from tiny_model import make_tiny_model

from parley.adapters.lora import SUPPORTED_MODULES, AdapterError, load_lora
from parley.config import ModelConfig
from parley.types import ValidationError

PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny")), arch="llama", seed=0)


@pytest.fixture(scope="module")
def model_config(model_dir):
    return ModelConfig.from_hf(json.loads((pathlib.Path(model_dir) / "config.json").read_text()))


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    return make_lora_adapter(model_dir, tmp_path_factory.mktemp("a") / "a", r=4, alpha=8)


def load(path, config, max_rank=64):
    return load_lora("a", str(path), config, max_rank=max_rank, dtype=torch.float32)


def test_each_module_stacked_over_layers_with_scale_folded_into_b(adapter_dir, model_config):
    weights = load(adapter_dir, model_config)
    raw = load_file(f"{adapter_dir}/adapter_model.safetensors")
    c = model_config
    assert weights.rank == 4 and set(weights.modules) == set(SUPPORTED_MODULES)
    k = weights.modules["k_proj"]
    assert k.a.shape == (c.num_layers, 4, c.hidden_size) and k.b.shape == (c.num_layers, c.num_kv_heads * c.head_dim, 4)
    assert torch.equal(k.a[1], raw[f"{PREFIX}.1.self_attn.k_proj.lora_A.weight"])
    torch.testing.assert_close(k.b[1], raw[f"{PREFIX}.1.self_attn.k_proj.lora_B.weight"] * 2.0)  # alpha / r = 8 / 4


def test_rslora_scales_by_alpha_over_sqrt_rank(model_dir, model_config, tmp_path):
    path = make_lora_adapter(model_dir, tmp_path / "rs", r=16, alpha=8, targets=("o_proj",), use_rslora=True)
    weights = load(path, model_config)
    raw_b = load_file(f"{path}/adapter_model.safetensors")[f"{PREFIX}.0.self_attn.o_proj.lora_B.weight"]
    assert set(weights.modules) == {"o_proj"}
    torch.testing.assert_close(weights.modules["o_proj"].b[0], raw_b * (8 / math.sqrt(16)))


def test_rank_and_alpha_patterns_set_each_modules_rank_and_scale(model_dir, model_config, tmp_path):
    path = make_lora_adapter(model_dir, tmp_path / "p", r=4, alpha=8, targets=("q_proj", "v_proj"),
                             rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6})
    weights = load(path, model_config)
    raw = load_file(f"{path}/adapter_model.safetensors")
    q, v = weights.modules["q_proj"], weights.modules["v_proj"]
    assert q.a.shape[1] == 4 and v.a.shape[1] == 2 and weights.rank == 4
    torch.testing.assert_close(q.b[0], raw[f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"] * 2.0)
    torch.testing.assert_close(v.b[0], raw[f"{PREFIX}.0.self_attn.v_proj.lora_B.weight"] * 3.0)


def copy_adapter(adapter_dir, tmp_path, name="copy") -> pathlib.Path:
    target = tmp_path / name
    shutil.copytree(adapter_dir, target)
    return target


def edit_config(path: pathlib.Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_refusals_name_their_cause(adapter_dir, model_config, tmp_path):
    def refused(path, match, **kw):
        with pytest.raises(AdapterError, match=match) as info:
            load(path, model_config, **kw)
        assert isinstance(info.value, ValidationError) and info.value.field == "lora_path"

    refused(tmp_path / "missing", "is not a folder")
    no_config = copy_adapter(adapter_dir, tmp_path, "no_config")
    (no_config / "adapter_config.json").unlink()
    refused(no_config, "has no adapter_config.json")

    pickle_only = copy_adapter(adapter_dir, tmp_path, "pickle_only")
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    refused(pickle_only, "only adapter_model.bin, a pickle")
    no_weights = copy_adapter(adapter_dir, tmp_path, "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    refused(no_weights, "has no adapter_model.safetensors")

    refused(adapter_dir, "rank 4 .* exceeds the maximum LoRA rank 2", max_rank=2)

    dora = copy_adapter(adapter_dir, tmp_path, "dora")
    edit_config(dora, use_dora=True)
    refused(dora, "DoRA")
    prefix = copy_adapter(adapter_dir, tmp_path, "prefix")
    edit_config(prefix, peft_type="PREFIX_TUNING")
    refused(prefix, "PREFIX_TUNING")


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_embedding_and_lm_head_targets_are_refused_by_name(model_dir, model_config, tmp_path, module):
    path = make_lora_adapter(model_dir, tmp_path / module, targets=("q_proj", module))
    with pytest.raises(AdapterError, match=f"unsupported target module.*{module}"):
        load(path, model_config)
    edit_config(pathlib.Path(path), target_modules=["q_proj"])  # the tensors alone give it away too
    with pytest.raises(AdapterError, match=f"unsupported target module '{module}'"):
        load(path, model_config)


def test_an_adapter_for_another_base_model_does_not_fit(model_config, tmp_path):
    other = make_tiny_model(str(tmp_path / "other"), hidden_size=32, intermediate_size=64)
    path = make_lora_adapter(other, tmp_path / "other_adapter")
    with pytest.raises(AdapterError, match=r"does not fit the base model: layer 0 .*\(4, 64\)"):
        load(path, model_config)


def test_a_lone_lora_a_is_refused(adapter_dir, model_config, tmp_path):
    path = copy_adapter(adapter_dir, tmp_path, "lone")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    del tensors[f"{PREFIX}.0.mlp.down_proj.lora_B.weight"]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="layer 0 down_proj has lora_A but not its pair"):
        load(path, model_config)


def test_a_different_base_model_name_only_warns(adapter_dir, model_config, tmp_path, caplog):
    path = copy_adapter(adapter_dir, tmp_path, "renamed")
    edit_config(path, base_model_name_or_path="some-org/some-model")
    weights = load_lora("a", str(path), model_config, max_rank=64, dtype=torch.float32, served_model="served")
    assert weights.base_model == "some-org/some-model"
    assert "trained on 'some-org/some-model'" in caplog.text
