"""Issue 15, TRL-native habits: the Hub round trip, model cards, TRL's argument conventions, the console script and
folded checkpoints. Offline: a Hub repo is a folder in huggingface_hub's cache layout, uploads are monkeypatched."""

import json
import os
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from tests.conftest import make_tiny_gpt2
from tests.hub_fakes import FakeHub, hub_repo
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer
from trl_qhead.modeling import Q_HEAD_CONFIG_NAME, Q_HEAD_WEIGHTS_NAME

LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
CORPUS = ["The cat sat on the mat.", "A dog ran in the park.", "Rain fell all night.", "He read a book."] * 4


def _trained_like(model):
    with torch.no_grad():
        model.q_head.weight.normal_(0, 0.1)
        model.q_head.bias.normal_(0, 0.1)
    return model


def test_hub_round_trip_full_and_peft_and_missing_weights(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    full = _trained_like(AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=128)))
    full.save_pretrained(tmp_path / "full")
    hub_repo(cache, "me/full", tmp_path / "full")
    # a second revision with another Q head: `revision` is honoured
    other = _trained_like(AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=128)))
    other.save_pretrained(tmp_path / "other")
    shutil.copytree(tmp_path / "other", cache / "models--me--full" / "snapshots" / ("b" * 40))
    (cache / "models--me--full" / "refs" / "v2").write_text("b" * 40)

    loaded = AutoModelForCausalLMWithQHead.from_pretrained("me/full", cache_dir=str(cache), token="hf_x")
    assert torch.equal(loaded.q_head.weight, full.q_head.weight)
    assert torch.equal(loaded.q_head.bias, full.q_head.bias)
    v2 = AutoModelForCausalLMWithQHead.from_pretrained("me/full", cache_dir=str(cache), revision="v2")
    assert torch.equal(v2.q_head.weight, other.q_head.weight)

    lora = _trained_like(AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=128), q_head_init="normal"))
    make_tiny_gpt2(vocab_size=128).save_pretrained(tmp_path / "base")
    hub_repo(cache, "me/base", tmp_path / "base")
    from peft import get_peft_model

    lora = AutoModelForCausalLMWithQHead(
        get_peft_model(make_tiny_gpt2(vocab_size=128), LoraConfig(**LORA)), q_head_init="normal"
    )
    lora.base_model.config._name_or_path = "me/base"
    lora.pretrained_model.peft_config["default"].base_model_name_or_path = "me/base"
    lora.save_pretrained(tmp_path / "lora")
    hub_repo(cache, "me/lora", tmp_path / "lora")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # PEFT loads the base model by name: from the same cache
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    loaded = AutoModelForCausalLMWithQHead.from_pretrained("me/lora", cache_dir=str(cache))
    assert loaded.is_peft_model
    assert torch.equal(loaded.q_head.weight, lora.q_head.weight) and loaded.q_head_init == "normal"
    ids = torch.tensor([[1, 2, 3, 4]])
    lora.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids).logits, lora(ids).logits)

    # a repo with the Q head's config but no weights is refused (it used to load an all-zero head silently)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "full", broken)
    os.remove(broken / Q_HEAD_WEIGHTS_NAME)
    hub_repo(cache, "me/broken", broken)
    with pytest.raises(FileNotFoundError, match=Q_HEAD_WEIGHTS_NAME):
        AutoModelForCausalLMWithQHead.from_pretrained("me/broken", cache_dir=str(cache))
    # ... and so is half a Q head the other way round, or a repo missing a file its q_head_config.json lists
    weights_only = tmp_path / "weights_only"
    shutil.copytree(tmp_path / "full", weights_only)
    os.remove(weights_only / Q_HEAD_CONFIG_NAME)
    hub_repo(cache, "me/weights_only", weights_only)
    with pytest.raises(FileNotFoundError, match=Q_HEAD_CONFIG_NAME):
        AutoModelForCausalLMWithQHead.from_pretrained("me/weights_only", cache_dir=str(cache))
    listed = json.loads((tmp_path / "full" / Q_HEAD_CONFIG_NAME).read_text()).get("files")
    if listed:  # atomic saves list their files
        lacking = tmp_path / "lacking"
        shutil.copytree(tmp_path / "full", lacking)
        os.remove(lacking / "generation_config.json")
        hub_repo(cache, "me/lacking", lacking)
        with pytest.raises(FileNotFoundError, match="generation_config.json"):
            AutoModelForCausalLMWithQHead.from_pretrained("me/lacking", cache_dir=str(cache))
    # a plain causal LM repo (no Q head files) gets a fresh head
    fresh = AutoModelForCausalLMWithQHead.from_pretrained("me/base", cache_dir=str(cache))
    assert not fresh.q_head.weight.any()


def test_push_to_hub_model_save_pretrained_and_trainer(tmp_path, monkeypatch, gpt2_tokenizer):
    hub = FakeHub(monkeypatch, tmp_path)
    lora = AutoModelForCausalLMWithQHead(make_tiny_gpt2(), q_head_init="normal")
    lora.pretrained_model = __import__("peft").get_peft_model(lora.pretrained_model, LoraConfig(**LORA))

    lora.push_to_hub("me/pushed", commit_message="hi", private=True)
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/pushed" and upload["commit_message"] == "hi"
    for name in ("adapter_config.json", "adapter_model.safetensors", Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME):
        assert name in upload["files"]
    card = (upload["dir"] / "README.md").read_text()
    assert "trl-qhead" in card and "QTiltLogitsProcessor" in card and 'from_pretrained("me/pushed")' in card

    # save_pretrained(push_to_hub=True) uploads after the Q head is written, with PEFT
    lora.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/saved")
    assert hub.uploads[-1]["repo_id"] == "me/saved"
    assert {Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME, "adapter_model.safetensors"} <= set(hub.uploads[-1]["files"])

    # the trainer: transformers' push_to_hub, with the Q head files in the output folder and TRL's card
    config = QHeadConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=16,
        report_to=[],
        save_strategy="no",
        hub_model_id="me/trained",
        disable_tqdm=True,
    )
    trainer = QHeadTrainer(
        make_tiny_gpt2(), config, train_dataset=Dataset.from_dict({"text": CORPUS}), processing_class=gpt2_tokenizer
    )
    trainer.train()
    trainer.push_to_hub()
    upload = hub.uploads[-1]
    assert upload["repo_id"] == "me/trained"
    for name in ("model.safetensors", Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME, "training_args.bin", "README.md"):
        assert name in upload["files"], name
    card = (upload["dir"] / "README.md").read_text()
    assert "- trl-qhead" in card and "- trl" in card and "q_weight" in card


# ---- 2. Model card and training_args.bin at every save ----------------------------------------------------------------


def test_every_save_has_trl_card_and_training_args(tmp_path, monkeypatch, gpt2_tokenizer):
    hub = FakeHub(monkeypatch, tmp_path)

    def reward_len(completions, **kwargs):
        return [float(len(c)) for c in completions]

    rows = {"prompt": ["The cat", "A dog"] * 4, "completion": [" sat.", " ran."] * 4, "reward": [1.0, -1.0] * 4}
    config = QHeadConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=16,
        report_to=[],
        save_strategy="steps",
        save_steps=1,
        disable_tqdm=True,
        dataset_name="me/reviews",
        gamma=0.9,
        push_to_hub=True,
        hub_model_id="me/ckpt",
        hub_strategy="every_save",
    )
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        config,
        train_dataset=Dataset.from_dict(rows),
        processing_class=gpt2_tokenizer,
        reward_funcs=reward_len,
    )
    trainer.train()
    for folder in (tmp_path / "out" / "checkpoint-1", tmp_path / "out" / "checkpoint-2"):
        assert (folder / "training_args.bin").is_file()
        args = torch.load(folder / "training_args.bin", weights_only=False)
        assert isinstance(args, QHeadConfig) and args.gamma == 0.9
        card = (folder / "README.md").read_text()
        for needle in (
            "- trl\n",
            "- trl-qhead",
            "me/reviews",
            "`gamma`: `0.9`",
            "reward function `reward_len`",
            "dataset column `reward`",
            "QTiltLogitsProcessor",
            'AutoModelForCausalLMWithQHead.from_pretrained("me/ckpt")',  # the repo, not `checkpoint-N`
        ):
            assert needle in card, needle
    # checkpoint pushes carry the Q head (transformers copies only the files it knows by name)
    assert hub.uploads and all(Q_HEAD_WEIGHTS_NAME in u["files"] and "README.md" in u["files"] for u in hub.uploads)


# ---- 3. TRL habits ---------------------------------------------------------------------------------------------------


def test_trl_habits(tmp_path, gpt2_tokenizer):
    from transformers import TrainingArguments
    from trl import LogCompletionsCallback

    rows = Dataset.from_dict({"prompt": ["The cat", "A dog"] * 4, "completion": [" sat.", " ran."] * 4})
    plain = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        report_to=[],
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        hub_token="tok",
    )
    seen = []

    def compute_metrics(prediction):
        logprobs, q = prediction.predictions
        seen.append((logprobs.shape, prediction.label_ids.shape))
        return {"mean_logprob": float(logprobs[:, :-1][prediction.label_ids[:, 1:] != -100].mean())}

    tokenizer = copy_tokenizer(gpt2_tokenizer)
    trainer = QHeadTrainer(
        make_tiny_gpt2(),
        plain,
        train_dataset=rows,
        eval_dataset={"a": rows, "b": rows.select(range(4))},
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
    )
    assert isinstance(trainer.args, QHeadConfig) and trainer.args.max_steps == 2 and trainer.args.hub_token == "tok"
    assert not trainer.args.remove_unused_columns
    trainer.train()
    assert not trainer.model.training  # back in eval mode: generating after train has no dropout
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"eval_a_loss", "eval_b_loss", "eval_a_mean_logprob", "eval_b_loss_q"} <= logged
    assert seen and len(seen[0][0]) == 2

    # TRL's LogCompletionsCallback generates from the evaluation rows' `prompt` column, which the trainer keeps
    single = QHeadTrainer(
        make_tiny_gpt2(),
        QHeadConfig(
            output_dir=str(tmp_path / "o1"),
            max_steps=1,
            per_device_train_batch_size=2,
            report_to=[],
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=copy_tokenizer(gpt2_tokenizer),
    )
    completions = LogCompletionsCallback(single, num_prompts=2, freq=1)
    single.add_callback(completions)
    single.train()
    assert [row[1] for row in completions.table] == ["The cat", "A dog"]

    # model_init_kwargs: used when the model is a name
    make_tiny_gpt2().save_pretrained(tmp_path / "tiny")
    gpt2_tokenizer.save_pretrained(tmp_path / "tiny")
    config = QHeadConfig(
        output_dir=str(tmp_path / "o2"),
        report_to=[],
        max_steps=1,
        model_init_kwargs={"dtype": "bfloat16"},
        eos_token="<|endoftext|>",
    )
    trainer = QHeadTrainer(str(tmp_path / "tiny"), config, train_dataset=rows)
    assert trainer.model.base_model.dtype == torch.bfloat16
    assert QHeadConfig(output_dir="x", model_init_kwargs='{"dtype": "float32"}').model_init_kwargs == {
        "dtype": "float32"
    }

    # chat template options: a Jinja file works, the rest says why not
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    config = QHeadConfig(output_dir=str(tmp_path / "o3"), report_to=[], max_steps=1, chat_template_path=str(template))
    chat = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}
    )
    trainer = QHeadTrainer(
        make_tiny_gpt2(), config, train_dataset=chat, processing_class=copy_tokenizer(gpt2_tokenizer)
    )
    assert trainer.processing_class.chat_template == template.read_text()
    with pytest.raises(ValueError, match="assistant_only_loss"):
        QHeadConfig(output_dir="x", assistant_only_loss=True)
    with pytest.raises(ValueError, match="Jinja"):
        QHeadConfig(output_dir="x", chat_template_path="Qwen/Qwen3-0.6B")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        QHeadTrainer(
            make_tiny_gpt2(),
            QHeadConfig(output_dir=str(tmp_path / "o4"), eos_token="<nope>", report_to=[]),
            train_dataset=rows,
            processing_class=copy_tokenizer(gpt2_tokenizer),
        )


def copy_tokenizer(tokenizer):
    import copy

    return copy.deepcopy(tokenizer)


def test_recipe_takes_trl_script_flags_and_evaluates_on_the_test_split(tmp_path):
    from recipes.qhead_lora import make_parser
    from tests.recipe_assets import recipe_args, run_in_process, save_tiny_gpt2, write_corpus

    model_dir = save_tiny_gpt2(tmp_path / "gpt2")
    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data / "train.txt", n_lines=16)
    write_corpus(data / "test.txt", n_lines=4, seed=1)
    script, training, _ = make_parser().parse_args_and_config(
        ["--dataset_train_split", "validation", "--dataset_test_split", "dev", "--dataset_streaming", "true"]
        + ["--trust_remote_code", "true", "--max_steps", "3"]
    )
    assert (script.dataset_train_split, script.dataset_test_split, script.dataset_streaming) == (
        "validation",
        "dev",
        True,
    )
    assert training.trust_remote_code

    # a folder of text files: `train` and `test` splits; --eval_strategy steps evaluates on the test split
    flags = dict(
        dataset_name=data,
        dataset_data_files=None,
        packing="false",
        steps=2,
        eval_strategy="steps",
        eval_steps=1,
        dataset_train_split="train",
        lora_dropout=None,
    )
    trainer = run_in_process(recipe_args(model_dir, data / "train.txt", tmp_path / "out", **flags))
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    # no such split: a clear error before any training
    with pytest.raises(ValueError, match="dataset_test_split"):
        run_in_process(
            recipe_args(model_dir, data / "train.txt", tmp_path / "out2", **flags, dataset_test_split="nope")
        )


# ---- 4. Library functions where equivalent --------------------------------------------------------------------------


def test_reference_copy_matches_trl_and_lora_config_leaves_fan_in_fan_out_to_peft(tmp_path):
    import warnings

    from trl_qhead.reference import frozen_copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.utils import create_reference_model

    model = make_tiny_gpt2(vocab_size=128)
    ours, theirs = frozen_copy(model), create_reference_model(model)
    for copy_ in (ours, theirs):
        assert not copy_.training and not any(p.requires_grad for p in copy_.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True)
    )
    assert model.transformer.wte.weight.requires_grad  # the policy itself is untouched

    from recipes.qhead_lora import lora_config, make_parser

    make_tiny_gpt2(vocab_size=128).save_pretrained(tmp_path / "gpt2")
    _, _, model_args = make_parser().parse_args_and_config(["--lora_r", "2"])
    config = lora_config(model_args, str(tmp_path / "gpt2"))
    wrapped = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "gpt2"), peft_config=config)
    assert config.fan_in_fan_out and wrapped.is_peft_model  # set by PEFT for GPT-2's Conv1D


# ---- 5. The console script ------------------------------------------------------------------------------------------


def test_console_script(tmp_path, capsys):
    import tomllib

    from recipes.offline_assets import gpt2_tokenizer_dir
    from tests.recipe_assets import REPO, save_tiny_gpt2, write_corpus
    from trl_qhead import cli

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["trl-qhead"] == "trl_qhead.cli:main"
    assert pyproject["tool"]["setuptools"]["package-dir"]["trl_qhead.recipes"] == "recipes"
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    packages = {".".join(p.relative_to(REPO).parent.parts) for p in (REPO / "trl_qhead").rglob("__init__.py")}
    assert packages <= listed  # every package of the tree ships (find cannot be used with the mapped folder)

    assert cli.main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    model_dir, corpus = save_tiny_gpt2(tmp_path / "gpt2"), write_corpus(tmp_path / "c.txt", n_lines=8)
    common = ["--tokenizer_name_or_path", str(gpt2_tokenizer_dir()), "--dataset_name", "text"]
    common += [
        "--dataset_data_files",
        str(corpus),
        "--max_length",
        "16",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    # --config names the shipped YAML; flags override it
    cli.main(
        [
            "train",
            "--config",
            "qhead_lora.yaml",
            "--model_name_or_path",
            str(model_dir),
            *common,
            "--output_dir",
            str(tmp_path / "run"),
            "--max_steps",
            "1",
            "--packing",
            "false",
            "--lora_r",
            "2",
            "--dataset_config",
            "default",
            "--per_device_train_batch_size",
            "2",
            "--save_strategy",
            "no",
        ]
    )
    assert (tmp_path / "run" / Q_HEAD_WEIGHTS_NAME).is_file()
    cli.main(
        [
            "eval",
            "--model_name_or_path",
            str(tmp_path / "run"),
            *common,
            "--dataset_test_split",
            "train",
            "--output_dir",
            str(tmp_path / "eval"),
            "--per_device_eval_batch_size",
            "4",
        ]
    )
    metrics = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert "eval_loss" in metrics and "eval_loss_q" in metrics


# ---- 6. Folded checkpoints other engines reproduce -------------------------------------------------------------------


def test_fold_tilt_saves_an_untied_head_and_warns_for_gpt2(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama
    from trl_qhead import fold_tilt

    for make, warns in ((lambda: make_tiny_gpt2(vocab_size=128), True), (make_tiny_llama, False)):
        model = _trained_like(AutoModelForCausalLMWithQHead(make()))
        with torch.no_grad():
            model.q_head.bias.zero_()
        if warns:
            with pytest.warns(UserWarning, match="vLLM"):
                folded = fold_tilt(model, beta=0.5)
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                folded = fold_tilt(model, beta=0.5)
        folded.save_pretrained(tmp_path / "folded")
        config = json.loads((tmp_path / "folded" / "config.json").read_text())
        assert config["tie_word_embeddings"] is False
        with safe_open(tmp_path / "folded" / "model.safetensors", "pt") as f:
            head = f.get_tensor("lm_head.weight")
        embeddings = folded.get_input_embeddings().weight
        assert not torch.equal(head, embeddings.detach())  # its own tensor, the tilted head
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        torch.testing.assert_close(reloaded(ids).logits, folded(ids).logits)
        shutil.rmtree(tmp_path / "folded")
