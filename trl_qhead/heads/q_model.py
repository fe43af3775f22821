"""The Q-model head (`q_head_type="q_model"`): a separate causal LM, sharing the policy's tokenizer, whose
vocabulary-sized output is Q, so that a small model can guide a large one (weak-to-strong, as GenARM does).

`Q(s, .) = W^Q (U h^Q) + b` (tied output, default: `W^Q` the Q model's own LM-head rows, detached; U starts at zero,
so the untrained tilt is zero) or `W h^Q + b` (dense), `h^Q` the Q model's final hidden state over the same tokens
(`heads.context`). The Q model is a submodule of the head: its trunk trains with the output (fully, or only its LoRA
adapters when it is a PEFT model), and only the Q loss reaches it. The policy is frozen when the head is bound
(`requires_grad_(False)`): it stays exactly the base model.

The two must share one tokenizer: the Q model reads the policy's token ids and its output rows are the policy's
tokens. `check_same_vocabulary` compares the vocabulary sizes and special ids of the two configs, and the two
tokenizers' vocabularies when both are given: a `ValueError` before any work otherwise.

Saved inside `q_head.safetensors` (the output head and every Q-model tensor, fp32) with the Q model's config (and its
PEFT config) in `q_head_config.json`, from which loading rebuilds it (`QModelHead.from_config`).

Cost: one forward of the Q model per training batch, one cached forward of one token per generated token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import is_peft_model, unwrap_peft
from .context import ContextQHead

# Config fields that must agree between the policy and the Q model: the same token ids mean the same tokens.
_SPECIAL_IDS = ("eos_token_id", "bos_token_id", "pad_token_id")


def _text_config(model: nn.Module):
    config = unwrap_peft(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def output_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError(f"The Q model {type(model).__name__} has no LM head (output embeddings) to read.")
    return int(getattr(head, "out_features", head.weight.shape[0]))


def check_same_vocabulary(policy: nn.Module, q_model: nn.Module, tokenizer=None, q_tokenizer=None) -> None:
    """`ValueError` unless the Q model can read the policy's token ids and score its tokens: the same number of
    output rows (and input embeddings), the same special ids in both configs, and, when both tokenizers are given, the
    same vocabulary (token -> id)."""
    vocab = output_rows(policy)
    q_vocab = output_rows(q_model)
    if q_vocab != vocab:
        raise ValueError(
            f"The Q model's LM head has {q_vocab} rows but the policy's has {vocab}: q_head_type='q_model' needs a Q "
            "model with the policy's tokenizer and vocabulary (its output row i scores the policy's token i)."
        )
    embeddings = q_model.get_input_embeddings()
    if embeddings is not None and getattr(embeddings, "num_embeddings", vocab) < vocab:
        raise ValueError(
            f"The Q model embeds {embeddings.num_embeddings} token ids but the policy has {vocab}: it cannot read the "
            "policy's tokens."
        )
    policy_config, q_config = _text_config(policy), _text_config(q_model)
    for name in _SPECIAL_IDS:
        a, b = getattr(policy_config, name, None), getattr(q_config, name, None)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"The policy's `{name}` is {a} but the Q model's is {b}: q_head_type='q_model' needs a Q model with the "
                "policy's tokenizer."
            )
    if (tokenizer is None) != (q_tokenizer is None):
        raise ValueError(
            "Pass both `tokenizer` (the policy's) and `q_tokenizer` (the Q model's) to compare, or neither."
        )
    if tokenizer is not None and tokenizer.get_vocab() != q_tokenizer.get_vocab():
        ours, theirs = tokenizer.get_vocab(), q_tokenizer.get_vocab()
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(
            f"The Q model's tokenizer differs from the policy's ({len(theirs)} vs {len(ours)} tokens; e.g. {differ}): "
            "q_head_type='q_model' needs the same tokenizer."
        )


def rebuild_q_model(config: dict) -> nn.Module:
    """The Q model of a saved `q_head_config.json` (`q_model_config`, and `q_model_peft_config` for a PEFT one),
    built from its config with fresh weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    saved = dict(config.get("q_model_config") or {})
    if not saved.get("model_type"):
        raise ValueError("The q_head_config.json of a q_head_type='q_model' head has no `q_model_config`.")
    q_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(saved.pop("model_type"), **saved))
    if config.get("q_model_peft_config"):
        from peft import get_peft_config, get_peft_model

        q_model = get_peft_model(q_model, get_peft_config(dict(config["q_model_peft_config"])))
    return q_model


class QModelHead(ContextQHead):
    """Q from a separate causal LM over the same tokens (see the module docstring).

    Args:
        q_model: the Q model, a transformers causal LM (or a PEFT model: then only its adapters train).
        vocab_size: `|V|`, the policy's.
        output: `"tied"` (default, `W^Q (U h^Q) + b`) or `"dense"` (`W h^Q + b`).
        rank: the tied output's rank (`None`: a full `H_Q x H_Q` U).
        device: where the output head's parameters live (default: the Q model's device).

    Call `bind(policy)` before use (`build` does): it freezes the policy and reads `generate`'s attention mask from it.
    """

    q_head_type = "q_model"
    formula = (
        "`Q(s, a) = W^Q (U h^Q_s) + b` or `W h^Q_s + b` (a Q-model head, `q_head_type=q_model`: `h^Q` the final "
        "hidden state of a separate causal LM with the policy's tokenizer, `W^Q` its LM-head rows)"
    )
    shape_source = "Q model (vocabulary or hidden size)"

    def __init__(
        self, q_model: nn.Module, vocab_size: int, *, output: str = "tied", rank: int | None = None, device=None
    ):
        if not isinstance(q_model, nn.Module) or not hasattr(q_model, "get_output_embeddings"):
            raise TypeError(f"`q_model` must be a transformers causal LM, got {type(q_model).__name__}.")
        hidden_size = int(_text_config(q_model).hidden_size)
        device = device if device is not None else next(q_model.parameters()).device
        super().__init__(hidden_size, vocab_size, output=output, rank=rank, device=device)
        self.q_model = q_model

    @classmethod
    def build(
        cls,
        backbone,
        *,
        hidden_size=None,
        vocab_size=None,
        device=None,
        rank=None,
        q_model: nn.Module | None = None,
        output: str = "tied",
        tokenizer=None,
        q_tokenizer=None,
    ) -> QModelHead:
        """A fresh head on `q_model` for the policy `backbone` (the vocabularies checked first)."""
        if q_model is None:
            raise ValueError(
                "q_head_type='q_model' needs the Q model: pass `q_model=` (a causal LM with the policy's tokenizer, "
                "e.g. a smaller model of the same family), in `q_head_options` for `from_pretrained`."
            )
        check_same_vocabulary(backbone, q_model, tokenizer, q_tokenizer)
        head = cls(q_model, output_rows(backbone), output=output, rank=rank, device=device)
        head.bind(backbone)
        return head

    def q_network(self) -> nn.Module:
        return self.q_model

    def bind(self, backbone: nn.Module) -> None:
        if is_peft_model(backbone):
            raise ValueError(
                "q_head_type='q_model' leaves the policy the base model, but it has PEFT adapters: merge them first "
                "(`merge_and_unload()`), or, for a Q network on the policy's own trunk, use q_head_type='adapter'."
            )
        check_same_vocabulary(backbone, self.q_model)
        backbone.requires_grad_(False)  # the policy stays the base model: nothing in it trains
        super().bind(backbone)

    # ---- saved with the checkpoint ----------------------------------------------------------------------------------

    def to_config(self) -> dict:
        config = super().to_config()
        base = unwrap_peft(self.q_model)
        config["q_model_config"] = base.config.to_dict()
        if is_peft_model(self.q_model):
            peft_config = self.q_model.peft_config[self.q_model.active_adapter]
            # JSON has no sets (PEFT keeps `target_modules` as one)
            saved = peft_config.to_dict()
            config["q_model_peft_config"] = {k: sorted(v) if isinstance(v, set) else v for k, v in saved.items()}
        return config

    def saved_fingerprint(self) -> dict:
        return {}  # the Q model's LM head, which a tied output reads, is saved with the head

    def check_fingerprint(self, config: dict, where: str) -> None:
        pass

    @classmethod
    def options_from_config(cls, config: dict) -> dict:
        """The Q model rebuilt from the saved config (random weights: the saved tensors are loaded next)."""
        return {**super().options_from_config(config), "q_model": rebuild_q_model(config)}

    def saved_tensors(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The state dict (or `state`) with each shared tensor once (a Q model's tied embeddings: the first name)."""
        state = self.state_dict() if state is None else state
        seen, tensors = set(), {}
        for name, tensor in state.items():
            key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            tensors[name] = tensor
        return tensors

    def load_saved_tensors(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        skipped = set(self.state_dict()) - set(self.saved_tensors())  # the second names of shared tensors
        if unexpected or set(missing) - skipped:
            raise ValueError(f"The saved Q-model head does not match: missing {missing}, unexpected {unexpected}.")
