"""The Hugging Face Hub side of a Q-head checkpoint: finding its files (a local folder or a Hub repo, offline cache
included), uploading a saved folder, and the model card (TRL's `generate_model_card` plus the Q-head sections)."""

from __future__ import annotations

import os

from .heads import DEFAULT_Q_HEAD_TYPE, q_head_class

# The `from_pretrained` keyword arguments that say where and how to fetch a file from the Hub (as transformers reads
# them); the same names are passed on to the backbone's `from_pretrained`.
HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies", "subfolder")
# `save_pretrained(..., push_to_hub=True, **kwargs)`: the keywords that belong to the upload, not to the save.
PUSH_KWARGS = ("repo_id", "commit_message", "private", "token", "create_pr", "revision", "commit_description")


def resolve_file(path_or_repo_id: str | os.PathLike, filename: str, kwargs: dict) -> str | None:
    """The local path of `filename` in a folder or a Hub repo, or `None` where it has none.

    transformers' `cached_file` (a folder is read directly; a repo id is fetched with `hf_hub_download`, honouring
    `revision`, `token`, `cache_dir`, `subfolder`, `local_files_only` and the `HF_HUB_OFFLINE` cache, and served from
    the cache when the Hub cannot be reached). `None` when the repo has no such file, or when offline and the file is
    not in the cache (then nothing can tell whether it exists), or when `path_or_repo_id` is neither a folder nor a
    valid repo id (the backbone's loader reports the bad name).
    """
    from huggingface_hub.errors import HFValidationError
    from transformers.utils import cached_file

    hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
    try:
        return cached_file(
            str(path_or_repo_id),
            filename,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
    except OSError as error:
        if isinstance(error.__cause__, HFValidationError):
            return None
        raise


def upload_folder(folder: str | os.PathLike, repo_id: str, **kwargs):
    """`HfApi.create_repo(exist_ok=True)` then `HfApi.upload_folder` of the whole saved folder (one commit)."""
    from huggingface_hub import HfApi

    api = HfApi()
    token = kwargs.get("token")
    repo_id = api.create_repo(repo_id, token=token, private=kwargs.get("private"), exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=kwargs.get("commit_message") or "Upload model with its Q head (trl-qhead)",
        commit_description=kwargs.get("commit_description"),
        token=token,
        revision=kwargs.get("revision"),
        create_pr=bool(kwargs.get("create_pr", False)),
    )


def qhead_model_card(
    *,
    base_model: str | None,
    model_name: str,
    hub_model_id: str | None,
    dataset_name: str | None = None,
    tags: list[str] | None = None,
    q_head: dict | None = None,
    settings: dict | None = None,
    reward_sources: list[str] | None = None,
    peft: bool = False,
    wandb_url: str | None = None,
):
    """A `huggingface_hub.ModelCard`: TRL's card (`trl.trainer.utils.generate_model_card`, as SFTTrainer writes it)
    with the Q head's shape, the training settings, the reward sources and how to load and generate with the tilt.

    Args:
        base_model: the pretrained model's Hub id (`None` for a local one).
        model_name: the name in the card's title.
        hub_model_id: `user/name` where it lives (or will) on the Hub; the loading snippet uses it.
        dataset_name: the training dataset's name.
        tags: card tags (`trl` and `trl-qhead` are always added).
        q_head: the contents of `q_head_config.json` (its `q_head_type` picks the formula the card states).
        settings: Q-learning settings to list (gamma, gae_lambda, q_weight, ...).
        reward_sources: one line per reward source.
        peft: the folder holds LoRA adapters (not a full model).
    """
    from trl.trainer.utils import generate_model_card

    tags = list(dict.fromkeys([*(tags or []), "trl", "trl-qhead"]))
    card = generate_model_card(
        base_model=base_model,
        model_name=model_name,
        hub_model_id=hub_model_id or model_name,
        dataset_name=dataset_name,
        tags=tags,
        wandb_url=wandb_url,
        trackio_url=None,
        trainer_name="trl-qhead's QHeadTrainer",
    )
    card.text += _qhead_section(hub_model_id or model_name, q_head or {}, settings or {}, reward_sources, peft)
    return card


def _qhead_section(model_id: str, q_head: dict, settings: dict, reward_sources: list[str] | None, peft: bool) -> str:
    lines = [
        "",
        "## Q head (trl-qhead)",
        "",
        "Besides the "
        + ("LoRA adapters" if peft else "causal LM")
        + ", this repository holds a vocabulary-sized Q head, `q_head.safetensors` (fp32) and `q_head_config.json`: "
        + q_head_class(q_head.get("q_head_type", DEFAULT_Q_HEAD_TYPE)).formula
        + " for every next token `a`. Sampling from the tilted policy "
        "`pi'(a|s) ∝ pi(a|s) exp(Q(s,a)/beta)` needs the `trl-qhead` package (`pip install trl-qhead`); "
        "the pipeline above samples from the untilted model.",
        "",
    ]
    if q_head:
        lines.append("- Q head: " + ", ".join(f"`{k}={v}`" for k, v in q_head.items()))
    for name, value in settings.items():
        lines.append(f"- `{name}`: `{value}`")
    if reward_sources is not None:
        lines.append("- reward sources: " + ("; ".join(reward_sources) if reward_sources else "none (zero rewards)"))
    lines += [
        "",
        "### Load it and generate with the tilt",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        "from trl_qhead import AutoModelForCausalLMWithQHead, QTiltLogitsProcessor, fold_tilt",
        "",
        f'model = AutoModelForCausalLMWithQHead.from_pretrained("{model_id}").eval()',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        'enc = tokenizer(["The movie was"], return_tensors="pt")',
        "tilt = QTiltLogitsProcessor(model, beta=1.0)  # smaller beta: stronger tilt, larger KL",
        "out = model.generate(**enc, logits_processor=[tilt], do_sample=True, max_new_tokens=32)",
        "print(tokenizer.batch_decode(out, skip_special_tokens=True))",
        "",
        "# or fold the tilt into the LM head: an ordinary causal LM for any engine",
        'fold_tilt(model, beta=1.0).save_pretrained("folded")',
        "```",
        "",
    ]
    return "\n".join(lines)
