"""Models of moe_jax's non-uniform exports (remote code: imports only torch and transformers).

A pruned MoE model may keep a different number of experts per layer and a different width per
expert. These classes are the stock transformers model of the family (attention, decoder layers,
router, shared experts: the stock code, so routing is the stock routing) with one change: each
MoE layer's routed experts are a ModuleList of per-expert MLPs at their own widths, built from
`config.moe_jax` ("expert_widths", per layer). Keys are the per-expert checkpoint keys, e.g.
`model.layers.{i}.mlp.experts.{e}.gate_proj.weight` (Mixtral: `block_sparse_moe.experts.{e}.w1`),
so no weight conversion is needed; transformers applies none to remote-code classes.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as deepseek_v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek_v3
from transformers.models.mixtral import modeling_mixtral as mixtral
from transformers.models.olmoe import modeling_olmoe as olmoe
from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2_moe
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

from .configuration_moe_jax import (
    MoeJaxDeepseekV2Config,
    MoeJaxDeepseekV3Config,
    MoeJaxMixtralConfig,
    MoeJaxOlmoeConfig,
    MoeJaxQwen2MoeConfig,
    MoeJaxQwen3MoeConfig,
)

_GUD = ("gate_proj", "up_proj", "down_proj")
# family: (stock MoE block class, config field of its expert count, expert projection names)
_BLOCKS = {
    "qwen2_moe": (qwen2_moe.Qwen2MoeSparseMoeBlock, "num_experts", _GUD),
    "mixtral": (mixtral.MixtralSparseMoeBlock, "num_local_experts", ("w1", "w3", "w2")),
    "qwen3_moe": (qwen3_moe.Qwen3MoeSparseMoeBlock, "num_experts", _GUD),
    "olmoe": (olmoe.OlmoeSparseMoeBlock, "num_experts", _GUD),
    "deepseek_v2": (deepseek_v2.DeepseekV2Moe, "n_routed_experts", _GUD),
    "deepseek_v3": (deepseek_v3.DeepseekV3MoE, "n_routed_experts", _GUD),
}


class MoeJaxExpertMLP(nn.Module):
    """One routed expert, a SwiGLU MLP of its own width; projection names follow the family."""

    def __init__(self, hidden_size, width, names, act):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden_size, width, bias=False))
        setattr(self, up, nn.Linear(hidden_size, width, bias=False))
        setattr(self, down, nn.Linear(width, hidden_size, bias=False))
        self.act_fn = ACT2FN[act]

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class MoeJaxExperts(nn.ModuleList):
    """A layer's routed experts, called as the stock fused experts are: (tokens, top-k ids, weights)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            y = expert(hidden_states[token_idx]) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


class MoeJaxMixtralDecoderLayer(mixtral.MixtralDecoderLayer):
    """Mixtral's decoder layer with its MoE block under the checkpoint's name, `block_sparse_moe`."""

    @property
    def mlp(self):
        return self.block_sparse_moe


class MoeJaxDeepseekV3TopkRouter(deepseek_v3.DeepseekV3TopkRouter):
    """DeepSeek-V3's router, also for pruned layers it cannot score: groups of one expert (a group
    then scores by its one expert; stock sums a top two) and kept groups holding fewer than top_k
    experts (the missing choices route with weight 0; stock would pick excluded experts).
    Otherwise it computes exactly what the stock router does."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias
        size = self.num_experts // self.num_group
        grouped = scores_for_choice.view(-1, self.num_group, size)
        group_scores = grouped.topk(min(2, size), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.num_group, size).reshape(-1, self.num_experts)
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        chosen, topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)
        topk_weights = scores.gather(1, topk_indices).masked_fill(torch.isneginf(chosen), 0.0)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, topk_weights * self.routed_scaling_factor, topk_indices


def _shared_width(config):
    """DeepSeek's shared-expert width: moe_jax's own record, else n_shared_experts x moe_intermediate_size."""
    custom = config.moe_jax or {}
    if custom.get("shared_expert_width") is not None:
        return int(custom["shared_expert_width"])
    return int(config.n_shared_experts or 0) * int(config.moe_intermediate_size)


def _use_pruned_experts(layers, config, family):
    """Rebuild each MoE layer's block: the stock block for its own expert count, per-expert MLPs."""
    block_cls, count_field, names = _BLOCKS[family]
    widths = (config.moe_jax or {}).get("expert_widths")
    if widths is None or len(widths) != len(layers):
        raise ValueError(f"config.moe_jax.expert_widths must list {len(layers)} layers' expert widths, "
                         f"got {widths!r}")
    for layer, layer_widths in zip(layers, widths):
        if not layer_widths:  # a dense layer
            continue
        layer_cfg = copy.copy(config)
        setattr(layer_cfg, count_field, len(layer_widths))
        if family.startswith("deepseek"):
            layer_cfg.moe_intermediate_size, layer_cfg.n_shared_experts = _shared_width(config), 1
        block = block_cls(layer_cfg)
        if family == "deepseek_v3":
            block.gate = MoeJaxDeepseekV3TopkRouter(layer_cfg)
        block.experts = MoeJaxExperts(
            MoeJaxExpertMLP(config.hidden_size, int(w), names, config.hidden_act) for w in layer_widths)
        del layer.mlp
        if family == "mixtral":
            layer.__class__ = MoeJaxMixtralDecoderLayer
            layer.block_sparse_moe = block
        else:
            layer.mlp = block


def _model_classes(family, stock_model, stock_causal_lm, config_cls):
    """(Model, ForCausalLM) of one family: the stock classes with per-layer pruned experts."""

    def model_init(self, config):
        stock_model.__init__(self, config)
        _use_pruned_experts(self.layers, config, family)

    def causal_lm_init(self, config):
        stock_causal_lm.__init__(self, config)
        _use_pruned_experts(self.model.layers, config, family)

    prefix = config_cls.__name__.removesuffix("Config")
    doc = f"{stock_model.__name__} with per-layer expert counts and per-expert widths (moe_jax export)."
    model = type(f"{prefix}Model", (stock_model,),
                 {"config_class": config_cls, "__init__": model_init, "__doc__": doc, "__module__": __name__})
    causal_lm = type(f"{prefix}ForCausalLM", (stock_causal_lm,),
                     {"config_class": config_cls, "__init__": causal_lm_init, "__doc__": doc, "__module__": __name__})
    return model, causal_lm


MoeJaxQwen2MoeModel, MoeJaxQwen2MoeForCausalLM = _model_classes(
    "qwen2_moe", qwen2_moe.Qwen2MoeModel, qwen2_moe.Qwen2MoeForCausalLM, MoeJaxQwen2MoeConfig)
MoeJaxMixtralModel, MoeJaxMixtralForCausalLM = _model_classes(
    "mixtral", mixtral.MixtralModel, mixtral.MixtralForCausalLM, MoeJaxMixtralConfig)
MoeJaxQwen3MoeModel, MoeJaxQwen3MoeForCausalLM = _model_classes(
    "qwen3_moe", qwen3_moe.Qwen3MoeModel, qwen3_moe.Qwen3MoeForCausalLM, MoeJaxQwen3MoeConfig)
MoeJaxOlmoeModel, MoeJaxOlmoeForCausalLM = _model_classes(
    "olmoe", olmoe.OlmoeModel, olmoe.OlmoeForCausalLM, MoeJaxOlmoeConfig)
MoeJaxDeepseekV2Model, MoeJaxDeepseekV2ForCausalLM = _model_classes(
    "deepseek_v2", deepseek_v2.DeepseekV2Model, deepseek_v2.DeepseekV2ForCausalLM, MoeJaxDeepseekV2Config)
MoeJaxDeepseekV3Model, MoeJaxDeepseekV3ForCausalLM = _model_classes(
    "deepseek_v3", deepseek_v3.DeepseekV3Model, deepseek_v3.DeepseekV3ForCausalLM, MoeJaxDeepseekV3Config)
