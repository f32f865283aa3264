"""FSDP auto-wrap: derived from each family's ``_no_split_modules`` (policy object only, no GPU)."""

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from transformers import AutoConfig, AutoModelForCausalLM

from src.core.errors import UserError
from src.models.fsdp_policy import NoSplitModulesPolicy
from tests.conftest import REPO
from tests.families import FAMILIES

DECODER_LAYER = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
    "gpt_neox": "GPTNeoXLayer",
    "falcon": "FalconDecoderLayer",
    "gpt2": "GPT2Block",
    "gemma": "GemmaDecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
}


class Root(torch.nn.Module):
    """What FSDP wraps: the LightningModule's tree (a backbone beside projectors)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = torch.nn.Linear(4, 4)


def tiny(family: str, layers: int = 2) -> torch.nn.Module:
    overrides = {"n_layer" if family == "gpt2" else "num_hidden_layers": layers}
    config = AutoConfig.for_model(family, **{**FAMILIES[family], **overrides}, vocab_size=64)
    config.pad_token_id = 0
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", list(DECODER_LAYER))
def test_policy_wraps_each_decoder_layer_of_every_family(family):
    root = Root(tiny(family))
    policy = NoSplitModulesPolicy()
    assert policy(root, True, 0)  # FSDP asks about the root first: the classes are read there
    assert DECODER_LAYER[family] in policy.names
    wrapped = [type(m).__name__ for m in root.modules() if policy(m, False, 0)]
    assert wrapped == [DECODER_LAYER[family]] * 2


def test_root_without_transformers_model_is_refused():
    with pytest.raises(UserError, match="_no_split_modules"):
        NoSplitModulesPolicy()(torch.nn.Linear(2, 2), True, 0)
    policy = NoSplitModulesPolicy(extra=["Linear"])
    assert policy(torch.nn.Linear(2, 2), True, 0) and policy.names == {"Linear"}


def test_fsdp_config_names_the_policy_not_a_family():
    text = (REPO / "conf/trainer/fsdp.yaml").read_text()
    strategy = yaml.safe_load(text)["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    config = parser.parse_args(["--strategy", yaml.safe_dump(strategy)])
    built = parser.instantiate(config).strategy
    assert isinstance(built.kwargs["auto_wrap_policy"], NoSplitModulesPolicy)
    assert "DecoderLayer]" not in text and "modeling_llama" not in text
