"""`MoeJaxLM`: EleutherAI's lm-evaluation-harness evaluates any moe_jax model (name `moe_jax`).

Every convention that decides a score is the HF backend's (`lm_eval.models.huggingface.HFLM`,
lm-eval 0.4.13), so a moe_jax model and its Hugging Face export score the same per request:
the tokenizer is the checkpoint's own (transformers' AutoTokenizer, so its post-processor adds a
BOS where it does), contexts and continuations are split by `TemplateLM._encode_pair` (trailing
context whitespace moves to the continuation), an empty context is the prefix token (BOS, else
EOS), too-long inputs lose tokens on the left, rolling loglikelihoods use lm-eval's disjoint
windows, and `generate_until` decodes greedily, cuts at EOS and at the first stop string.

What differs is speed: requests are sorted and padded to power-of-two buckets (`batching`), so an
evaluation compiles a few programs; log-probabilities are gathered on the device, so only (B, T)
numbers come back; generation uses the KV-cached `model.generate`. Pruning plans and trimming
policies apply as masks on the unpruned weights, so one compilation serves every plan.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from moe_jax import hf, model, multihost, sharding
from moe_jax.config import ModelConfig
from moe_jax.harness import batching
from moe_jax.pruning.plan import PruningPlan
from moe_jax.pruning.plan import masks as plan_masks
from moe_jax.trimming.policy import TrimmingPolicy


class HarnessError(ValueError):
    """A request, model or argument the adapter cannot evaluate; the message names it."""


# Multi-process runs: process 0 drives lm-eval (which must see world size 1) and announces each
# device call with a header [op, rows, width, max_new_tokens, temperature in millionths]; the other
# processes run the same call on the same arrays (`MoeJaxLM.follow`), as SPMD needs.
_STOP, _SCORE, _GENERATE = 0, 1, 2
_HEADER_LEN = 5


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def _token_scores(cfg, params, tokens_BT, targets_BT, valid_BT, masks, impl):
    """(log p(target) per position, target == argmax per position), both (B, T)."""
    logits_BTV = model.forward(cfg, params, tokens_BT, masks, attention_mask=valid_BT, impl=impl)
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logp_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


def generation_eos_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """The end-of-generation ids a checkpoint declares (generation_config.json, else config.json)."""
    for name in ("generation_config.json", "config.json"):
        file = Path(path) / name
        if file.is_file():
            eos = json.loads(file.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    return ()


@register_model("moe_jax")
class MoeJaxLM(TemplateLM):
    """lm-eval model over (cfg, params) of any moe_jax model: unpruned with masks, compacted,
    non-uniform or trimmed. `tokenizer` is a transformers tokenizer (the checkpoint's own)."""

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Any], tokenizer, *, masks: dict | None = None,
                 batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, impl: str = "auto",
                 mesh: str | Mesh | None = None, stop_token_ids: Sequence[int] = ()):
        super().__init__()
        if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "decode") or not callable(tokenizer):
            raise HarnessError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if len(tokenizer) > cfg.vocab_size:
            raise HarnessError(f"the tokenizer has {len(tokenizer)} ids but the model's vocabulary has "
                               f"{cfg.vocab_size}: ids past {cfg.vocab_size - 1} would index outside the "
                               "embedding (pass the model's own tokenizer)")
        if int(batch_size) < 1 or int(max_gen_toks) < 1:
            raise HarnessError(f"batch_size={batch_size} and max_gen_toks={max_gen_toks} must be >= 1")
        self.cfg, self.params, self.masks, self.impl = cfg, params, masks, impl
        self.tokenizer = configure_pad_token(tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise HarnessError("the tokenizer has no EOS token; lm-eval needs one (end of text, stop string)")
        self._batch_size = int(batch_size)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)
        # A generation ends at the tokenizer's EOS and at the checkpoint's own end ids (its
        # generation_config.json), as transformers' `generate` does for lm-eval's HF backend.
        self.stop_token_ids = {self.tokenizer.eos_token_id, *map(int, stop_token_ids)}
        self._max_length = int(max_length) if max_length else resolve_max_length(
            SimpleNamespace(max_position_embeddings=cfg.max_position_embeddings), self.tokenizer)
        self.mesh, self._generators = None, {}
        self.multi_process = jax.process_count() > 1
        if self.multi_process and not mesh:
            raise HarnessError(f"{jax.process_count()} processes need a mesh over their devices (mesh=...)")
        if mesh:  # rows over the batch axes, weights by the partition rules, as the launchers do
            self.mesh = mesh if isinstance(mesh, Mesh) else sharding.make_mesh(mesh)
            sharding.check_mesh_fits(cfg, self.mesh)
            self.params = sharding.shard_params(params, self.mesh)
            self.masks = jax.device_put(masks, sharding.replicated(self.mesh))

    # -------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: str = "float32", tokenizer: str | None = None,
                        plan: str | os.PathLike | None = None, trimming: str | os.PathLike | None = None,
                        **kwargs) -> MoeJaxLM:
        """A Hugging Face checkpoint (or a moe_jax export of any shape) with its own tokenizer.

        plan: a PruningPlan JSON, simulated with masks on these (unpruned) weights.
        trimming: a TrimmingPolicy JSON; its routers must be these (frozen-router rule)."""
        cfg, params = hf.load_pretrained(path, dtype=dtype)
        tok = cls.load_tokenizer(tokenizer or path, add_bos_token=kwargs.get("add_bos_token"))
        masks = plan_masks(cfg, PruningPlan.load(plan)) if plan else None
        if trimming:
            masks = TrimmingPolicy.load(trimming).masks(cfg, params, base=masks)
        return cls(cfg, params, tok, masks=masks, stop_token_ids=generation_eos_ids(path), **kwargs)

    @staticmethod
    def load_tokenizer(path: str | os.PathLike, add_bos_token: bool | None = None):
        """The tokenizer of a checkpoint directory, loaded as lm-eval's HF backend loads it."""
        kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
        try:
            return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as err:
            raise HarnessError(f"{path}: no tokenizer transformers can load ({err}); pass "
                               "tokenizer=<directory with tokenizer.json>") from None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MoeJaxLM:
        """`lm_eval --model moe_jax --model_args pretrained=DIR,plan=PLAN.json,...`."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        extra.pop("device", None)  # JAX places the model on its own devices
        extra.pop("max_batch_size", None)
        if str(extra.get("batch_size", "")).startswith("auto"):
            extra.pop("batch_size")  # fixed batches keep the compiled programs few
        if "pretrained" not in args:
            raise HarnessError(f"model_args {arg_string!r}: pretrained=<checkpoint directory> is required")
        return cls.from_pretrained(args.pop("pretrained"), **{**args, **extra})

    # -------------------------------------------------------------- lm-eval's properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    # -------------------------------------------------------------- tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _batch_encode(self, strings: Sequence[str]) -> list[list[int]]:
        """As HFLM.tok_batch_encode: the first string decides whether special tokens are added."""
        if has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        return [self.tokenizer.encode(s, **special) for s in strings]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------- scoring
    def _score_batch(self, batch: batching.ScoreBatch) -> tuple[np.ndarray, np.ndarray]:
        return self._device_call(_SCORE, (batch.tokens_BT, batch.targets_BT, batch.valid_BT))

    # -------------------------------------------------------------- device calls (and followers)
    def _device_call(self, op: int, arrays: tuple[np.ndarray, ...], max_new_tokens: int = 0,
                     temperature: float = 0.0):
        if self.multi_process:  # process 0 announces the call; the followers receive the same arrays
            rows, width = arrays[0].shape
            multihost_utils.broadcast_one_to_all(
                np.array([op, rows, width, max_new_tokens, round(temperature * 1e6)], np.int64))
            arrays = multihost_utils.broadcast_one_to_all(tuple(np.asarray(a, np.int32) for a in arrays))
        return self._run(op, arrays, max_new_tokens, temperature)

    def _run(self, op: int, arrays, max_new_tokens: int, temperature: float):
        if op == _SCORE:
            tokens_BT, targets_BT, valid_BT = (np.asarray(a, np.int32) for a in arrays)
            args = (tokens_BT, targets_BT, valid_BT.astype(bool))
            if self.mesh is None:
                return jax.device_get(_token_scores(self.cfg, self.params, *args, self.masks, self.impl))
            with jax.set_mesh(self.mesh):
                args = jax.device_put(args, sharding.batch_sharding(self.mesh, self.batch_size))
                return multihost.device_get(_token_scores(self.cfg, self.params, *args, self.masks, self.impl))
        tokens_BT, valid_BT = np.asarray(arrays[0], np.int32), np.asarray(arrays[1], bool)
        pad = self.tokenizer.pad_token_id
        if self.mesh is None:
            return np.asarray(model.generate(self.cfg, self.params, tokens_BT, max_new_tokens, temperature=temperature,
                                             attention_mask=valid_BT, eos_id=self.eot_token_id, pad_id=pad,
                                             masks=self.masks, impl=self.impl))
        key = (max_new_tokens, temperature)
        if key not in self._generators:
            self._generators[key] = sharding.sharded_generate(self.cfg, self.mesh, self.params, self.batch_size,
                                                              max_new_tokens, impl=self.impl, temperature=temperature)
        out = self._generators[key](self.params, tokens_BT, valid_BT, eos_id=self.eot_token_id, pad_id=pad,
                                    masks=self.masks)
        return np.asarray(multihost.device_get(out))

    def follow(self) -> None:
        """On every process but 0: run each device call process 0 announces, until it stops them."""
        while True:
            header = multihost_utils.broadcast_one_to_all(np.zeros(_HEADER_LEN, np.int64))
            op, rows, width, max_new_tokens, temperature = (int(v) for v in np.asarray(header))
            if op == _STOP:
                return
            count = 3 if op == _SCORE else 2
            arrays = multihost_utils.broadcast_one_to_all(tuple(np.zeros((rows, width), np.int32)
                                                                for _ in range(count)))
            self._run(op, arrays, max_new_tokens, temperature / 1e6)

    def release_followers(self) -> None:
        """Process 0, when done (or failing): let the followers' `follow` return."""
        if self.multi_process:
            multihost_utils.broadcast_one_to_all(np.array([_STOP, 0, 0, 0, 0], np.int64))


    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, every continuation token is the argmax) per request."""
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise HarnessError(f"request {i} ({requests[i][0]!r}) has an empty context or continuation "
                                   "after tokenization")
            if len(cont) > self.max_length:
                raise HarnessError(f"request {i}: its continuation has {len(cont)} tokens, more than "
                                   f"max_length={self.max_length}")
        order = batching.longest_first([len(c) + len(t) for c, t in pairs], [tuple(c + t) for c, t in pairs])
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for chunk in batching.chunks(order, self.batch_size):
            batch = batching.score_rows([pairs[i] for i in chunk], self.max_length, self.batch_size)
            logp_BT, greedy_BT = self._score_batch(batch)
            for b, i in enumerate(chunk):
                scored = batch.score_BT[b]
                results[i] = (float(logp_BT[b][scored].astype(np.float64).sum()), bool(greedy_BT[b][scored].all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text over lm-eval's disjoint windows of max_length tokens."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            pieces = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                        prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(lm_utils.make_disjoint_window, pieces):
                windows.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[r] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampling when a task asks for it), cut at EOS and the first stop string."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            if not isinstance(gen_kwargs, dict):
                raise HarnessError(f"request {i}: generation kwargs must be a dict, got {gen_kwargs!r}")
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        results: list[str | None] = [None] * len(args)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(args[members[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len < 1:
                raise HarnessError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt within "
                                   f"max_length={self.max_length}")
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            contexts = [args[i][0] for i in members]
            lengths = [len(self.tok_encode(c)) for c in contexts]
            order = batching.longest_first(lengths, contexts)
            for chunk in batching.chunks(order, self.batch_size):
                prompts = [ids[-max_ctx_len:] for ids in self._batch_encode([contexts[j] for j in chunk])]
                tokens_BT, valid_BT = batching.prompt_rows(prompts, self.max_length, self.batch_size,
                                                           pad_id=self.tokenizer.pad_token_id)
                out_BT = self._device_call(_GENERATE, (tokens_BT, valid_BT), max_gen_toks, temperature)
                for b, j in enumerate(chunk):
                    ids = list(out_BT[b])
                    ends = [n for n, t in enumerate(ids) if t in self.stop_token_ids]
                    ids = ids[:ends[0] + 1] if ends else ids  # the end token is kept, as HF's output keeps it
                    text = postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None)
                    results[members[j]] = text
                    self.cache_hook.add_partial("generate_until", args[members[j]], text)
        return results
