"""Q-tilted decoding: the processor against a slow full-forward reference, exact KL, folding, implicit Q, reranking."""

import gc
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from tests.generation_helpers import EOS, PAD
from tests.generation_helpers import generate as _gen
from tests.generation_helpers import left_padded as _left_padded
from trl_qhead import (
    AutoModelForCausalLMWithQHead,
    ImplicitQ,
    QTiltLogitsProcessor,
    fold_tilt,
    rerank,
)


def _qhead_model(make=make_tiny_gpt2, seed=0, bias=True, **kwargs):
    model = AutoModelForCausalLMWithQHead(make(seed=seed, **kwargs).eval(), q_head_init="normal")
    with torch.no_grad():  # a trained-looking head: tilts strongly enough to change the argmax, nonzero bias
        model.q_head.weight.mul_(20.0)
        if bias:
            model.q_head.bias.normal_(0.0, 1.0)
    return model


def _small_vocab_model(make=make_tiny_gpt2, seed=0, bias=True):
    model = _qhead_model(make, seed=seed, bias=bias, vocab_size=48)
    model.base_model.generation_config.eos_token_id = EOS
    model.base_model.generation_config.pad_token_id = PAD
    return model


@torch.no_grad()
def _slow_tilted_greedy(model, ids, mask, beta, steps, top_k=None):
    """The obvious implementation: a full forward (no cache) per token, `z + q / beta`, argmax; and the KL."""
    kl = torch.zeros(ids.shape[0])
    for _ in range(steps):
        out = model(ids, attention_mask=mask, return_q=True)
        z, q = out.logits[:, -1].float(), out.q_values[:, -1].float()
        tilted = z + q / beta
        if top_k is not None:
            keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, z.topk(top_k, dim=-1).indices, True)
            tilted = tilted.masked_fill(~keep, float("-inf"))
        log_p, log_t = torch.log_softmax(z, -1), torch.log_softmax(tilted, -1)
        kl += torch.nansum(log_t.exp() * (log_t - log_p), dim=-1)
        ids = torch.cat([ids, tilted.argmax(-1, keepdim=True)], dim=-1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return ids, kl


class _ForwardCounter:
    def __init__(self, module):
        self.lengths = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])


# ---- validation ---------------------------------------------------------------------------------------------------------


def test_bad_arguments_are_rejected_early(tiny_gpt2):
    model = AutoModelForCausalLMWithQHead(tiny_gpt2)
    for beta in (0, -1.0, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="beta"):
            QTiltLogitsProcessor(model, beta=beta)
    with pytest.raises(TypeError, match="beta"):
        QTiltLogitsProcessor(model, beta="1")
    for top_k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            QTiltLogitsProcessor(model, beta=1.0, top_k=top_k)
    with pytest.raises(TypeError, match="model"):
        QTiltLogitsProcessor(tiny_gpt2, beta=1.0)  # a plain LM has no Q head
    with pytest.raises(ValueError, match="beta"):
        fold_tilt(model, beta=0.0)
    with pytest.raises(ValueError, match="vocabulary|output tokens"):
        ImplicitQ(make_tiny_gpt2(vocab_size=64), tiny_gpt2, c=1.0)
    with pytest.raises(ValueError, match="`c`"):
        ImplicitQ(tiny_gpt2, tiny_gpt2, c=float("inf"))
    with pytest.raises(ValueError, match="num_samples"):
        rerank(model, torch.ones(4, 6, dtype=torch.long), num_samples=3, prompt_length=2)
    with pytest.raises(ValueError, match="prompt_length"):
        rerank(model, torch.ones(4, 6, dtype=torch.long), num_samples=2)


# ---- the processor --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama])
def test_greedy_equals_the_slow_reference_with_no_extra_forward(make):
    model = _qhead_model(make)
    vocab = model.vocab_size
    ids, mask = _left_padded([5, 3, 7], vocab)
    backbone = model.base_model
    counter = _ForwardCounter(backbone)
    processor = QTiltLogitsProcessor(model, beta=0.5, eos_token_id=[])
    out = _gen(model, ids, mask, [processor], max_new_tokens=10)
    calls, counter.lengths = counter.lengths, []
    plain = _gen(model, ids, mask, max_new_tokens=10)
    counter.handle.remove()

    # one forward per generated token, the first over the prompt and the others over one token (KV cache on): the
    # same forwards as plain generation, so the tilt adds none
    assert calls == counter.lengths == [ids.shape[1]] + [1] * 9
    expected, kl = _slow_tilted_greedy(model, ids, mask, beta=0.5, steps=10)
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain)  # the tilt matters here
    torch.testing.assert_close(processor.kl, kl, rtol=1e-4, atol=1e-4)
    # a left-padded row generates what it generates alone
    alone = _gen(model, ids[1:2, -3:], mask[1:2, -3:], [QTiltLogitsProcessor(model, beta=0.5)], max_new_tokens=10)
    assert torch.equal(out[1, -13:], alone[0])


def test_top_k_tilts_only_the_base_top_k(tiny_gpt2):
    model = _qhead_model()
    ids, mask = _left_padded([4, 6], model.vocab_size)
    processor = QTiltLogitsProcessor(model, beta=0.3, top_k=5, eos_token_id=[])
    out = _gen(model, ids, mask, [processor], max_new_tokens=6, output_scores=True, return_dict_in_generate=True)
    expected, kl = _slow_tilted_greedy(model, ids, mask, beta=0.3, steps=6, top_k=5)
    assert torch.equal(out.sequences, expected)
    torch.testing.assert_close(processor.kl, kl, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(s).sum(-1).eq(5).all() for s in out.scores)  # exactly k tokens survive
    # beta = inf with top_k is plain top-k restriction of the base model: greedy unchanged
    with QTiltLogitsProcessor(model, beta=float("inf"), top_k=5) as untilted:
        assert torch.equal(
            _gen(model, ids, mask, [untilted], max_new_tokens=6), _gen(model, ids, mask, max_new_tokens=6)
        )


def test_beta_inf_reproduces_the_base_model_token_for_token():
    model = _qhead_model()
    ids, mask = _left_padded([4, 6], model.vocab_size)
    head = model.get_output_embeddings()
    processor = QTiltLogitsProcessor(model, beta=float("inf"))
    assert not head._forward_hooks  # nothing to read: no hook at all
    for kwargs in ({"do_sample": False}, {"do_sample": True, "temperature": 0.8, "top_p": 0.9}):
        torch.manual_seed(3)
        plain = _gen(model, ids, mask, max_new_tokens=12, **kwargs)
        torch.manual_seed(3)
        assert torch.equal(_gen(model, ids, mask, [processor], max_new_tokens=12, **kwargs), plain)
    assert torch.count_nonzero(processor.kl) == 0


def test_sampling_with_warpers_after_it_matches_the_folded_model():
    model = _qhead_model()
    ids, mask = _left_padded([4, 6], model.vocab_size)
    folded = fold_tilt(model, beta=0.7)
    kwargs = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 12}
    torch.manual_seed(11)
    tilted = _gen(model, ids, mask, [QTiltLogitsProcessor(model, beta=0.7)], **kwargs)
    torch.manual_seed(11)
    assert torch.equal(_gen(folded, ids, mask, **kwargs), tilted)
    torch.manual_seed(11)
    assert not torch.equal(_gen(model, ids, mask, **kwargs), tilted)


def test_beam_search_follows_the_beams():
    model = _small_vocab_model()
    ids, mask = _left_padded([4, 6], model.vocab_size)
    processor = QTiltLogitsProcessor(model, beta=0.8)
    kwargs = {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 8}
    out = _gen(model, ids, mask, [processor], **kwargs)
    # the processor returns normalised log pi', which is exactly what beam search over the folded model scores
    assert torch.equal(out, _gen(fold_tilt(model, beta=0.8), ids, mask, **kwargs))
    assert processor.kl.shape == (6,)  # one record per running beam (batch x num_beams)


def test_kl_is_exact_and_stops_at_eos():
    model = _small_vocab_model()
    with torch.no_grad():
        model.q_head.bias[EOS] = 2.0  # the tilt favours ending, so that rows finish and get padded
    ids, mask = _left_padded([3, 5, 4, 2], model.vocab_size, seed=1)
    processor = QTiltLogitsProcessor(model, beta=0.6)
    torch.manual_seed(0)
    out = _gen(model, ids, mask, [processor], do_sample=True, max_new_tokens=16)
    generated = out[:, ids.shape[1] :]
    is_eos = generated == EOS
    # steps counted: up to and including the first EOS
    counted = (is_eos.int().cumsum(-1) - is_eos.int()) == 0
    assert not counted.all()  # some row finished early, and generate padded it
    with torch.no_grad():  # the direct computation: one teacher-forced forward over the finished sequences
        full_mask = torch.cat([mask, torch.ones_like(generated)], dim=-1)
        o = model(out, attention_mask=full_mask, return_q=True)
        steps = slice(ids.shape[1] - 1, out.shape[1] - 1)
        z, q = o.logits[:, steps].float(), o.q_values[:, steps].float()
        log_p, log_t = torch.log_softmax(z, -1), torch.log_softmax(z + q / 0.6, -1)
        per_step = (log_t.exp() * (log_t - log_p)).sum(-1)
    torch.testing.assert_close(processor.kl, (per_step * counted).sum(-1), rtol=1e-4, atol=1e-4)
    # a new generate call starts a new record
    _gen(model, ids[:1], mask[:1], [processor], max_new_tokens=2)
    assert processor.kl.shape == (1,)


def test_the_hook_is_checked_and_removed():
    model = _qhead_model()
    other = _qhead_model(seed=1)
    ids, mask = _left_padded([4], model.vocab_size)
    head = model.get_output_embeddings()
    with QTiltLogitsProcessor(model, beta=1.0) as processor:
        assert len(head._forward_hooks) == 1
        with pytest.raises(RuntimeError, match="no hidden state"):
            _gen(other, ids, mask, [processor])  # built for another model
        with pytest.raises(RuntimeError, match="rows"):
            model(torch.ones(3, 2, dtype=torch.long))  # a forward with other rows than the scores
            processor(ids, torch.zeros(1, model.vocab_size))
    assert not head._forward_hooks
    with pytest.raises(RuntimeError, match="not attached"):
        _gen(model, ids, mask, [processor])
    QTiltLogitsProcessor(model, beta=1.0)  # dropped at once: its hook goes with it
    gc.collect()
    assert not head._forward_hooks


def test_peft_model_processor_and_fold_agree_and_the_model_is_untouched():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    lora.init_lora_weights = False  # nonzero adapters: merging matters
    model = AutoModelForCausalLMWithQHead.from_pretrained(make_tiny_gpt2(), peft_config=lora, q_head_init="normal")
    model.eval()
    with torch.no_grad():
        model.q_head.weight.mul_(20.0)
        model.q_head.bias.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.q_head.train()  # mixed modes, to see that folding leaves each module's mode alone
    modes = [m.training for m in model.modules()]
    ids, mask = _left_padded([4, 6], model.vocab_size)
    out = _gen(model, ids, mask, [QTiltLogitsProcessor(model, beta=0.5)])
    assert torch.equal(out, _slow_tilted_greedy(model, ids, mask, beta=0.5, steps=8)[0])
    folded = fold_tilt(model, beta=0.5)
    assert torch.equal(_gen(folded, ids, mask), out)
    assert model.is_peft_model and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == modes
    assert model.base_model.lm_head.weight is model.base_model.transformer.wte.weight  # still tied


def test_works_under_trl_unwrap_model_for_generation():
    from accelerate import Accelerator
    from trl.models.utils import unwrap_model_for_generation

    model = _qhead_model()
    ids, mask = _left_padded([4, 6], model.vocab_size)
    expected = _gen(model, ids, mask, [QTiltLogitsProcessor(model, beta=0.5)])
    accelerator = Accelerator(cpu=True)
    wrapped = accelerator.prepare_model(model)
    with unwrap_model_for_generation(wrapped, accelerator) as unwrapped:
        out = _gen(unwrapped, ids, mask, [QTiltLogitsProcessor(unwrapped, beta=0.5)])
    assert torch.equal(out, expected)


# ---- fold_tilt ----------------------------------------------------------------------------------------------------------

_LOAD_WITHOUT_TRL_QHEAD = """
import json, sys, torch
sys.modules["trl_qhead"] = None  # importing it would fail: the folder must not need it
from transformers import AutoModelForCausalLM
for folder, ids in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.save(model(torch.tensor(ids)).logits, folder + "/logits.pt")
"""


def test_folded_models_save_and_load_with_plain_transformers(tmp_path):
    gpt2 = _qhead_model(bias=True)  # tied embeddings, nonzero bias: carried by the final LayerNorm
    llama = _qhead_model(make_tiny_llama, bias=False)  # untied, RMSNorm: a zero bias folds as is
    ids = torch.tensor([[7, 3, 99, 41, 12, 8]])
    jobs = []
    for name, model in (("gpt2", gpt2), ("llama", llama)):
        folded = fold_tilt(model, beta=0.4)
        folded.save_pretrained(tmp_path / name)
        jobs.append((str(tmp_path / name), ids.tolist()))
        with torch.no_grad():
            out = model(ids, return_q=True)
            expected = out.logits + out.q_values / 0.4
        torch.testing.assert_close(folded(ids).logits, expected, rtol=1e-5, atol=1e-4)
        prompt, prompt_mask = _left_padded([4, 6], model.vocab_size)
        assert torch.equal(
            _gen(folded, prompt, prompt_mask), _gen(model, prompt, prompt_mask, [QTiltLogitsProcessor(model, 0.4)])
        )
    # the original GPT-2 still ties its embeddings and has its LayerNorm unchanged
    assert gpt2.base_model.lm_head.weight is gpt2.base_model.transformer.wte.weight
    assert torch.count_nonzero(gpt2.base_model.transformer.ln_f.bias) == 0
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_TRL_QHEAD, json.dumps(jobs)], check=True, cwd=tmp_path, env=env
    )
    for (folder, _), model in zip(jobs, (gpt2, llama), strict=True):
        with torch.no_grad():
            out = model(ids, return_q=True)
        torch.testing.assert_close(
            torch.load(folder + "/logits.pt"), out.logits + out.q_values / 0.4, rtol=1e-5, atol=1e-4
        )


def test_fold_refuses_a_bias_it_cannot_carry():
    llama = _qhead_model(make_tiny_llama, bias=True)
    with pytest.raises(ValueError, match="bias"):
        fold_tilt(llama, beta=1.0)


# ---- implicit Q ---------------------------------------------------------------------------------------------------------


def test_implicit_q_with_c_equal_beta_reproduces_the_policy():
    reference = make_tiny_gpt2(vocab_size=48, seed=0).eval()
    policy = make_tiny_gpt2(vocab_size=48, seed=1).eval()
    for m in (reference, policy):
        m.generation_config.eos_token_id, m.generation_config.pad_token_id = EOS, PAD
    ids, mask = _left_padded([3, 6], 48)
    beta = 0.7
    kwargs = {"do_sample": True, "max_new_tokens": 10, "output_scores": True, "return_dict_in_generate": True}
    torch.manual_seed(5)
    tilted = _gen(reference, ids, mask, [QTiltLogitsProcessor(ImplicitQ(policy, reference, c=beta), beta)], **kwargs)
    torch.manual_seed(5)
    plain = _gen(policy, ids, mask, **kwargs)
    assert torch.equal(tilted.sequences, plain.sequences)
    # the distribution itself, step by step: log pi' == log pi_policy on the tokens actually generated
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones_like(tilted.sequences[:, ids.shape[1] :])], dim=-1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate counts them: real tokens only
        logits = policy(tilted.sequences, attention_mask=full_mask, position_ids=positions).logits
    for t, scores in enumerate(tilted.scores):
        expected = torch.log_softmax(logits[:, ids.shape[1] - 1 + t].float(), -1)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    # beam search reorders rows: the policy's own cache must follow
    beams = {"num_beams": 3, "max_new_tokens": 8}
    processor = QTiltLogitsProcessor(ImplicitQ(policy, reference, c=beta), beta)
    assert torch.equal(_gen(reference, ids, mask, [processor], **beams), _gen(policy, ids, mask, **beams))
    # c != beta: the geometric mixture pi_ref^(1 - c/beta) pi_policy^(c/beta)
    out = _gen(reference, ids, mask, [QTiltLogitsProcessor(ImplicitQ(policy, reference, c=0.35), beta)], **kwargs)
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ref_logits = reference(ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        pol_logits = policy(ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
    mix = 0.5 * torch.log_softmax(ref_logits, -1) + 0.5 * torch.log_softmax(pol_logits, -1)
    torch.testing.assert_close(out.scores[0], torch.log_softmax(mix, -1), rtol=1e-4, atol=1e-4)


# ---- rerank -------------------------------------------------------------------------------------------------------------


def test_rerank_scores_the_final_action_of_each_sample():
    model = _small_vocab_model()
    ids, mask = _left_padded([3, 5], model.vocab_size, seed=2)
    k = 4
    # The check below needs a sample that ends early (padded after EOS); which seed gives one depends on the RNG use of
    # the installed transformers' sampling, so take the first seed that does.
    for seed in range(1, 100):
        torch.manual_seed(seed)
        samples = _gen(model, ids, mask, do_sample=True, num_return_sequences=k, max_new_tokens=10)
        if any(EOS in row[ids.shape[1] :].tolist()[:-1] for row in samples):
            break
    prompt_mask = mask.repeat_interleave(k, dim=0)
    result = rerank(model, samples, num_samples=k, attention_mask=prompt_mask)
    # the slow way: strip each sample's padding, run it alone, read q_{n-2}[x_{n-1}]
    expected = []
    for row, prompt_row in zip(samples, prompt_mask, strict=True):
        completion = row[ids.shape[1] :].tolist()
        end = completion.index(EOS) + 1 if EOS in completion else len(completion)
        real = torch.cat([row[: ids.shape[1]][prompt_row.bool()], row[ids.shape[1] :][:end]])
        with torch.no_grad():
            q = model(real[None], return_q=True).q_values[0]
        expected.append(q[-2, real[-1]])
    expected = torch.stack(expected).view(2, k)
    assert any(EOS in row[ids.shape[1] :].tolist()[:-1] for row in samples)  # some samples end early, padded after
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(result.indices, expected.argmax(-1) + torch.tensor([0, k]))
    assert torch.equal(result.sequences, samples[result.indices])
    # the same with the prompt length and the pad token instead of a mask
    by_length = rerank(model, samples, num_samples=k, prompt_length=ids.shape[1])
    torch.testing.assert_close(by_length.scores, expected, rtol=1e-4, atol=1e-4)
    # sampling by softmax(score / beta): a tiny beta is the argmax, and every draw stays within its prompt's group
    g = torch.Generator().manual_seed(0)
    assert torch.equal(
        rerank(model, samples, k, attention_mask=prompt_mask, beta=1e-6, generator=g).indices, result.indices
    )
    draws = torch.stack(
        [rerank(model, samples, k, attention_mask=prompt_mask, beta=10.0, generator=g).indices for _ in range(20)]
    )
    assert ((draws // k) == torch.tensor([0, 1])).all() and len(set(draws[:, 0].tolist())) > 1


# ---- the pure functions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 7])
def test_fast_kl_equals_the_definition(top_k):
    from trl_qhead.decoding import tilt_kl, tilt_logprobs, tilt_logprobs_and_kl

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 300, generator=g) * 3
    scores[0, :40] = float("-inf")  # an earlier processor masked tokens
    q = torch.randn(5, 300, generator=g) * 4 + 50.0  # a large common offset must not hurt
    indices = None if top_k is None else scores.topk(top_k, dim=-1).indices
    q_used = q if indices is None else q.gather(-1, indices)
    logprobs, kl = tilt_logprobs_and_kl(scores, q_used, 0.7, indices, with_kl=True)
    tilted = scores + q / 0.7
    if indices is not None:
        tilted = torch.full_like(tilted, float("-inf")).scatter(-1, indices, tilted.gather(-1, indices))
    torch.testing.assert_close(logprobs, torch.log_softmax(tilted, -1))
    torch.testing.assert_close(logprobs, tilt_logprobs(scores, q_used, 0.7, indices))
    torch.testing.assert_close(kl, tilt_kl(scores, logprobs), rtol=1e-4, atol=1e-4)
    # KL in float64 by the definition, over the support of pi'
    p_t, log_p = torch.softmax(tilted.double(), -1), torch.log_softmax(scores.double(), -1)
    exact = torch.where(p_t > 0, p_t * (torch.log(p_t) - log_p), torch.zeros_like(p_t)).sum(-1)
    torch.testing.assert_close(kl.double(), exact, rtol=1e-4, atol=1e-4)
    assert (kl > 0).all()
