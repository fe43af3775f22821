"""`AutoModelForCausalLMWithQHead`: any causal LM plus a vocabulary-sized Q head.

The Q head is a `trl_qhead.heads.QHead` chosen by `q_head_type` (the registry in `heads/__init__.py`): by default
the dense `q_t = W_q h_t + b_q`, one value per vocabulary token, read from the backbone's final hidden state (the same
`h_t` the LM head reads), kept in fp32 and starting at zero so that an untrained head tilts nothing; `"tied"` shares
the LM head's rows, `q_t = W_lm (U h_t) + b` (`heads/tied.py`). Every read of Q goes through the head's interface.
On disk a checkpoint is the backbone's own folder (a full model, or only the LoRA adapters of a PEFT model) plus
`q_head.safetensors` and `q_head_config.json` beside it (`persistence.py`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput, logging
from trl.trainer.utils import selective_log_softmax

from .backbone import causal_lm_forward, is_peft_model, plain_lm_head, unwrap_peft
from .chunked_lm_head import action_logprobs_and_values
from .compat import output_cache
from .heads import (
    DEFAULT_Q_HEAD_TYPE,
    Q_HEAD_INITS,
    QContext,
    QHead,
    build_q_head,
    check_q_head_init,
    check_q_head_type,
    q_head_class,
)
from .hub import HUB_KWARGS, PUSH_KWARGS, qhead_model_card, resolve_file, upload_folder
from .persistence import (
    Q_HEAD_CONFIG_NAME,
    Q_HEAD_WEIGHTS_NAME,
    check_model_source,
    read_backbone_tensors,
    read_q_head_config,
    read_q_head_tensors,
    resolve_q_head,
    save_q_head_folder,
)
from .q_values import state_values
from .quantization import disable_cpu_inference_repacking, is_kbit_model, prepare_quantization_config

logger = logging.get_logger(__name__)

__all__ = [
    "AutoModelForCausalLMWithQHead",
    "CausalLMWithQHeadOutput",
    "Q_HEAD_CONFIG_NAME",
    "Q_HEAD_INITS",
    "Q_HEAD_WEIGHTS_NAME",
    "add_adapters",
    "transformers_model",
]


@dataclass
class CausalLMWithQHeadOutput(ModelOutput):
    """Output of [`AutoModelForCausalLMWithQHead.forward`].

    Args:
        logits: `[B, T, |V|]` LM logits `z_t`.
        hidden_states: `[B, T, H]` final hidden states `h_t` (what both heads read).
        q_values: `[B, T, |V|]` full Q values, only when `return_q=True`.
        action_q: `[B, T]` `Q(s_t, a_t)` for the `actions` passed in, only when asked.
        action_logprobs: `[B, T]` `log pi(a_t|s_t)` (with grad) where `logprob_mask` is set, zero elsewhere, only when
            asked.
        state_values: `[B, T]` `V(s_t)` (no grad) where `value_mask` is set, zero elsewhere, only when asked.
        q_features: `[B, T, F]` the Q head's features of `hidden_states` (`QHead.features`, with grad), when any Q
            was read: pass them to the head's `gather` / `soft_value` to read more without recomputing them.
        cache: the backbone's KV cache, when it returns one (named `past_key_values` before transformers 5.24;
            the newer releases still answer to that name).
    """

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    q_values: torch.Tensor | None = None
    action_q: torch.Tensor | None = None
    action_logprobs: torch.Tensor | None = None
    state_values: torch.Tensor | None = None
    q_features: torch.Tensor | None = None
    cache: object | None = None


def transformers_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under a Q-head wrapper and PEFT: the one `generate` runs."""
    if isinstance(model, AutoModelForCausalLMWithQHead):
        model = model.pretrained_model
    return unwrap_peft(model)


class AutoModelForCausalLMWithQHead(nn.Module):
    """A causal LM with a second, vocabulary-sized Q head on its final hidden state.

    Args:
        pretrained_model: the backbone, any `AutoModelForCausalLM` (optionally wrapped by PEFT).
        q_head_init: `"zeros"` (default: the untrained tilt changes nothing), `"normal"` (std
            `config.initializer_range`, else 0.02) or `"lm_head"` (a copy of the LM head, so `Q` starts as the logits;
            for the tied head U = I).
        q_head_type: `"dense"` (default: `W_q`, |V| x H, fp32) or `"tied"` (`Q = W_lm (U h) + b`: U is H x H, or
            rank `q_head_rank`, about |V|/H times fewer parameters; `W_lm` is read from the LM head and never trained
            through the Q loss), or any type registered in `trl_qhead.heads.Q_HEADS`. See docs/heads.md.
        q_head_rank: for `"tied"` only: `U = A B` with A `H x r`, B `r x H`; `None` (default) for a full `H x H` U.

    Example:
    ```python
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from trl_qhead import AutoModelForCausalLMWithQHead
    >>> model = AutoModelForCausalLMWithQHead(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2)))
    >>> out = model(torch.tensor([[1, 2, 3]]), return_q=True)
    >>> out.q_values.shape
    torch.Size([1, 3, 50257])
    ```
    """

    main_input_name = "input_ids"

    def __init__(
        self,
        pretrained_model: PreTrainedModel,
        q_head_init: str = "zeros",
        *,
        q_head_type: str = DEFAULT_Q_HEAD_TYPE,
        q_head_rank: int | None = None,
        q_head_options: dict | None = None,
    ):
        super().__init__()
        if not isinstance(pretrained_model, nn.Module) or not hasattr(pretrained_model, "get_output_embeddings"):
            raise TypeError(
                f"`pretrained_model` must be a transformers causal LM, got {type(pretrained_model).__name__}."
            )
        check_q_head_init(q_head_init)
        check_q_head_type(q_head_type)
        self.pretrained_model = pretrained_model
        lm_head = pretrained_model.get_output_embeddings()
        if lm_head is None or getattr(lm_head, "weight", None) is None:
            raise TypeError(f"{type(pretrained_model).__name__} has no output embeddings (LM head) to read.")
        # `out_features` first: a quantised head's packed weight does not have the `[|V|, H]` shape; under DeepSpeed
        # ZeRO-3 (`zero.Init`) a loaded weight is a partition and `ds_shape` is its real shape.
        weight_shape = getattr(lm_head.weight, "ds_shape", lm_head.weight.shape)
        vocab_size, hidden_size = getattr(lm_head, "out_features", weight_shape[0]), self._hidden_size()
        self.q_head: QHead = build_q_head(
            q_head_type,
            pretrained_model,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            device=lm_head.weight.device,
            rank=q_head_rank,
            **(q_head_options or {}),
        )
        self.q_head_init = q_head_init
        self.reset_q_head(q_head_init)
        if is_kbit_model(pretrained_model):
            disable_cpu_inference_repacking(pretrained_model)  # train -> generate -> train on CPU (quantization.py)

    # ---- shape and identity ---------------------------------------------------------------------------------------

    def _hidden_size(self) -> int:
        config = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return int(config.hidden_size)

    @property
    def config(self):
        return self.pretrained_model.config

    @property
    def vocab_size(self) -> int:
        return self.q_head.out_features

    @property
    def device(self) -> torch.device:
        """Where the Q head's parameters live."""
        return next(self.q_head.parameters()).device

    @property
    def q_head_type(self) -> str:
        """The head's registry key (`"dense"`, `"tied"`, ...)."""
        return self.q_head.q_head_type

    @property
    def q_head_rank(self) -> int | None:
        """The rank of a tied head's U (`None`: full rank, or a head without a rank)."""
        return self.q_head.to_config().get("q_head_rank")

    @property
    def is_peft_model(self) -> bool:
        return is_peft_model(self.pretrained_model)

    @property
    def base_model(self) -> PreTrainedModel:
        """The plain transformers model under any PEFT wrapping."""
        return unwrap_peft(self.pretrained_model)

    # transformers' Trainer reads these to leave a bitsandbytes model where it was loaded (no `.to(device)`).
    @property
    def is_loaded_in_4bit(self) -> bool:
        return bool(getattr(self.base_model, "is_loaded_in_4bit", False))

    @property
    def is_loaded_in_8bit(self) -> bool:
        return bool(getattr(self.base_model, "is_loaded_in_8bit", False))

    @property
    def quantization_method(self):
        return getattr(self.base_model, "quantization_method", None)

    @property
    def _no_split_modules(self) -> list[str] | None:
        # The transformer blocks FSDP's TRANSFORMER_BASED_WRAP shards one by one (read by accelerate).
        return getattr(self.base_model, "_no_split_modules", None)

    def reset_q_head(self, q_head_init: str = "zeros") -> None:
        """(Re)initialise the Q head in place. See the class docstring for the options."""
        check_q_head_init(q_head_init)
        std = getattr(self.config, "initializer_range", 0.02)
        self.q_head.reset_parameters(q_head_init, std=std, backbone=self.pretrained_model)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, *args, **kwargs) -> nn.Module:
        """The backbone's `resize_token_embeddings`, then the Q head to the new vocabulary (new tokens get Q = 0: zero
        rows and bias). Resizing the backbone alone leaves the Q head at the old size (a tied head then refuses to read
        the LM head, naming this method)."""
        embeddings = self.pretrained_model.resize_token_embeddings(new_num_tokens, *args, **kwargs)
        vocab_size = int(getattr(self.get_output_embeddings(), "out_features", embeddings.weight.shape[0]))
        self.q_head.resize_vocab(vocab_size)
        self.q_head.bind(self.pretrained_model)
        return embeddings

    # ---- forward ----------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        return_q: bool = False,
        actions: torch.LongTensor | None = None,
        value_mask: torch.Tensor | None = None,
        value_chunk_size: int = 256,
        logprob_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMWithQHeadOutput:
        """Run the backbone once and read the Q head off its final hidden state.

        Args:
            input_ids, attention_mask: as for the backbone; other keyword arguments are passed to it.
            return_q: also return the full `[B, T, |V|]` Q values (inspection, decoding; costs a second LM head).
            actions: `[B, T]` token ids; returns `action_q[b, t] = Q(s_t, actions[b, t])` (the head's `gather`:
                O(T*H), no `|V|`-sized product).
            value_mask: `[B, T]`; returns `state_values`, `V(s_t) = sum_a pi(a|s_t) Q(s_t, a)` without grad at the
                marked positions only, in chunks of `value_chunk_size` positions.
            logprob_mask: `[B, T]` bool, with `actions`: returns `action_logprobs`, `log pi(a_t|s_t)` with grad at the
                marked positions, and no logits (`logits` is `None`): the LM head runs over `value_chunk_size`
                positions at a time and again in the backward, so no `[B, T, |V|]` logits, log-softmax or logits
                gradient is held (the training path). `state_values` then reuse the same softmax. Models whose LM
                head is not a plain linear map (softcapping, logit scaling, quantised or adapted heads), or that do
                not take `logits_to_keep`, compute the same values from their full logits.
            value_chunk_size: positions per chunk wherever a product over the vocabulary is taken.
        """
        kwargs.pop("num_items_in_batch", None)  # transformers' Trainer passes it to models that take **kwargs
        if logprob_mask is not None and actions is None:
            raise ValueError("`logprob_mask` needs `actions`: the log-probs are those of the actions.")
        lm_head = plain_lm_head(self.pretrained_model) if logprob_mask is not None and not return_q else None
        hidden, outputs = causal_lm_forward(
            self.pretrained_model, input_ids, attention_mask, full_logits=lm_head is None, **kwargs
        )
        logits = outputs.logits
        full_logits = logits is not None and logits.shape[-2] == hidden.shape[-2]
        result = CausalLMWithQHeadOutput(
            logits=logits if full_logits else None,
            hidden_states=hidden,
            cache=output_cache(outputs),
        )
        features = None
        if return_q or actions is not None or value_mask is not None:
            context = QContext(input_ids, attention_mask, kwargs.get("position_ids"))
            features = result.q_features = self.q_head.features(hidden, context)  # (B, T, F)
        if return_q:
            result.q_values = self.q_head.q_from_features(features)
        if actions is not None:
            result.action_q = self.q_head.gather(features, actions.unsqueeze(-1))[..., 0]
        if logprob_mask is not None and not full_logits:
            result.action_logprobs, result.state_values = action_logprobs_and_values(
                hidden,
                lm_head,
                actions,
                logprob_mask,
                q_head=self.q_head,
                value_mask=value_mask,
                chunk_size=value_chunk_size,
                q_features=features,
            )
            return result
        if logprob_mask is not None:
            logprobs = selective_log_softmax(logits.float(), actions)
            result.action_logprobs = torch.where(logprob_mask.bool(), logprobs, 0.0)
        if value_mask is not None:
            result.state_values = state_values(
                hidden, logits, self.q_head, value_mask, value_chunk_size, features=features.detach()
            )
        return result

    def compute_q(self, hidden_states: torch.Tensor, context: QContext | None = None) -> torch.Tensor:
        """Full Q values (dense `W_q h + b_q`, tied `W_lm (U h) + b`), fp32, for hidden states of any leading
        shape: the head's `full_q`."""
        return self.q_head.full_q(hidden_states, context)

    def generate(self, *args, **kwargs):
        """The backbone's `generate`; pass a `QTiltLogitsProcessor` to sample from the Q-tilted policy."""
        return self.pretrained_model.generate(*args, **kwargs)

    # ---- Trainer plumbing: delegate to the backbone -------------------------------------------------------------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """What transformers >= 5.2's `Trainer` calls for `gradient_checkpointing=True` (`every_n_layers`, `offload`
        and the like in `kwargs` go to the backbone)."""
        backbone = self.pretrained_model
        if hasattr(backbone, "activation_checkpointing_enable"):
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        else:  # older transformers
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)
        if self.is_peft_model:  # PEFT's frozen embeddings need inputs that require grad for checkpointing to work
            backbone.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        backbone = self.pretrained_model
        if hasattr(backbone, "activation_checkpointing_disable"):
            backbone.activation_checkpointing_disable()
        else:
            backbone.gradient_checkpointing_disable()

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules())

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def get_input_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.pretrained_model.get_output_embeddings()

    def merge_and_unload(self, **kwargs) -> AutoModelForCausalLMWithQHead:
        """Merge the LoRA adapters into the base weights and return a plain (non-PEFT) model with the same Q head.

        Like PEFT's `merge_and_unload`, the merge happens in place in the base model, so this wrapper should not be
        used afterwards; the returned model shares its Q head module (no copy). `save_pretrained` on the result writes
        a full model plus `q_head.safetensors`, which any `from_pretrained` reloads without PEFT.

        Args:
            kwargs: passed to `PeftModel.merge_and_unload` (`safe_merge`, `adapter_names`, `progressbar`).
        """
        if not self.is_peft_model:
            raise ValueError("`merge_and_unload` needs a PEFT model; this model has no adapters to merge.")
        self.q_head.check_merge()
        merged = self.pretrained_model.merge_and_unload(**kwargs)
        model = type(self)(merged, q_head_type=self.q_head_type, q_head_rank=self.q_head_rank)
        model.q_head, model.q_head_init = self.q_head, self.q_head_init
        model.q_head.bind(merged)  # a head reading the LM head (tied) now reads the merged one
        return model

    # ---- save / load ------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """Save the backbone with its own `save_pretrained` (adapters only for PEFT) and the Q head beside it.

        The Q head goes to `q_head.safetensors` (fp32, its state dict) with its shape, init, `to_config()` (type and
        options) and `saved_fingerprint()` in `q_head_config.json`. A tied head saves only U (or A and B) and its
        bias, never the LM head it reads (a few MB instead of `|V| x H`), plus a SHA-256 of that LM head's weight so
        that loading it onto another LM head fails clearly.

        The save is atomic: a kill at any moment leaves the previous checkpoint or the new one, or a folder that refuses
        to load with a clear error, never a partial one that loads. Everything is first written (and fsync'ed) to a
        temporary sibling folder `.<name>.tmp-*` (the same file system, ignored by `from_pretrained` and by the
        `checkpoint-N` pattern of transformers). Then:

        - when `save_directory` does not exist or is empty, that folder is renamed into place in one step;
        - otherwise (a previous save, or a folder holding other things) `q_head_config.json` is the commit marker:
          the old one is deleted first, `q_head.safetensors` is moved in next, then the backbone's files (each with an
          atomic `os.replace`), the files the previous save listed and this one did not write are removed, and the new
          `q_head_config.json` is moved in last. `from_pretrained` refuses a folder with `q_head.safetensors` and no
          `q_head_config.json`, so while the files are replaced the folder does not load.

        `q_head_config.json` lists the files of the save (`files`) and the sizes of its tensor files (`file_sizes`);
        loading checks they are all there, whole. The files are written by `trl_qhead.persistence`.

        Args:
            save_directory: the folder to write.
            is_main_process: only the main process writes (the others return at once).
            kwargs: passed to the backbone's `save_pretrained`. A `state_dict` of this whole model (keys
                `pretrained_model.*` and `q_head.*`, as `Trainer` gathers it under FSDP `FULL_STATE_DICT` or DeepSpeed)
                is split between the backbone and the Q head; without one, the modules' own tensors are saved.
        """
        state_dict = kwargs.pop("state_dict", None)
        # Uploading is done here, after the Q head is written (the backbone's own push would upload before it, and
        # PEFT's `save_pretrained` takes no `push_to_hub`).
        push_to_hub = kwargs.pop("push_to_hub", False)
        push_kwargs = {k: kwargs.pop(k) for k in PUSH_KWARGS if k in kwargs}
        if not is_main_process:
            return
        if self.is_peft_model and not getattr(self.base_model.config, "_name_or_path", None):
            logger.warning_once(
                "The PEFT model's base has no name or path (built from a config): its adapter_config.json gets no "
                "`base_model_name_or_path`, so `from_pretrained` cannot load the saved folder on its own (it raises "
                "naming the file). `load_checkpoint` (resuming training) is not affected."
            )
        q_tensors = self.q_head.saved_tensors()
        if state_dict is not None:
            backbone_prefix, q_prefix = "pretrained_model.", "q_head."
            kwargs["state_dict"] = {
                k[len(backbone_prefix) :]: v for k, v in state_dict.items() if k.startswith(backbone_prefix)
            }
            gathered = {k[len(q_prefix) :]: v for k, v in state_dict.items() if k.startswith(q_prefix)}
            q_tensors = self.q_head.saved_tensors(gathered) if gathered else q_tensors
        q_config = {
            "hidden_size": self.q_head.in_features,
            "vocab_size": self.q_head.out_features,
            "q_head_init": self.q_head_init,
            **self.q_head.to_config(),
            "peft": self.is_peft_model,
            **self.q_head.saved_fingerprint(),
        }
        save_q_head_folder(
            save_directory,
            lambda folder: self.pretrained_model.save_pretrained(folder, is_main_process=is_main_process, **kwargs),
            q_tensors,
            q_config,
        )
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            self._write_model_card(save_directory, repo_id)
            upload_folder(save_directory, repo_id, **push_kwargs)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None, **kwargs):
        """Save this model (backbone or LoRA adapters, `q_head.safetensors`, `q_head_config.json`, a model card) to a
        temporary folder and upload it to the Hub repo `repo_id` (created if needed) in one commit.

        Args:
            repo_id: `user/name` of the model repo.
            commit_message, private: as for `huggingface_hub.HfApi.upload_folder` / `create_repo`.
            kwargs: `token`, `revision`, `create_pr`, `commit_description` go to the upload; the rest to
                `save_pretrained` (e.g. `max_shard_size`).
        Returns:
            The `huggingface_hub.CommitInfo` of the upload.
        """
        push_kwargs = {k: kwargs.pop(k) for k in PUSH_KWARGS if k in kwargs}
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, **kwargs)
            self._write_model_card(folder, repo_id)
            return upload_folder(folder, repo_id, commit_message=commit_message, private=private, **push_kwargs)

    def _write_model_card(self, folder: str | os.PathLike, repo_id: str) -> None:
        """A TRL model card with the Q-head sections, unless the folder already has one (e.g. the trainer's)."""
        path = os.path.join(folder, "README.md")
        if os.path.isfile(path) and "trl-qhead" in open(path, encoding="utf-8").read():
            return
        with open(os.path.join(folder, Q_HEAD_CONFIG_NAME)) as f:
            q_head = {k: v for k, v in json.load(f).items() if k != "files"}
        base = getattr(self.base_model.config, "_name_or_path", None) or None
        card = qhead_model_card(
            base_model=base if base and not os.path.isdir(base) else None,
            model_name=repo_id.split("/")[-1],
            hub_model_id=repo_id,
            q_head=q_head,
            peft=self.is_peft_model,
        )
        card.save(path)

    def load_q_head(self, directory: str | os.PathLike) -> None:
        """Load `q_head.safetensors` from `directory` into this model's Q head.

        Raises `FileNotFoundError` when the file (or `q_head_config.json`, written last by `save_pretrained`) is
        missing, and `ValueError` naming the file when it is damaged: truncated (its recorded size), not a readable
        safetensors file, other tensors than this head's state dict (`weight` and `bias`; tied: `u` or `u_left` and
        `u_right`, and `bias`), another dtype than float32, another shape than this model's head, or non-finite
        values. The head's type and rank (from `q_head_config.json`) must match this model's, and the head's
        fingerprint must match (a tied head: the whole LM head weight it was saved with, up to a dtype change; folders
        saved before the hash are checked on their 8-row probe): `ValueError`.
        """
        config = read_q_head_config(directory)
        if not config:
            raise FileNotFoundError(
                f"No {Q_HEAD_WEIGHTS_NAME} or {Q_HEAD_CONFIG_NAME} in {directory}: it holds no Q head to load."
            )
        saved_type, saved_rank = config.get("q_head_type", DEFAULT_Q_HEAD_TYPE), config.get("q_head_rank")
        if (saved_type, saved_rank) != (self.q_head_type, self.q_head_rank):
            raise ValueError(
                f"The Q head in {directory} is q_head_type={saved_type!r}, q_head_rank={saved_rank!r}; this model's is "
                f"q_head_type={self.q_head_type!r}, q_head_rank={self.q_head_rank!r}."
            )
        config_path = os.path.join(directory, Q_HEAD_CONFIG_NAME)
        saved_shape = (config["vocab_size"], config["hidden_size"])
        this_shape = (self.q_head.out_features, self.q_head.in_features)
        what = self.q_head.shape_source
        if saved_shape != this_shape:
            raise ValueError(
                f"{config_path} describes a Q head of shape {saved_shape} (vocab_size, hidden_size), this model needs "
                f"{this_shape}: was it saved from a model with another {what}?"
            )
        state = self._read_q_head_file(directory, str(self.device), what)
        self.q_head.check_fingerprint(config, config_path)
        self.q_head.load_saved_tensors(state)

    def _read_q_head_file(self, directory, device: str, what: str | None = None) -> dict:
        what = what or self.q_head.shape_source
        expected = {name: tuple(t.shape) for name, t in self.q_head.saved_tensors().items()}
        return read_q_head_tensors(directory, expected, device, what)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Load a folder written by `save_pretrained` into this model in place (adapters or full weights, Q head).

        Used to resume training: the model keeps its identity, so the optimizer's references stay valid. The folder is
        checked first (see `from_pretrained`): one without its Q head, or with half of one, raises before anything
        is loaded.
        """
        if not read_q_head_config(directory):
            raise FileNotFoundError(
                f"No {Q_HEAD_WEIGHTS_NAME} or {Q_HEAD_CONFIG_NAME} in {directory}: it is not a checkpoint of this model."
            )
        if self.is_peft_model:
            from peft import set_peft_model_state_dict
            from peft.utils import load_peft_weights

            set_peft_model_state_dict(
                self.pretrained_model, load_peft_weights(str(directory), device=str(self.device))
            )
        else:
            from transformers.trainer_utils import load_sharded_checkpoint

            single = os.path.join(directory, "model.safetensors")
            if os.path.isfile(single):
                tensors = read_backbone_tensors(directory)
                missing, unexpected = self.pretrained_model.load_state_dict(tensors, strict=False)
                tied = set(getattr(self.pretrained_model, "_tied_weights_keys", None) or [])
                if unexpected or set(missing) - tied:
                    raise ValueError(f"{single} does not match the model: missing {missing}, unexpected {unexpected}.")
            else:
                load_sharded_checkpoint(self.pretrained_model, str(directory), strict=False)
        self.load_q_head(directory)

    def checkpoint_state_dict(self, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The full (unsharded) tensors of a folder written by `save_pretrained`, keyed as this model's own
        `state_dict` (`pretrained_model.*` and `q_head.*`), on the CPU.

        What resuming under FSDP loads with `torch.distributed.checkpoint.state_dict.set_model_state_dict`
        (`full_state_dict=True`), which cuts each rank's shard out of the full tensors: a sharded model cannot take
        them through `load_checkpoint`. For a PEFT backbone the adapters' saved names (adapter name removed) are mapped
        back to this model's; a tensor this model has no place for raises `ValueError`.
        """
        directory = str(directory)
        backbone = self.pretrained_model
        if self.is_peft_model:
            from peft.utils import load_peft_weights

            adapter = getattr(backbone, "active_adapter", "default")
            # PEFT saves a parameter under its own name with ".<adapter name>" removed (get_peft_model_state_dict).
            own = {name.replace(f".{adapter}", ""): name for name in backbone.state_dict() if f".{adapter}" in name}
            saved = load_peft_weights(directory, device="cpu")
            unknown = sorted(set(saved) - set(own))
            if unknown:
                raise ValueError(f"The adapters in {directory} do not match the model: unexpected {unknown[:5]}.")
            tensors = {own[name]: tensor for name, tensor in saved.items()}
        else:
            tensors = read_backbone_tensors(directory)
        state = {f"pretrained_model.{name}": tensor for name, tensor in tensors.items()}
        path = os.path.join(directory, Q_HEAD_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {Q_HEAD_WEIGHTS_NAME} in {directory}.")
        # Checked as `load_q_head` checks it: a damaged file is an error naming it, not safetensors' own message.
        state.update({f"q_head.{name}": tensor for name, tensor in self._read_q_head_file(directory, "cpu").items()})
        return state

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | PreTrainedModel,
        *model_args,
        peft_config=None,
        q_head_init: str = "zeros",
        q_head_type: str | None = None,
        q_head_rank: int | None = None,
        q_head_options: dict | None = None,
        is_trainable: bool = True,
        **kwargs,
    ) -> AutoModelForCausalLMWithQHead:
        """Build from a model name, a local folder, or an already loaded causal LM.

        A folder written by `save_pretrained` comes back bit-exactly: the backbone (or the base model named by its
        LoRA adapter config, plus the adapters) and the Q head. Any other name or path loads with
        `AutoModelForCausalLM.from_pretrained(name, **kwargs)` and gets a fresh Q head.

        A Hub repo id is fetched with `huggingface_hub.hf_hub_download` (`revision`, `token`, `cache_dir`, `subfolder`,
        `local_files_only` and `HF_HUB_OFFLINE` honoured): its adapters or full model, `q_head.safetensors`,
        `q_head_config.json` and every file that config lists, with the same checks as a folder (half a Q head, or a
        listed file missing, raises `FileNotFoundError`); a repo with neither Q-head file gets a fresh head.

        A local folder gets a fresh Q head only when it has neither `q_head.safetensors` nor `q_head_config.json`. With
        one and not the other (a save interrupted before the Q head or its config was written), or with a file that
        `q_head_config.json` lists missing, it raises `FileNotFoundError` naming the folder and the file; a damaged
        Q-head file raises `ValueError` naming it (see `load_q_head`). Nothing is loaded before these checks.

        Args:
            pretrained_model_name_or_path: a hub name, a local folder or a `PreTrainedModel` / `PeftModel`.
            peft_config: a `peft.PeftConfig`; when given, the backbone is wrapped with `get_peft_model`.
            q_head_init: init of a fresh Q head (ignored when one is loaded).
            q_head_type: `"dense"` (the default for a fresh head) or `"tied"`; a saved folder's own type is used when
                this is `None`, and must equal it otherwise.
            q_head_rank: the tied head's rank (`None`: full rank); a saved folder's own rank is used when this and
                `q_head_type` are `None`.
            is_trainable: for a saved PEFT folder, load its adapters trainable (default) or frozen.
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`, `device_map`), except names that
                are ours misspelt: transformers turns any unknown keyword into a config attribute without a word, so a
                keyword that starts with `q_head` or is close to one of this method's parameter names (`difflib`,
                e.g. `q_head_typ`, `peft_confg`) raises a `TypeError` instead. With an already loaded model there is
                nothing to load, so any keyword raises a `TypeError`. A bitsandbytes
                `quantization_config` (4 or 8 bits) needs the `quant` extra; the LM head is kept unquantised (added to
                `llm_int8_skip_modules` when that list is given), the Q head is never quantised, and with a
                `peft_config` the backbone goes through `peft.prepare_model_for_kbit_training` first (QLoRA).
        """
        path = pretrained_model_name_or_path
        _reject_our_misspelt_kwargs(kwargs)
        if q_head_type is not None:
            check_q_head_type(q_head_type)
        # Checked before anything loads: a folder (or Hub repo) with half a Q head is an interrupted save, not a plain
        # model; its saved type and rank are the defaults.
        if isinstance(path, (str, os.PathLike)):
            check_model_source(path)  # a missing folder is named as such, not sent to the Hub as a repo id
        q_folder, q_config = resolve_q_head(path, kwargs) if isinstance(path, (str, os.PathLike)) else (None, None)
        if q_config:
            saved_type, saved_rank = q_config.get("q_head_type", DEFAULT_Q_HEAD_TYPE), q_config.get("q_head_rank")
            if q_head_type is None and q_head_rank is None:
                q_head_type, q_head_rank = saved_type, saved_rank
            elif (q_head_type or DEFAULT_Q_HEAD_TYPE, q_head_rank) != (saved_type, saved_rank):
                raise ValueError(
                    f"{path} holds a q_head_type={saved_type!r}, q_head_rank={saved_rank!r} Q head; got "
                    f"q_head_type={q_head_type!r}, q_head_rank={q_head_rank!r}. Leave them unset to load it."
                )
        q_head_type = q_head_type or DEFAULT_Q_HEAD_TYPE
        if isinstance(path, nn.Module):
            if kwargs or model_args:
                raise TypeError(
                    f"`from_pretrained` got an already loaded model and loading arguments {sorted(kwargs)}"
                    f"{' and positional ones' if model_args else ''}: they would be ignored; load the model with them "
                    "first."
                )
            backbone = path
        elif isinstance(path, (str, os.PathLike)) and not os.path.isdir(path):
            # A Hub repo id: the adapters come with `hf_hub_download` (revision, token, cache_dir, offline).
            backbone = _hub_backbone(str(path), *model_args, is_trainable=is_trainable, **kwargs)
        elif isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM, PeftConfig

            _check_adapter_base(os.path.join(path, "adapter_config.json"))
            if kwargs.get("quantization_config") is not None:
                base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
                kwargs["quantization_config"] = _quantization_config(kwargs, base_name)

            backbone = AutoPeftModelForCausalLM.from_pretrained(path, *model_args, is_trainable=is_trainable, **kwargs)
        elif isinstance(path, (str, os.PathLike)):
            if kwargs.get("quantization_config") is not None:
                kwargs["quantization_config"] = _quantization_config(kwargs, path)
            backbone = AutoModelForCausalLM.from_pretrained(path, *model_args, **kwargs)
        else:
            raise TypeError(
                f"`pretrained_model_name_or_path` must be a name, a path or a causal LM, got {type(path).__name__}."
            )
        if peft_config is not None:
            backbone = add_adapters(backbone, peft_config)
        options = dict(q_head_options or {})
        if q_config:  # the saved head's own options (a context head's output, its Q model rebuilt from its config)
            options = {**q_head_class(q_head_type).options_from_config(q_config), **options}
        model = cls(
            backbone, q_head_init=q_head_init, q_head_type=q_head_type, q_head_rank=q_head_rank, q_head_options=options
        )
        if q_config:
            model.load_q_head(q_folder)
            model.q_head_init = q_config.get("q_head_init", q_head_init)
        return model


def _hub_backbone(repo_id: str, *model_args, is_trainable: bool, **kwargs) -> nn.Module:
    """The backbone of a Hub repo id: its adapters (on the base model their config names) or its full model."""
    adapter_config = resolve_file(repo_id, "adapter_config.json", kwargs)
    if adapter_config is not None:
        from peft import AutoPeftModelForCausalLM, PeftConfig

        _check_adapter_base(adapter_config, where=repo_id)
        if kwargs.get("quantization_config") is not None:
            peft_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
            base_name = PeftConfig.from_pretrained(repo_id, **peft_kwargs).base_model_name_or_path
            kwargs["quantization_config"] = _quantization_config(kwargs, base_name)
        return AutoPeftModelForCausalLM.from_pretrained(repo_id, *model_args, is_trainable=is_trainable, **kwargs)
    if kwargs.get("quantization_config") is not None:
        kwargs["quantization_config"] = _quantization_config(kwargs, repo_id)
    return AutoModelForCausalLM.from_pretrained(repo_id, *model_args, **kwargs)


_OUR_KWARGS = ("peft_config", "q_head_init", "q_head_type", "q_head_rank", "q_head_options", "is_trainable")


def _reject_our_misspelt_kwargs(kwargs: dict) -> None:
    """transformers makes any unknown keyword a config attribute, silently: catch the ones meant for us instead."""
    import difflib

    for name in kwargs:
        close = difflib.get_close_matches(name, _OUR_KWARGS, n=1, cutoff=0.8)
        if name.startswith("q_head") or close:
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise TypeError(
                f"AutoModelForCausalLMWithQHead.from_pretrained() got an unexpected keyword argument {name!r}.{hint} "
                f"Its own keywords are {', '.join(_OUR_KWARGS)}; the others go to the backbone."
            )


def _check_adapter_base(config_file: str, where: str | None = None) -> None:
    """A saved PEFT folder loads its base model from `base_model_name_or_path` in `adapter_config.json`: without one
    (adapters added to a model built from a config), or naming a local folder that is gone, PEFT fails with an
    unrelated download or file error. A `ValueError` naming the file and the field instead."""
    try:
        with open(config_file) as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{config_file} is not a readable adapter config ({error}).") from error
    shown = f"{config_file} (in {where})" if where else config_file
    how = (
        "Load the base model yourself, then `AutoModelForCausalLMWithQHead(PeftModel.from_pretrained(base, folder))` "
        "and `.load_q_head(folder)`, or set `base_model_name_or_path` in the file."
    )
    if not base:
        raise ValueError(
            f"{shown} has no `base_model_name_or_path`: the adapters were saved from a base model that has no name or "
            f"path (built from a config), so there is nothing to load them onto. {how}"
        )
    if os.path.isabs(base) and not os.path.isdir(base):
        raise ValueError(f"{shown} names the base model folder {base}, which does not exist. {how}")


def add_adapters(backbone: PreTrainedModel, peft_config) -> nn.Module:
    """Wrap a transformers causal LM with PEFT adapters (`get_peft_model`), preparing a 4/8-bit one for QLoRA first."""
    if is_peft_model(backbone):
        raise ValueError("`peft_config` was given but the model already has PEFT adapters.")
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_kbit_model(backbone):
        # As TRL does for QLoRA: freeze, upcast the non-quantised fp16/bf16 weights to fp32. Gradient checkpointing
        # stays the trainer's choice (`gradient_checkpointing_enable` above handles PEFT).
        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
    return get_peft_model(backbone, peft_config)


def _quantization_config(kwargs: dict, model_name_or_path) -> object:
    config_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code", "token") if k in kwargs}
    return prepare_quantization_config(kwargs["quantization_config"], model_name_or_path, **config_kwargs)
