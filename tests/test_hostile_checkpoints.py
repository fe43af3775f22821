"""Hostile checkpoints: folders missing their Q head, damaged Q-head files, saves and trainer checkpoints killed at any
moment, and tokenizers that do not belong to the model. Each must fail loudly (naming the file or field) or leave the
previous / the new state, never load or train on something partial."""

import builtins
import contextlib
import json
import os
import shutil

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, TrainerState

import trl_qhead.modeling as modeling
import trl_qhead.persistence as persistence
from tests.conftest import make_tiny_gpt2, make_tiny_llama
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer

# ---- helpers ------------------------------------------------------------------------------------------------------------


def _qhead_model(seed: int, peft_base: str | None = None) -> AutoModelForCausalLMWithQHead:
    if peft_base is None:
        model = AutoModelForCausalLMWithQHead(make_tiny_llama(seed=seed))
    else:
        lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        model = AutoModelForCausalLMWithQHead.from_pretrained(peft_base, peft_config=lora)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("q_head") or "lora_" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def _same_weights(a: AutoModelForCausalLMWithQHead, b: AutoModelForCausalLMWithQHead) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load_or_none(path):
    """The model a folder loads as, or None when loading raises (a clear refusal is an acceptable outcome)."""
    try:
        return AutoModelForCausalLMWithQHead.from_pretrained(str(path)).eval()
    except Exception:  # noqa: BLE001 - any refusal counts as "does not load"
        return None


class _Killed(BaseException):
    """A simulated kill: not an `Exception`, so no `except Exception` in the code under test can swallow it."""


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@contextlib.contextmanager
def _killed_at(k: int):
    """Count every file-system mutation (open for writing, create, rename, delete, the Q head's `save_file`); the k-th
    one and every later one raise `_Killed`, as if the process died there (no clean-up can run afterwards either)."""
    calls = {"n": 0, "killed": False}
    targets = [
        (os, "replace"),
        (os, "rename"),
        (os, "remove"),
        (os, "unlink"),
        (os, "rmdir"),
        (os, "mkdir"),
        (os, "makedirs"),
        (os, "open"),
        (shutil, "rmtree"),
        (shutil, "move"),
        (builtins, "open"),
        (persistence, "save_file"),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name in targets if hasattr(obj, name)]

    def wrap(obj, name, fn):
        def wrapper(*args, **kwargs):
            if name == "open" and obj is builtins:
                mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
                if not any(c in mode for c in "wax+"):
                    return fn(*args, **kwargs)
            if name == "open" and obj is os:
                flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
                if not flags & _WRITE_FLAGS:
                    return fn(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] >= k:
                calls["killed"] = True
                raise _Killed(f"killed at {name}")
            return fn(*args, **kwargs)

        return wrapper

    for obj, name, fn in originals:
        setattr(obj, name, wrap(obj, name, fn))
    try:
        yield calls
    except _Killed:
        pass
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)


# ---- A: a folder without its Q head, damaged Q-head files -----------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True])
def test_a_q_head_config_without_weights_is_an_error_naming_folder_and_file(tmp_path, peft):
    base = None
    if peft:
        make_tiny_llama().save_pretrained(tmp_path / "base")
        base = str(tmp_path / "base")
    _qhead_model(0, base).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "q_head.safetensors").unlink()  # a checkpoint killed before the Q head was written
    with pytest.raises(FileNotFoundError, match=r"ckpt.*q_head\.safetensors"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))


def test_q_head_weights_without_their_config_are_an_interrupted_save(tmp_path):
    _qhead_model(0).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "q_head_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt.*q_head_config\.json"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError, match=r"q_head_config\.json"):
        _qhead_model(1).load_checkpoint(tmp_path / "ckpt")  # the trainer's resume path checks the same


def test_a_plain_model_folder_still_gets_a_fresh_q_head(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "plain")
    model = AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "plain"))
    assert torch.count_nonzero(model.q_head.weight) == 0 and torch.count_nonzero(model.q_head.bias) == 0


def _damage(path, how):
    good = {"weight": torch.ones(512, 32), "bias": torch.zeros(512)}
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\x17not a safetensors file at all" * 10)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "no_bias":
        save_file({"weight": good["weight"]}, str(path))
    elif how == "no_weight":
        save_file({"bias": good["bias"]}, str(path))
    elif how == "extra_key":
        save_file({**good, "scale": torch.ones(1)}, str(path))
    elif how == "fp16":
        save_file({k: v.half() for k, v in good.items()}, str(path))
    elif how == "bias_shape":
        save_file({"weight": good["weight"], "bias": torch.zeros(511)}, str(path))
    elif how == "nan":
        save_file({"weight": good["weight"], "bias": torch.full((512,), float("nan"))}, str(path))


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "empty", "no_bias", "no_weight", "extra_key", "fp16", "bias_shape", "nan"]
)
def test_a_damaged_q_head_file_is_an_error_naming_the_file(tmp_path, how):
    _qhead_model(0).save_pretrained(tmp_path / "ckpt")
    _damage(tmp_path / "ckpt" / "q_head.safetensors", how)
    with pytest.raises(ValueError, match=r"ckpt[/\\]q_head\.safetensors"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("how", ["truncated", "garbage", "no_bias", "nan"])
def test_a_damaged_q_head_file_is_named_when_resuming_a_sharded_model(tmp_path, how):
    """`checkpoint_state_dict` (what FSDP resumption reads) checks the Q-head file as `from_pretrained` does."""
    model = _qhead_model(0)
    model.save_pretrained(tmp_path / "ckpt")
    _damage(tmp_path / "ckpt" / "q_head.safetensors", how)
    with pytest.raises(ValueError, match=r"ckpt[/\\]q_head\.safetensors"):
        model.checkpoint_state_dict(tmp_path / "ckpt")


def _peft_model_without_base_name() -> AutoModelForCausalLMWithQHead:
    """LoRA adapters on a model built from a config: its base has no name or path."""
    model = AutoModelForCausalLMWithQHead(make_tiny_llama(seed=3))
    model.pretrained_model = modeling.add_adapters(
        model.pretrained_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        model.q_head.weight.normal_(0.0, 0.5)
    return model.eval()


def test_a_peft_folder_whose_base_has_no_name_is_an_error_naming_the_file(tmp_path):
    model = _peft_model_without_base_name()
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"ckpt[/\\]adapter_config\.json has no `base_model_name_or_path`"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))
    # The way the message gives loads it back exactly.
    from peft import PeftModel

    loaded = AutoModelForCausalLMWithQHead(PeftModel.from_pretrained(make_tiny_llama(seed=3), str(tmp_path / "ckpt")))
    loaded.load_q_head(tmp_path / "ckpt")
    assert _same_weights(model, loaded.eval())


def test_a_peft_folder_whose_base_folder_is_gone_is_an_error_naming_it(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "base")
    _qhead_model(0, str(tmp_path / "base")).save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(ValueError, match=r"adapter_config\.json names the base model folder .*base, which does not"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("content", ["{", "[]", '{"hidden_size": 32, "vocab_size": 7}'])
def test_a_damaged_q_head_config_is_an_error_naming_the_file(tmp_path, content):
    _qhead_model(0).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "q_head_config.json").write_text(content)
    with pytest.raises(ValueError, match=r"ckpt[/\\]q_head_config\.json"):
        AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt"))


# ---- B: saves killed at any moment ------------------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("existing", [False, True], ids=["new_folder", "over_a_previous_save"])
def test_b_a_save_killed_at_any_moment_leaves_the_previous_or_the_new_checkpoint(tmp_path, peft, existing):
    base = None
    if peft:
        make_tiny_llama().save_pretrained(tmp_path / "base")
        base = str(tmp_path / "base")
    old, new = _qhead_model(1, base), _qhead_model(2, base)
    assert not _same_weights(old, new)
    target = tmp_path / "run" / "ckpt"
    outcomes = []
    for k in range(1, 200):
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        if existing:
            old.save_pretrained(target)
        with _killed_at(k) as calls:
            new.save_pretrained(target)
        loaded = _load_or_none(target)
        if not calls["killed"]:  # the save ran to its end: it is the new checkpoint
            assert loaded is not None and _same_weights(loaded, new)
            break
        if loaded is None:
            outcomes.append("refused")
        elif _same_weights(loaded, new):
            outcomes.append("new")
        elif existing and _same_weights(loaded, old):
            outcomes.append("previous")
        else:
            pytest.fail(f"killed at mutation {k}: the folder loads as neither the previous nor the new checkpoint")
    else:
        pytest.fail("the save never completed")
    assert len(outcomes) >= 3  # the kill points were exercised
    assert outcomes[0] == ("previous" if existing else "refused")  # killed before the commit: nothing changed


def test_b_save_pretrained_replaces_what_a_previous_save_wrote(tmp_path, tiny_llama):
    """A full model saved over a PEFT save (or the other way round) leaves no stale files that would load instead."""
    make_tiny_llama().save_pretrained(tmp_path / "base")
    peft_model = _qhead_model(3, str(tmp_path / "base"))
    full_model = _qhead_model(4)
    peft_model.save_pretrained(tmp_path / "ckpt")
    full_model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()
    assert _same_weights(AutoModelForCausalLMWithQHead.from_pretrained(str(tmp_path / "ckpt")), full_model)


# ---- B: trainer checkpoints killed mid-way; resume_from_checkpoint=True takes the newest complete one ----------------

WORDS = ["<eos>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park", "sun", "rose", "over", "hills"]
CORPUS = ["the cat sat on the mat", "a dog ran to the park", "the sun rose over the hills", "the dog sat"] * 4


def _trainer(tmp_path, out="out", max_steps=4, seed=0):
    """A 1-layer GPT-2 over a 15-word vocabulary: checkpoints every 2 steps, every state a resume must restore."""
    config = QHeadConfig(
        output_dir=str(tmp_path / out),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        max_length=16,
        report_to=[],
        seed=seed,
        disable_tqdm=True,
        gae_lambda=0.9,
        use_lm_rewards=True,  # so the Q head has targets to learn
    )
    model = AutoModelForCausalLMWithQHead(_word_model(len(WORDS), eos_token_id=0, seed=seed))
    tokenizer = _word_tokenizer(WORDS, eos_token="<eos>", pad_token="<eos>")
    return QHeadTrainer(model, config, Dataset.from_dict({"text": CORPUS}), processing_class=tokenizer)


def _kill_checkpoint_4(monkeypatch, where):
    """Make the save of checkpoint-4 die at `where` (earlier checkpoints are written normally)."""
    from transformers import Trainer

    targets = {
        "q_head": (AutoModelForCausalLMWithQHead, "save_pretrained"),
        "optimizer": (Trainer, "_save_optimizer_and_scheduler"),
        "rng": (Trainer, "_save_rng_state"),
        "trainer_state": (TrainerState, "save_to_json"),
    }
    owner, name = targets[where]
    original = getattr(owner, name)

    def dying(self, *args, **kwargs):
        path = str(args[0]) if args else ""
        if "checkpoint-4" in path:
            if where == "trainer_state":  # die half way through writing the JSON
                with open(path, "w") as f:
                    f.write('{"global_step": 4, "log_his')
            raise _Killed(where)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


@pytest.mark.parametrize("where", ["q_head", "optimizer", "rng", "trainer_state"])
@pytest.mark.parametrize("stale", [False, True], ids=["fresh_dir", "over_an_older_run"])
def test_b_resume_true_skips_a_checkpoint_killed_mid_save(tmp_path, monkeypatch, where, stale):
    if stale:  # an older, complete run in the same output_dir: its checkpoint-4 gets partly overwritten
        _trainer(tmp_path, seed=1).train()
    with monkeypatch.context() as patch:
        _kill_checkpoint_4(patch, where)
        with pytest.raises(_Killed):
            _trainer(tmp_path).train()

    resumed = _trainer(tmp_path, max_steps=6)
    picked, original_load = [], resumed._load_from_checkpoint

    def load(path, *args, **kwargs):
        picked.append(os.path.basename(path))
        return original_load(path, *args, **kwargs)

    resumed._load_from_checkpoint = load
    resumed.train(resume_from_checkpoint=True)
    assert picked == ["checkpoint-2"]

    # exactly what resuming from checkpoint-2 by name gives
    reference = _trainer(tmp_path, out="reference", max_steps=6)
    reference.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.state.global_step == reference.state.global_step == 6
    assert _same_weights(resumed.model, reference.model)


def test_b_rotation_keeps_the_previous_checkpoint_until_the_new_one_is_complete(tmp_path, monkeypatch):
    import trl_qhead.trainer as trainer_module

    original = trainer_module.mark_checkpoint_complete

    def dying(folder, step):
        if step == 4:
            raise _Killed("marker")
        return original(folder, step)

    trainer = _trainer(tmp_path)
    trainer.args.save_total_limit = 1
    monkeypatch.setattr(trainer_module, "mark_checkpoint_complete", dying)
    with pytest.raises(_Killed):
        trainer.train()
    monkeypatch.setattr(trainer_module, "mark_checkpoint_complete", original)
    assert trainer_module.checkpoint_problem(tmp_path / "out" / "checkpoint-2") is None  # not rotated away
    assert trainer_module.last_complete_checkpoint(tmp_path / "out") == str(tmp_path / "out" / "checkpoint-2")

    finished = _trainer(tmp_path, max_steps=6)
    finished.args.save_total_limit = 1
    finished.train(resume_from_checkpoint=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-6"]  # rotation still runs, after the marker


def test_b_resume_true_with_no_complete_checkpoint_fails_clearly(tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_rng_state

    def dying(self, output_dir, *args, **kwargs):
        raise _Killed("rng")

    monkeypatch.setattr(Trainer, "_save_rng_state", dying)
    with pytest.raises(_Killed):
        _trainer(tmp_path).train()
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    with pytest.raises(ValueError, match=r"complete checkpoint.*checkpoint-2"):
        _trainer(tmp_path).train(resume_from_checkpoint=True)


# ---- E: tokenizers that do not belong to the model ----------------------------------------------------------------


def _word_tokenizer(words, **special):
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def _word_model(vocab_size, eos_token_id, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=32,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    return GPT2LMHeadModel(config)


def _config(tmp_path):
    return QHeadConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], save_strategy="no")


def test_e_a_model_folder_without_tokenizer_files_is_refused(tmp_path):
    make_tiny_gpt2().save_pretrained(tmp_path / "model")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "model")) == 1  # what transformers would silently build
    dataset = Dataset.from_dict({"text": ["The cat sat on the mat."] * 4})
    with pytest.raises(FileNotFoundError, match=r"model.*tokenizer"):
        QHeadTrainer(str(tmp_path / "model"), _config(tmp_path), dataset)


def test_e_the_one_token_tokenizer_is_refused_when_handed_over(tmp_path):
    make_tiny_gpt2().save_pretrained(tmp_path / "model")
    one_token = AutoTokenizer.from_pretrained(tmp_path / "model")
    dataset = Dataset.from_dict({"text": ["The cat sat on the mat."] * 4})
    with pytest.raises(ValueError, match=r"`processing_class` has 1 token.*50256"):
        QHeadTrainer(make_tiny_gpt2(), _config(tmp_path), dataset, processing_class=one_token)


def test_e_a_tokenizer_smaller_than_the_models_special_ids_is_refused(tmp_path):
    words = ["<eos>", "a", "b", "c"]
    tokenizer = _word_tokenizer(words, eos_token="<eos>", pad_token="<eos>")
    dataset = Dataset.from_dict({"text": ["a b c", "c b a"]})
    with pytest.raises(ValueError, match=r"`processing_class` has 4 tokens.*eos_token_id.*50"):
        QHeadTrainer(_word_model(64, eos_token_id=50), _config(tmp_path), dataset, processing_class=tokenizer)
    # the same tokenizer with a model whose special ids it covers is fine
    QHeadTrainer(_word_model(64, eos_token_id=0), _config(tmp_path), dataset, processing_class=tokenizer)


def test_e_a_tokenizer_without_eos_is_refused(tmp_path):
    tokenizer = _word_tokenizer(["<unk>", "a", "b", "c"], pad_token="<unk>")
    assert tokenizer.eos_token_id is None
    dataset = Dataset.from_dict({"text": ["a b c", "c b a"]})
    with pytest.raises(ValueError, match=r"`processing_class` has no EOS token"):
        QHeadTrainer(_word_model(64, eos_token_id=0), _config(tmp_path), dataset, processing_class=tokenizer)


def test_e_an_eos_outside_the_models_vocabulary_is_refused(tmp_path):
    words = [f"w{i}" for i in range(70)]
    tokenizer = _word_tokenizer(words, eos_token="w65", pad_token="w0")
    tokenizer_len = len(tokenizer)
    assert tokenizer_len == 70
    dataset = Dataset.from_dict({"text": ["w1 w2", "w3 w4"]})
    with pytest.raises(ValueError, match=r"70 tokens .* 64"):
        QHeadTrainer(_word_model(64, eos_token_id=0), _config(tmp_path), dataset, processing_class=tokenizer)


def test_q_head_config_json_is_written_last_and_lists_the_files(tmp_path):
    _qhead_model(0).save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "q_head_config.json").read_text())
    assert {"model.safetensors", "config.json", "q_head.safetensors"} <= set(meta["files"])
