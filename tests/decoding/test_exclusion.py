"""G-IDLE token exclusion: the processor against direct computations of the renormalised distribution and its KL,
composition with the Q tilt, generation, and the order of warpers."""

import pytest
import torch
from torch import nn
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from tests.conftest import make_tiny_gpt2
from tests.generation_helpers import EOS, PAD, left_padded
from tests.generation_helpers import generate as _gen
from trl_qhead import (
    AutoModelForCausalLMWithQHead,
    QTiltLogitsProcessor,
    TokenExclusionLogitsProcessor,
    exclusion_logprobs,
    sequence_ban,
)

VOCAB = 48


def _small_vocab_model(seed=0, eos_logit=0.0):
    """A 48-token GPT-2 with a trained-looking Q head; `eos_logit` adds a bias to the base model's EOS logit (an LM
    head with a bias, tied weight kept) so that rows also finish without the tilt."""
    base = make_tiny_gpt2(vocab_size=VOCAB, seed=seed).eval()
    if eos_logit:
        head = nn.Linear(base.lm_head.in_features, VOCAB, bias=True)
        head.weight = base.lm_head.weight
        with torch.no_grad():
            head.bias.zero_()
            head.bias[EOS] = eos_logit
        base.lm_head = head
    model = AutoModelForCausalLMWithQHead(base, q_head_init="normal")
    with torch.no_grad():  # a trained-looking head: tilts strongly, nonzero bias
        model.q_head.weight.mul_(20.0)
        model.q_head.bias.normal_(0.0, 1.0)
        model.q_head.bias[EOS] = 2.0  # the tilt favours ending, so that rows finish and get padded
    model.base_model.generation_config.eos_token_id = EOS
    model.base_model.generation_config.pad_token_id = PAD
    return model


def _left_padded(lengths, seed=0):
    return left_padded(lengths, VOCAB, seed)


@torch.no_grad()
def _per_step(model, ids, mask, out):
    """The direct computation: one teacher-forced forward over the final sequences gives, for every generated step,
    the base scores `z` and Q values (what a full forward per step would give); plus the counted-steps mask (up to
    and including the first EOS or pad, the stop ids both processors take from the generation config)."""
    generated = out[:, ids.shape[1] :]
    full_mask = torch.cat([mask, torch.ones_like(generated)], dim=-1)
    o = model(out, attention_mask=full_mask, return_q=True)
    steps = slice(ids.shape[1] - 1, out.shape[1] - 1)
    is_stop = torch.isin(generated, torch.tensor([EOS, PAD])).int()
    counted = (is_stop.cumsum(-1) - is_stop) == 0
    return o.logits[:, steps].double(), o.q_values[:, steps].double(), counted


def _kl(log_a, log_b):
    """`KL(a || b)` over the last dimension by the definition (float64), tokens with `a = 0` adding 0."""
    return torch.where(torch.isfinite(log_a), log_a.exp() * (log_a - log_b), torch.zeros_like(log_a)).sum(-1)


def _static_mask(banned, shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[..., banned] = True
    return mask


# ---- validation -------------------------------------------------------------------------------------------------------


def test_bad_arguments_are_rejected_at_construction():
    with pytest.raises(ValueError, match="token id 48 is outside the vocabulary"):
        TokenExclusionLogitsProcessor([3, 48], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        TokenExclusionLogitsProcessor([-1], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="token id 50257 is outside"):  # read from the model's LM head
        TokenExclusionLogitsProcessor([50257], model=make_tiny_gpt2())
    with pytest.raises(TypeError, match="integer token ids"):
        TokenExclusionLogitsProcessor([1.0], vocab_size=VOCAB)
    with pytest.raises(TypeError, match="integer token ids"):
        TokenExclusionLogitsProcessor([True], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="bans all 48 tokens"):
        TokenExclusionLogitsProcessor(range(VOCAB), vocab_size=VOCAB)
    with pytest.raises(TypeError, match="`vocab_size` or `model`"):
        TokenExclusionLogitsProcessor([1])
    with pytest.raises(ValueError, match="differs from the model"):
        TokenExclusionLogitsProcessor([1], vocab_size=VOCAB, model=make_tiny_gpt2())
    with pytest.raises(TypeError, match="callable"):
        TokenExclusionLogitsProcessor([1], banned_fn=[2], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="token id 60 is outside"):
        sequence_ban([[1, 60]], VOCAB)
    with pytest.raises(ValueError, match="empty sequence"):
        sequence_ban([[]], VOCAB)
    # ids as an int or a tensor; duplicates collapse
    assert TokenExclusionLogitsProcessor(torch.tensor([4, 4, 2]), vocab_size=VOCAB).banned_token_ids == [2, 4]
    assert TokenExclusionLogitsProcessor(7, vocab_size=VOCAB).banned_token_ids == [7]
    # a banned_fn with the wrong output is caught at the first step
    processor = TokenExclusionLogitsProcessor(banned_fn=lambda ids: torch.zeros(ids.shape[0], VOCAB), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        processor(torch.ones(2, 3, dtype=torch.long), torch.randn(2, VOCAB))
    with pytest.raises(ValueError, match="scores have 40 tokens"):
        TokenExclusionLogitsProcessor([1], vocab_size=VOCAB)(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 40))


# ---- the math against a direct computation ------------------------------------------------------------------------------


def test_output_is_the_renormalised_distribution_and_kl_is_exact():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 300, generator=g) * 3
    scores[0, 250:] = float("-inf")  # an earlier processor masked tokens
    scores[2, 17] = 25.0  # a banned token with most of the mass: p(A) small, KL large
    banned_ids = [3, 17, 120, 299]
    extra = torch.zeros(4, 300, dtype=torch.bool)
    extra[1, 40:60] = True  # per-row bans from the callable
    processor = TokenExclusionLogitsProcessor(banned_ids, banned_fn=lambda ids: extra, vocab_size=300)
    out = processor(torch.ones(4, 2, dtype=torch.long), scores)

    banned = _static_mask(banned_ids, (4, 300)) | extra
    p = torch.softmax(scores.double(), -1)
    q = torch.where(banned, torch.zeros_like(p), p)
    q = q / q.sum(-1, keepdim=True)  # P(x) / sum_{j not banned} P(j)
    assert out.dtype == torch.float32
    assert torch.isneginf(out[banned]).all()
    assert torch.isneginf(out[0, 250:]).all()
    torch.testing.assert_close(out.double().exp(), q, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(4), rtol=0, atol=1e-6)  # normalised
    p_banned = torch.where(banned, p, torch.zeros_like(p)).sum(-1)
    direct = _kl(torch.log(q), torch.log(p))  # KL(projected || input) over the whole vocabulary
    torch.testing.assert_close(direct, -torch.log1p(-p_banned))
    torch.testing.assert_close(processor.kl.double(), direct, rtol=1e-5, atol=1e-6)
    assert processor.kl[2] > 5.0  # the large-KL row is exact too
    # the pure function agrees
    logprobs, kl = exclusion_logprobs(scores, banned)
    assert torch.equal(logprobs, out) and torch.equal(kl, processor.kl)


def test_every_token_banned_or_no_mass_left_raises_instead_of_nan():
    ids = torch.full((2, 3), 9, dtype=torch.long)
    everything = TokenExclusionLogitsProcessor(
        banned_fn=lambda x: torch.tensor([[False] * VOCAB, [True] * VOCAB]), vocab_size=VOCAB
    )
    with pytest.raises(RuntimeError, match=r"row\(s\) \[1\] every token is banned"):
        everything(ids, torch.randn(2, VOCAB))
    scores = torch.randn(2, VOCAB)
    scores[0, 2:] = float("-inf")  # e.g. a top_k tilt before the exclusion kept only banned tokens
    no_mass = TokenExclusionLogitsProcessor([0, 1], vocab_size=VOCAB)
    with pytest.raises(RuntimeError, match=r"row\(s\) \[0\] every token that is not banned has probability 0"):
        no_mass(ids, scores)

    # a row that already finished (its last token is EOS) is exempt: generate pads it anyway
    processor = TokenExclusionLogitsProcessor(
        banned_fn=lambda x: (x[:, -1:] == EOS).expand(-1, VOCAB).clone(), vocab_size=VOCAB, eos_token_id=EOS
    )
    step0 = torch.tensor([[7, 8], [7, 9]])
    torch.manual_seed(0)
    for _ in range(20):  # a row that bans nothing adds exactly 0, whatever the scores (no rounding in log p(A))
        _, kl = exclusion_logprobs(torch.randn(2, VOCAB) * 5, torch.zeros(1, VOCAB, dtype=torch.bool))
        assert torch.equal(kl, torch.zeros(2))
    processor(step0, torch.randn(2, VOCAB))
    kl_before = processor.kl
    scores = torch.randn(2, VOCAB)
    out = processor(torch.cat([step0, torch.tensor([[EOS], [11]])], -1), scores)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.log_softmax(scores[0], -1))
    assert torch.equal(processor.kl, kl_before)  # both rows banned nothing counted here: row 1 has no bans


# ---- generation ---------------------------------------------------------------------------------------------------------


def test_greedy_and_sampling_never_emit_a_banned_token_and_match_bad_words_masking():
    model = _small_vocab_model()
    ids, mask = _left_padded([4, 6, 3])
    plain = _gen(model, ids, mask, max_new_tokens=10)[:, ids.shape[1] :]
    banned = sorted(set(plain.flatten().tolist()) - {EOS, PAD})[:6]  # tokens greedy decoding wants
    assert banned
    processor = TokenExclusionLogitsProcessor(banned, model=model)
    bad_words = [[t] for t in banned]
    greedy = _gen(model, ids, mask, [processor], max_new_tokens=10)
    assert not torch.isin(greedy[:, ids.shape[1] :], torch.tensor(banned)).any()
    # greedy: the most likely allowed token, as with -inf masking of the logits
    assert torch.equal(greedy, _gen(model, ids, mask, bad_words_ids=bad_words, max_new_tokens=10))
    for kwargs in ({}, {"top_p": 0.8, "top_k": 10}, {"temperature": 0.5}):
        kwargs = {"do_sample": True, "num_return_sequences": 4, "max_new_tokens": 12, **kwargs}
        torch.manual_seed(0)
        sampled = _gen(model, ids, mask, [processor], **kwargs)
        assert not torch.isin(sampled[:, ids.shape[1] :], torch.tensor(banned)).any()
        assert processor.kl.shape == (12,) and (processor.kl > 0).all()
        # the same sampling distribution as masking the logits before the warpers: same draws under the same seed
        torch.manual_seed(0)
        assert torch.equal(sampled, _gen(model, ids, mask, bad_words_ids=bad_words, **kwargs))


def test_beam_search_never_emits_a_banned_token_and_follows_the_beams():
    model = _small_vocab_model()
    ids, mask = _left_padded([4, 6])
    banned = [7, 8, 9, 10, 11, 12]
    processor = TokenExclusionLogitsProcessor(banned, model=model)
    out = _gen(model, ids, mask, [processor], num_beams=3, num_return_sequences=3)
    assert not torch.isin(out[:, ids.shape[1] :], torch.tensor(banned)).any()
    assert processor.kl.shape == (6,)  # one record per running beam


def test_kl_is_exact_stops_at_eos_and_resets():
    model = _small_vocab_model(eos_logit=1.5)
    ids, mask = _left_padded([3, 5, 4, 2], seed=1)
    banned_ids = [6, 7, 8, 9]
    sequences = [[20, 21], [30, 31, 32]]
    processor = TokenExclusionLogitsProcessor(banned_ids, sequence_ban(sequences, VOCAB), model=model)
    torch.manual_seed(0)
    out = _gen(model, ids, mask, [processor], do_sample=True, max_new_tokens=16)
    z, _, counted = _per_step(model, ids, mask, out)
    assert not counted.all()  # some row finished early, and generate padded it
    # the banned set of each step: the static ids and the sequences' last tokens where their prefix ends the row
    steps = z.shape[1]
    banned = _static_mask(banned_ids, z.shape).clone()
    for t in range(steps):
        prefix = out[:, : ids.shape[1] + t]
        for sequence in sequences:
            hit = (prefix[:, -(len(sequence) - 1) :] == torch.tensor(sequence[:-1])).all(-1)
            banned[hit, t, sequence[-1]] = True
    p = torch.softmax(z, -1)
    per_step = -torch.log1p(-torch.where(banned, p, torch.zeros_like(p)).sum(-1))
    torch.testing.assert_close(processor.kl.double(), (per_step * counted).sum(-1), rtol=1e-4, atol=1e-5)
    # a new generate call starts a new record
    _gen(model, ids[:1], mask[:1], [processor], max_new_tokens=2)
    assert processor.kl.shape == (1,)
    processor.reset()
    assert processor.kl is None


def test_sequence_ban_blocks_only_the_completion_of_the_sequence():
    model = _small_vocab_model()
    ids, mask = _left_padded([4, 6, 3])
    plain = _gen(model, ids, mask, max_new_tokens=10)
    start = ids.shape[1]
    changes = (plain[:, start + 1 :] != plain[:, start:-1]).nonzero()
    row, t = changes[0].tolist()
    a, b = plain[row, start + t].item(), plain[row, start + t + 1].item()  # greedy writes `a b`: ban that pair
    processor = TokenExclusionLogitsProcessor(banned_fn=sequence_ban([[a, b]], VOCAB), model=model)
    out = _gen(model, ids, mask, [processor], max_new_tokens=10)
    assert torch.equal(out[row, : start + t + 1], plain[row, : start + t + 1])  # `a` alone stays allowed
    assert out[row, start + t + 1] != b
    pairs = torch.stack([out[:, ids.shape[1] - 1 : -1], out[:, ids.shape[1] :]], -1)
    assert not ((pairs[..., 0] == a) & (pairs[..., 1] == b)).any()
    assert torch.equal(out, _gen(model, ids, mask, bad_words_ids=[[a, b]], max_new_tokens=10))


def test_banned_eos_is_allowed_and_rows_run_to_max_new_tokens():
    model = _small_vocab_model(eos_logit=1.5)
    ids, mask = _left_padded([3, 5, 4, 2], seed=1)
    torch.manual_seed(0)
    plain = _gen(model, ids, mask, do_sample=True, max_new_tokens=16)
    assert (plain[:, ids.shape[1] :] == EOS).any()  # without the ban rows do finish
    processor = TokenExclusionLogitsProcessor([EOS], model=model)
    torch.manual_seed(0)
    out = _gen(model, ids, mask, [processor], do_sample=True, max_new_tokens=16)
    assert out.shape[1] == ids.shape[1] + 16 and not (out[:, ids.shape[1] :] == EOS).any()
    z, _, counted = _per_step(model, ids, mask, out)
    expected = (-torch.log1p(-torch.softmax(z, -1)[..., EOS]) * counted).sum(-1)
    torch.testing.assert_close(processor.kl.double(), expected, rtol=1e-4, atol=1e-5)


# ---- composition with the Q tilt ----------------------------------------------------------------------------------------


def test_with_the_tilt_the_records_add_up_to_the_exact_kl_to_the_base_when_exclusion_comes_first():
    beta = 0.6
    model = _small_vocab_model()
    ids, mask = _left_padded([3, 5, 4, 2], seed=1)
    banned_ids = [6, 7, 8, 9, 10, 11, 12, 13]
    kwargs = {"do_sample": True, "max_new_tokens": 16}

    # exclusion, then tilt (the recommended order)
    exclusion, tilt = TokenExclusionLogitsProcessor(banned_ids, model=model), QTiltLogitsProcessor(model, beta)
    torch.manual_seed(0)
    out = _gen(model, ids, mask, [exclusion, tilt], **kwargs)
    assert not torch.isin(out[:, ids.shape[1] :], torch.tensor(banned_ids)).any()
    z, q, counted = _per_step(model, ids, mask, out)
    assert not counted.all()
    banned = _static_mask(banned_ids, z.shape)
    log_base = torch.log_softmax(z, -1)
    log_tilted = torch.log_softmax(z + q / beta, -1)
    log_final = torch.log_softmax((z + q / beta).masked_fill(banned, float("-inf")), -1)  # what is sampled from
    exact = (_kl(log_final, log_base) * counted).sum(-1)
    torch.testing.assert_close((exclusion.kl + tilt.kl).double(), exact, rtol=1e-4, atol=1e-4)

    # tilt, then exclusion (the KL projection of the tilted policy): the same sampling distribution, same draws
    exclusion2, tilt2 = TokenExclusionLogitsProcessor(banned_ids, model=model), QTiltLogitsProcessor(model, beta)
    torch.manual_seed(0)
    assert torch.equal(_gen(model, ids, mask, [tilt2, exclusion2], **kwargs), out)
    # each record is exact for its own step ...
    torch.testing.assert_close(tilt2.kl.double(), (_kl(log_tilted, log_base) * counted).sum(-1), rtol=1e-4, atol=1e-4)
    tilted_kl = (_kl(log_final, log_tilted) * counted).sum(-1)
    torch.testing.assert_close(exclusion2.kl.double(), tilted_kl, rtol=1e-4, atol=1e-4)
    # ... but in this order their sum is not KL(final || base): it misses E_final[log tilted/base] - KL(tilted||base)
    gap = ((_kl(log_final, log_base) - _kl(log_tilted, log_base) - _kl(log_final, log_tilted)) * counted).sum(-1)
    torch.testing.assert_close((exclusion2.kl + tilt2.kl).double() + gap, exact, rtol=1e-4, atol=1e-4)
    assert gap.abs().max() > 1e-2


# ---- warpers after the exclusion ----------------------------------------------------------------------------------------


def test_temperature_commutes_with_the_exclusion():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 100, generator=g) * 2
    banned = [0, 5, 50, 99]
    ids = torch.ones(3, 2, dtype=torch.long)
    for t in (0.3, 0.7, 1.8):
        warp = TemperatureLogitsWarper(t)
        after = torch.softmax(warp(ids, TokenExclusionLogitsProcessor(banned, vocab_size=100)(ids, scores)), -1)
        before = torch.softmax(TokenExclusionLogitsProcessor(banned, vocab_size=100)(ids, warp(ids, scores)), -1)
        torch.testing.assert_close(after, before)
        # both are p^(1/T) renormalised over the allowed tokens
        direct = torch.softmax(scores.double() / t, -1).masked_fill(_static_mask(banned, (3, 100)), 0.0)
        torch.testing.assert_close(after.double(), direct / direct.sum(-1, keepdim=True))

    # in generate: exclusion then the built-in temperature warper == a temperature warper before the exclusion
    model = _small_vocab_model()
    ids, mask = _left_padded([4, 6])
    kwargs = {"do_sample": True, "num_return_sequences": 3, "max_new_tokens": 12}
    banned = [6, 7, 20, 47]
    first = TokenExclusionLogitsProcessor(banned, model=model)
    torch.manual_seed(3)
    out = _gen(model, ids, mask, [first], temperature=0.6, **kwargs)
    second = TokenExclusionLogitsProcessor(banned, model=model)
    torch.manual_seed(3)
    assert torch.equal(_gen(model, ids, mask, [TemperatureLogitsWarper(0.6), second], **kwargs), out)
    # the record is the KL of what the processor received: T = 1 in the first case, T = 0.6 in the second
    assert not torch.allclose(first.kl, second.kl)


def test_top_p_does_not_commute_and_belongs_after_the_exclusion():
    ids = torch.ones(1, 2, dtype=torch.long)
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    top_p = TopPLogitsWarper(top_p=0.6)
    # after (generate's order: processors, then warpers): the nucleus of the renormalised [0, .5, .33, .17]
    after = torch.softmax(top_p(ids, TokenExclusionLogitsProcessor([0], vocab_size=4)(ids, scores)), -1)
    torch.testing.assert_close(after, torch.tensor([[0.0, 0.6, 0.4, 0.0]]))
    # before: the nucleus {0, 1} is taken with the banned token's mass, and only token 1 survives the exclusion
    before = torch.softmax(TokenExclusionLogitsProcessor([0], vocab_size=4)(ids, top_p(ids, scores)), -1)
    torch.testing.assert_close(before, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # and when the banned token alone fills the nucleus, nothing is left
    scores = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    with pytest.raises(RuntimeError, match="probability 0"):
        TokenExclusionLogitsProcessor([0], vocab_size=4)(ids, TopPLogitsWarper(top_p=0.5)(ids, scores))
    after = torch.softmax(
        TopPLogitsWarper(top_p=0.5)(ids, TokenExclusionLogitsProcessor([0], vocab_size=4)(ids, scores)), -1
    )
    torch.testing.assert_close(after, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))  # .625 >= .5: token 1 alone
