"""Hostile betas for QTiltLogitsProcessor: a tilt temperature so small that `Q / beta` overflows must still decode
the limit it tends to (greedy takes argmax Q, ties broken by the logits) and record a finite, exact KL."""

import pytest
import torch
from transformers import LogitsProcessor

from tests.conftest import make_tiny_gpt2
from trl_qhead import AutoModelForCausalLMWithQHead, QTiltLogitsProcessor, fold_tilt, rerank

VOCAB, PAD = 48, 0
TIED = (7, 31)  # the two tokens sharing the largest Q


class _Record(LogitsProcessor):
    """Keeps the scores the tilt receives (it runs just before it)."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.detach().clone())
        return scores


def _bias_only_q_model():
    """Q(s, a) = b[a] for every state: a zero weight and a bias with an exact tie at its top."""
    model = AutoModelForCausalLMWithQHead(make_tiny_gpt2(vocab_size=VOCAB).eval())
    with torch.no_grad():
        model.q_head.bias.copy_(torch.linspace(-2.0, 0.5, VOCAB))
        model.q_head.bias[list(TIED)] = 1.0
    return model


@pytest.mark.parametrize("beta", [1e-45, 1e-300, 5e-324, 1e-30])
@pytest.mark.parametrize("top_k", [None, 12])
def test_tiny_beta_takes_argmax_q_ties_broken_by_logits_and_records_the_exact_kl(beta, top_k):
    model = _bias_only_q_model()
    q = model.q_head.bias.detach()
    ids = torch.tensor([[11, 12, 13, 14], [20, 3, 40, 9]])
    record = _Record()
    with QTiltLogitsProcessor(model, beta=beta, top_k=top_k, eos_token_id=[]) as tilt:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            logits_processor=[record, tilt],
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=PAD,
        )
        kl = tilt.kl
    new_tokens = out[:, ids.shape[1] :]
    assert len(record.seen) == new_tokens.shape[1] == 6

    expected_kl = torch.zeros(ids.shape[0], dtype=torch.float64)
    for step, scores in enumerate(record.seen):
        scores = scores.double()
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        if top_k is None:
            allowed[:] = True
        else:
            allowed.scatter_(-1, scores.topk(top_k, dim=-1).indices, True)
        q_allowed = torch.where(allowed, q.double().expand_as(scores), -torch.inf)
        best = q_allowed == q_allowed.amax(-1, keepdim=True)  # argmax Q (with its ties) among the allowed tokens
        choice = torch.where(best, scores, -torch.inf).argmax(-1)  # the tie broken by the logits
        assert torch.equal(new_tokens[:, step], choice), (step, new_tokens[:, step], choice)
        # pi' is pi restricted to `best`, so KL(pi' || pi) = -log pi(best), summed over the steps.
        logp = torch.log_softmax(scores, dim=-1)
        expected_kl -= torch.logsumexp(torch.where(best, logp, -torch.inf), dim=-1)
    if top_k is None:  # without top-k both tied tokens are always allowed: the logits decide between them
        assert set(new_tokens.flatten().tolist()) <= set(TIED)
    assert kl is not None and torch.isfinite(kl).all(), kl
    torch.testing.assert_close(kl.double(), expected_kl, rtol=1e-5, atol=1e-5)
    assert (expected_kl > 0).all()


def test_tiny_beta_tilted_scores_are_normalised_log_probs_without_nan():
    model = _bias_only_q_model()
    with QTiltLogitsProcessor(model, beta=1e-45, eos_token_id=[]) as tilt:
        ids = torch.tensor([[11, 12, 13]])
        model(ids)  # the hook keeps the last hidden state, as during generate
        scores = model.pretrained_model(ids).logits[:, -1]
        tilted = tilt(ids, scores)
    assert not torch.isnan(tilted).any()
    assert torch.isfinite(tilted[0, list(TIED)]).all()
    assert torch.isneginf(tilted[0, [0, 1, 2]]).all()  # tokens below the best Q get no mass at all
    torch.testing.assert_close(tilted.exp().sum(-1), torch.ones(1))


def test_fold_tilt_refuses_a_beta_whose_folded_head_overflows():
    model = _bias_only_q_model()
    with torch.no_grad():
        model.q_head.weight.normal_(0.0, 1.0)
    with pytest.raises(ValueError, match=r"`beta`=1e-45 .*overflow.*QTiltLogitsProcessor"):
        fold_tilt(model, beta=1e-45)
    folded = fold_tilt(model, beta=1e-3)  # large but finite: still folds
    assert torch.isfinite(folded.get_output_embeddings().weight).all()


def test_rerank_with_a_tiny_beta_samples_the_argmax_without_nan():
    model = _bias_only_q_model()
    samples = torch.tensor([[11, 12, 3], [11, 12, 7], [11, 12, 4], [20, 21, 31], [20, 21, 2], [20, 21, 5]])
    result = rerank(model, samples, num_samples=3, attention_mask=torch.ones_like(samples), beta=1e-45)
    assert result.indices.tolist() == [1, 3]  # the samples ending in a token of largest Q


# ---- issue 27: RewardLookahead's k against the vocabulary, at construction -------------------------------------------


@pytest.mark.parametrize("kwargs", [{"k": 60000}, {"k": 4, "lookahead_k": 60000, "beta": 0.5}])
def test_reward_lookahead_refuses_a_k_beyond_the_vocabulary_at_construction(gpt2_tokenizer, kwargs):
    from trl_qhead.decoding import RewardLookahead

    name = "lookahead_k" if "lookahead_k" in kwargs else "k"
    with pytest.raises(
        ValueError, match=f"`{name}` \\(60000\\) is larger than the model's vocabulary \\(50257 tokens\\)"
    ):
        RewardLookahead(make_tiny_gpt2(), gpt2_tokenizer, lambda completions, **kw: [0.0] * len(completions), **kwargs)


def test_reward_lookahead_takes_k_equal_to_the_vocabulary():
    from trl_qhead.decoding import RewardLookahead

    source = RewardLookahead(make_tiny_gpt2(vocab_size=VOCAB), None, lambda completions, **kw: [0.0], k=VOCAB)
    assert source.k == VOCAB


@pytest.mark.parametrize("masked", [False, True])
def test_reward_lookahead_keeps_a_leading_pad_id_that_is_a_real_token(gpt2_tokenizer, masked):
    """GPT-2's BOS is its pad id (<|endoftext|>): a prompt that starts with it, left-padded with it, keeps it, as the
    attention mask says (the branch forward of the lookahead reads it; a source that took it for padding valued the
    candidates on another sequence)."""
    from tests.test_lookahead import direct_tilted_logprobs, letter_count_reward
    from trl_qhead.decoding import RewardLookahead

    model = make_tiny_gpt2(seed=3).eval()
    model.generation_config.pad_token_id = gpt2_tokenizer.eos_token_id
    bos = gpt2_tokenizer.eos_token
    enc = gpt2_tokenizer([f"{bos}{bos}The house", "A cat sat on a mat"], padding=True, padding_side="left",
                         return_tensors="pt")  # fmt: skip
    assert enc["input_ids"][0, :4].tolist() == [gpt2_tokenizer.eos_token_id] * 4  # 2 pads, then 2 real BOS tokens
    beta, k, k2 = 0.5, 6, 3
    source = RewardLookahead(model, gpt2_tokenizer, letter_count_reward, k=k, lookahead_k=k2, beta=beta)
    processor = QTiltLogitsProcessor(source, beta, top_k=k if masked else None)
    torch.manual_seed(0)
    out = model.generate(**enc, logits_processor=[processor], do_sample=True, top_k=0, max_new_tokens=4,
                         output_scores=True, return_dict_in_generate=True)  # fmt: skip
    steps = direct_tilted_logprobs(model, gpt2_tokenizer, enc, out.sequences, beta, k, masked, k2)
    for scores, (_, expected) in zip(out.scores, steps, strict=True):
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    processor.remove()
