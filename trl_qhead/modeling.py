"""`AutoModelForCausalLMWithQHead`: any causal LM plus a vocabulary-sized Q head.

The Q head is `q_t = W_q h_t + b_q`, one value per vocabulary token, read from the backbone's final hidden state
(the same `h_t` the LM head reads). It is kept in fp32 and, by default, starts at zero so that an untrained head tilts
nothing. On disk a checkpoint is the backbone's own folder (a full model, or only the LoRA adapters of a PEFT model)
plus `q_head.safetensors` and `q_head_config.json` beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput
from trl.trainer.utils import selective_log_softmax

from .backbone import causal_lm_forward, is_peft_model, plain_lm_head, unwrap_peft
from .chunked_lm_head import action_logprobs_and_values
from .compat import output_cache
from .hub import HUB_KWARGS, PUSH_KWARGS, qhead_model_card, resolve_file, upload_folder
from .q_values import gather_action_q, state_values
from .quantization import disable_cpu_inference_repacking, is_kbit_model, prepare_quantization_config

Q_HEAD_WEIGHTS_NAME = "q_head.safetensors"
Q_HEAD_CONFIG_NAME = "q_head_config.json"
Q_HEAD_INITS = ("zeros", "normal", "lm_head")


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
        cache: the backbone's KV cache, when it returns one (named `past_key_values` before transformers 5.24;
            the newer releases still answer to that name).
    """

    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    q_values: torch.Tensor | None = None
    action_q: torch.Tensor | None = None
    action_logprobs: torch.Tensor | None = None
    state_values: torch.Tensor | None = None
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
            `config.initializer_range`, else 0.02) or `"lm_head"` (a copy of the LM head, so `Q` starts as the logits).

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

    def __init__(self, pretrained_model: PreTrainedModel, q_head_init: str = "zeros"):
        super().__init__()
        if not isinstance(pretrained_model, nn.Module) or not hasattr(pretrained_model, "get_output_embeddings"):
            raise TypeError(
                f"`pretrained_model` must be a transformers causal LM, got {type(pretrained_model).__name__}."
            )
        if q_head_init not in Q_HEAD_INITS:
            raise ValueError(f"`q_head_init` must be one of {Q_HEAD_INITS}, got {q_head_init!r}.")
        self.pretrained_model = pretrained_model
        lm_head = pretrained_model.get_output_embeddings()
        if lm_head is None or getattr(lm_head, "weight", None) is None:
            raise TypeError(f"{type(pretrained_model).__name__} has no output embeddings (LM head) to read.")
        vocab_size, hidden_size = lm_head.weight.shape[0], self._hidden_size()
        self.q_head = nn.Linear(hidden_size, vocab_size, bias=True, dtype=torch.float32, device=lm_head.weight.device)
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
        return self.q_head.weight.device

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
        with torch.no_grad():
            if q_head_init == "zeros":
                self.q_head.weight.zero_()
            elif q_head_init == "normal":
                self.q_head.weight.normal_(0.0, getattr(self.config, "initializer_range", 0.02))
            elif q_head_init == "lm_head":
                self.q_head.weight.copy_(self.pretrained_model.get_output_embeddings().weight.float())
            else:
                raise ValueError(f"`q_head_init` must be one of {Q_HEAD_INITS}, got {q_head_init!r}.")
            self.q_head.bias.zero_()

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
            actions: `[B, T]` token ids; returns `action_q[b, t] = Q(s_t, actions[b, t])` by gathering rows of
                `W_q` (O(T*H), no `|V|`-sized product).
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
        if return_q:
            result.q_values = self.q_head(hidden.to(self.q_head.weight.dtype))
        if actions is not None:
            result.action_q = gather_action_q(hidden, self.q_head, actions)
        if logprob_mask is not None and not full_logits:
            result.action_logprobs, result.state_values = action_logprobs_and_values(
                hidden,
                lm_head,
                actions,
                logprob_mask,
                q_head=self.q_head,
                value_mask=value_mask,
                chunk_size=value_chunk_size,
            )
            return result
        if logprob_mask is not None:
            logprobs = selective_log_softmax(logits.float(), actions)
            result.action_logprobs = torch.where(logprob_mask.bool(), logprobs, 0.0)
        if value_mask is not None:
            result.state_values = state_values(hidden, logits, self.q_head, value_mask, value_chunk_size)
        return result

    def compute_q(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Full Q values `W_q h + b_q` (fp32) for hidden states of any leading shape."""
        return self.q_head(hidden_states.to(self.q_head.weight.dtype))

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
        merged = self.pretrained_model.merge_and_unload(**kwargs)
        model = type(self)(merged)
        model.q_head, model.q_head_init = self.q_head, self.q_head_init
        return model

    # ---- save / load ------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **kwargs) -> None:
        """Save the backbone with its own `save_pretrained` (adapters only for PEFT) and the Q head beside it.

        The Q head goes to `q_head.safetensors` (fp32) with its shape and init in `q_head_config.json`.

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
        q_tensors = dict(self.q_head.named_parameters())
        if state_dict is not None:
            backbone_prefix, q_prefix = "pretrained_model.", "q_head."
            kwargs["state_dict"] = {
                k[len(backbone_prefix) :]: v for k, v in state_dict.items() if k.startswith(backbone_prefix)
            }
            q_tensors = {k[len(q_prefix) :]: v for k, v in state_dict.items() if k.startswith(q_prefix)} or q_tensors
        os.makedirs(save_directory, exist_ok=True)
        self.pretrained_model.save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in q_tensors.items()}
        save_file(tensors, os.path.join(save_directory, Q_HEAD_WEIGHTS_NAME), metadata={"format": "pt"})
        q_config = {
            "hidden_size": self.q_head.in_features,
            "vocab_size": self.q_head.out_features,
            "q_head_init": self.q_head_init,
            "peft": self.is_peft_model,
        }
        with open(os.path.join(save_directory, Q_HEAD_CONFIG_NAME), "w") as f:
            json.dump(q_config, f, indent=2)
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
        import tempfile

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
            q_head = json.load(f)
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
        """Load `q_head.safetensors` from `directory` into this model's Q head (shapes must match)."""
        path = os.path.join(directory, Q_HEAD_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {Q_HEAD_WEIGHTS_NAME} in {directory}.")
        state = load_file(path, device=str(self.device))
        expected = tuple(self.q_head.weight.shape)
        if tuple(state["weight"].shape) != expected:
            raise ValueError(
                f"The Q head in {directory} has shape {tuple(state['weight'].shape)}, this model needs {expected}: "
                "was it saved from a model with another vocabulary or hidden size?"
            )
        self.q_head.load_state_dict(state)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Load a folder written by `save_pretrained` into this model in place (adapters or full weights, Q head).

        Used to resume training: the model keeps its identity, so the optimizer's references stay valid.
        """
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
                missing, unexpected = self.pretrained_model.load_state_dict(load_file(single), strict=False)
                tied = set(getattr(self.pretrained_model, "_tied_weights_keys", None) or [])
                if unexpected or set(missing) - tied:
                    raise ValueError(f"{single} does not match the model: missing {missing}, unexpected {unexpected}.")
            else:
                load_sharded_checkpoint(self.pretrained_model, str(directory), strict=False)
        self.load_q_head(directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | PreTrainedModel,
        *model_args,
        peft_config=None,
        q_head_init: str = "zeros",
        is_trainable: bool = True,
        **kwargs,
    ) -> AutoModelForCausalLMWithQHead:
        """Build from a model name, a local folder, or an already loaded causal LM.

        A folder written by `save_pretrained` comes back bit-exactly: the backbone (or the base model named by its
        LoRA adapter config, plus the adapters) and the Q head. Any other name or path loads with
        `AutoModelForCausalLM.from_pretrained(name, **kwargs)` and gets a fresh Q head.

        Args:
            pretrained_model_name_or_path: a hub name, a local folder or a `PreTrainedModel` / `PeftModel`.
            peft_config: a `peft.PeftConfig`; when given, the backbone is wrapped with `get_peft_model`.
            q_head_init: init of a fresh Q head (ignored when one is loaded).
            is_trainable: for a saved PEFT folder, load its adapters trainable (default) or frozen.
            kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`, `device_map`). A bitsandbytes
                `quantization_config` (4 or 8 bits) needs the `quant` extra; the LM head is kept unquantised (added to
                `llm_int8_skip_modules` when that list is given), the Q head is never quantised, and with a
                `peft_config` the backbone goes through `peft.prepare_model_for_kbit_training` first (QLoRA).
        """
        path = pretrained_model_name_or_path
        saved_q_head = isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, Q_HEAD_WEIGHTS_NAME))
        if isinstance(path, nn.Module):
            backbone = path
        elif isinstance(path, (str, os.PathLike)) and not os.path.isdir(path):
            # A Hub repo id: the Q head and adapters come with `hf_hub_download` (revision, token, cache_dir, offline).
            return cls._from_hub(
                str(path),
                *model_args,
                peft_config=peft_config,
                q_head_init=q_head_init,
                is_trainable=is_trainable,
                **kwargs,
            )
        elif isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM, PeftConfig

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
        model = cls(backbone, q_head_init=q_head_init)
        if saved_q_head:
            model.load_q_head(path)
            with open(os.path.join(path, Q_HEAD_CONFIG_NAME)) as f:
                model.q_head_init = json.load(f).get("q_head_init", q_head_init)
        return model

    @classmethod
    def _from_hub(cls, repo_id: str, *model_args, peft_config, q_head_init, is_trainable, **kwargs):
        """`from_pretrained` of a Hub repo id: adapters or a full model, plus the repo's Q head when it has one."""
        if resolve_file(repo_id, "adapter_config.json", kwargs) is not None:
            from peft import AutoPeftModelForCausalLM, PeftConfig

            if kwargs.get("quantization_config") is not None:
                peft_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
                base_name = PeftConfig.from_pretrained(repo_id, **peft_kwargs).base_model_name_or_path
                kwargs["quantization_config"] = _quantization_config(kwargs, base_name)
            backbone = AutoPeftModelForCausalLM.from_pretrained(
                repo_id, *model_args, is_trainable=is_trainable, **kwargs
            )
        else:
            if kwargs.get("quantization_config") is not None:
                kwargs["quantization_config"] = _quantization_config(kwargs, repo_id)
            backbone = AutoModelForCausalLM.from_pretrained(repo_id, *model_args, **kwargs)
        if peft_config is not None:
            backbone = add_adapters(backbone, peft_config)
        model = cls(backbone, q_head_init=q_head_init)
        config_file = resolve_file(repo_id, Q_HEAD_CONFIG_NAME, kwargs)
        weights_file = resolve_file(repo_id, Q_HEAD_WEIGHTS_NAME, kwargs)
        if config_file is not None and weights_file is None:
            raise FileNotFoundError(
                f"{repo_id} has a {Q_HEAD_CONFIG_NAME} but no {Q_HEAD_WEIGHTS_NAME} (revision "
                f"{kwargs.get('revision') or 'main'}; offline, it may just not be in the cache): refusing to return a "
                "model with a fresh Q head in place of the trained one."
            )
        if weights_file is not None:
            model.load_q_head(os.path.dirname(weights_file))
            if config_file is not None:
                with open(config_file) as f:
                    model.q_head_init = json.load(f).get("q_head_init", q_head_init)
        return model


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
