"""Checks shared by the context-reading heads' tests (`test_adapter.py`, `test_q_model.py`): training leaves the
policy bit-identical and trains the Q network; the tilt at every decoding step, cached, equals the tilt from a full
forward of the sequences so far; the save / load round trip gives the same Q."""

import torch
from datasets import Dataset
from transformers import LogitsProcessor

from tests.hub_fakes import FakeHub, hub_repo
from trl_qhead import AutoModelForCausalLMWithQHead, QHeadConfig, QHeadTrainer, QTiltLogitsProcessor, rerank
from trl_qhead.decoding import tilt_kl
from trl_qhead.heads.q_network import GenerateInputs
from trl_qhead.persistence import Q_HEAD_CONFIG_NAME, Q_HEAD_WEIGHTS_NAME

SMALL = 64  # a fast vocabulary for what needs no tokenizer (decoding checks)
VOCAB = 50257  # the GPT-2 tokenizer's: the trainer checks the model against it


def effect_rows(n: int = 8, *, mc: bool = False) -> Dataset:
    """Prompt + completion rows with candidate labels whose effect depends on the prompt's first token (a context-
    dependent reward: the same candidate is worth +1 after prompt token 3 and -1 after token 4). `mc=True`: Monte
    Carlo labels (a sequence reward, no candidates)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sign = 1.0 if i % 2 == 0 else -1.0
        prompt = [3 if sign > 0 else 4, *torch.randint(10, VOCAB, (2,), generator=g).tolist()]
        completion = torch.randint(10, VOCAB, (4,), generator=g).tolist()
        ids = prompt + completion
        row = {"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
        if mc:
            row["reward"] = sign
        else:
            row["reward"] = 0.0
            row["candidate_ids"] = [[] for _ in prompt] + [[5, 6] for _ in completion]
            row["candidate_rewards"] = [[] for _ in prompt] + [[sign, -sign] for _ in completion]
            row["candidate_sampled_reward"] = [0.0] * len(ids)
        rows.append(row)
    return Dataset.from_list(rows)


def train(model, tokenizer, tmp_path, dataset, **overrides):
    args = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        max_length=32,
        report_to=[],
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        reward_normalization=None,
        gamma=1.0,
    )
    args.update(overrides)
    trainer = QHeadTrainer(model, QHeadConfig(**args), train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class StepRecorder(LogitsProcessor):
    """Placed after the tilt: keeps each step's sequences, their attention mask and the tilted scores."""

    def __init__(self, model):
        self.inputs = GenerateInputs(model)
        self.inputs.attach()
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids.clone(), self.inputs.mask_for(input_ids).clone(), scores.clone()))
        return scores


def assert_base_logits(model, base) -> None:
    """The model's policy logits equal the base model's, bit for bit, at every real position of `prompts()`."""
    ids, mask = prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted over real tokens, as the wrapper and `generate` count
    expected = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits[real], expected[real], atol=0, rtol=0)


def prompts():
    ids = torch.tensor([[0, 0, 3, 11, 12], [4, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask


@torch.no_grad()
def check_decode_equals_full_forward(model, beta: float = 0.5, **generate_kwargs) -> QTiltLogitsProcessor:
    """Generate with the tilt; at every step, the tilted log-probs equal `log_softmax(z + Q / beta)` from a full,
    uncached forward of the sequences so far (the policy's logits and the head's Q), and the KL record equals the sum
    of the steps' exact KL (for rows that are not finished)."""
    model.eval()
    processor = QTiltLogitsProcessor(model, beta=beta)
    recorder = StepRecorder(model)
    ids, mask = prompts()
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        logits_processor=[processor, recorder],
        max_new_tokens=5,
        pad_token_id=0,
        eos_token_id=None,
        **generate_kwargs,
    )
    assert len(recorder.steps) == 5
    kl = None
    for input_ids, step_mask, tilted in recorder.steps:
        out = model(input_ids, attention_mask=step_mask, return_q=True)
        logits, q = out.logits[:, -1].float(), out.q_values[:, -1].float()
        expected = torch.log_softmax(logits + q / beta, dim=-1)
        torch.testing.assert_close(tilted, expected, atol=2e-5, rtol=1e-5)
        step = tilt_kl(logits, expected)
        kl = step if kl is None else kl + step
        assert q.abs().max() > 0  # a trained head: the check is not vacuous
    if generate_kwargs.get("num_beams", 1) == 1:
        torch.testing.assert_close(processor.kl, kl, atol=1e-4, rtol=1e-4)
    return processor


@torch.no_grad()
def check_rerank_scores(model) -> None:
    """`rerank`'s score of each sample is the full forward's `Q(s_{n-2}, x_{n-1})` (its head reads the samples)."""
    ids, mask = prompts()
    sequences = torch.cat([ids, torch.tensor([[20, 21], [22, 23]])], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], dim=1)
    out = rerank(model, sequences, 1, attention_mask=full_mask)
    q = model(sequences, attention_mask=full_mask, return_q=True).q_values
    torch.testing.assert_close(out.scores[:, 0], q[torch.arange(2), -2, sequences[:, -1]])


@torch.no_grad()
def check_save_load_and_hub(model, tmp_path, repo_id: str, monkeypatch) -> AutoModelForCausalLMWithQHead:
    """Saved, then loaded from the folder; pushed to a (fake, offline) Hub and loaded back by repo id: the same Q,
    bit for bit."""
    model.save_pretrained(tmp_path / "saved")
    ids, mask = prompts()
    expected = model(ids, attention_mask=mask, return_q=True).q_values
    assert expected.abs().max() > 0
    loaded = AutoModelForCausalLMWithQHead.from_pretrained(tmp_path / "saved").eval()
    assert loaded.q_head_type == model.q_head_type and loaded.q_head.output_type == model.q_head.output_type
    torch.testing.assert_close(loaded(ids, attention_mask=mask, return_q=True).q_values, expected, atol=0, rtol=0)
    hub = FakeHub(monkeypatch, tmp_path)
    model.push_to_hub(repo_id)
    (upload,) = hub.uploads
    assert {Q_HEAD_WEIGHTS_NAME, Q_HEAD_CONFIG_NAME} <= set(upload["files"])
    cache = tmp_path / "hub"
    hub_repo(cache, repo_id, upload["dir"])
    from_hub = AutoModelForCausalLMWithQHead.from_pretrained(repo_id, cache_dir=str(cache)).eval()
    assert from_hub.q_head_type == model.q_head_type
    torch.testing.assert_close(from_hub(ids, attention_mask=mask, return_q=True).q_values, expected, atol=0, rtol=0)
    return loaded


def check_4bit_policy(tmp_path, tokenizer, **from_pretrained_kwargs) -> None:
    """A 4-bit (bitsandbytes, CPU) policy: the context head trains, the policy's logits stay the same, the cached
    decode equals a full forward."""
    from transformers import BitsAndBytesConfig

    from tests.recipe_assets import save_tiny_gpt2

    folder = save_tiny_gpt2(tmp_path / "base", n_embd=64)  # bitsandbytes packs 4-bit weights in blocks of 64
    model = AutoModelForCausalLMWithQHead.from_pretrained(
        str(folder), quantization_config=BitsAndBytesConfig(load_in_4bit=True), **from_pretrained_kwargs
    )
    assert model.is_loaded_in_4bit
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        base_logits = model(ids).logits
    train(model, tokenizer, tmp_path, effect_rows(), max_steps=2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base_logits, atol=0, rtol=0)
    check_decode_equals_full_forward(model, do_sample=False)
