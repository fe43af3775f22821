"""`branches.branch_top_k`: one forward with branch tokens under a 4D mask gives each branch the next-token
distribution of its own sequence, against one plain forward per continuation."""

import pytest
import torch

from tests.conftest import make_tiny_gpt2, make_tiny_llama
from trl_qhead import AutoModelForCausalLMWithQHead
from trl_qhead.branches import branch_top_k

SEQUENCES = [[5, 17, 3, 9, 11, 2], [7, 1], [4, 8, 15, 16]]
PAIRS = [[(1, 30), (3, 31), (6, 32), (6, 9)], [(2, 40)], [(1, 4), (2, 4), (4, 3)]]
BRANCHES = [{f"row {row} branch {i}": pair for i, pair in enumerate(pairs)} for row, pairs in enumerate(PAIRS)]


def _direct(model, sequence, prefix_length, token, k):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence[:prefix_length] + [token]])).logits[0, -1]
    top = logits.float().log_softmax(-1).topk(k)
    return top.indices, top.values


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_branches_equal_one_forward_per_continuation(make, batch_size):
    model = make().eval()
    found = branch_top_k(model, SEQUENCES, BRANCHES, k=5, pad_token_id=0, batch_size=batch_size)
    assert len(found) == len(SEQUENCES)
    for sequence, branches, row_found in zip(SEQUENCES, BRANCHES, found, strict=True):
        assert list(row_found) == list(branches)  # the caller's keys, in its order
        for key, (prefix_length, token) in branches.items():
            ids, log_probs = row_found[key]
            assert ids.shape == log_probs.shape == (5,)
            expected_ids, expected_log_probs = _direct(model, sequence, prefix_length, token, 5)
            assert torch.allclose(log_probs, expected_log_probs, atol=1e-5)
            assert ids.tolist() == expected_ids.tolist()


def test_branches_through_the_q_head_wrapper_use_its_language_model_and_allow_empty_rows():
    backbone = make_tiny_llama().eval()
    model = AutoModelForCausalLMWithQHead(backbone)
    found = branch_top_k(model, [SEQUENCES[0], SEQUENCES[1]], [BRANCHES[0], {}], k=3, pad_token_id=0)
    assert found[1] == {}
    for key, (prefix_length, token) in BRANCHES[0].items():
        _, expected_log_probs = _direct(backbone, SEQUENCES[0], prefix_length, token, 3)
        assert torch.allclose(found[0][key][1], expected_log_probs, atol=1e-5)
    assert branch_top_k(model, [[1, 2]], [{}], k=2, pad_token_id=0) == [{}]


@pytest.mark.parametrize("prefix_length", [0, 7])
def test_a_branch_outside_its_sequence_is_refused(prefix_length):
    with pytest.raises(ValueError, match="Row 0: branch after"):
        branch_top_k(make_tiny_llama(), [[1, 2, 3, 4, 5, 6]], [{"a": (prefix_length, 3)}], k=2, pad_token_id=0)


def test_branches_that_are_not_mappings_are_refused():
    with pytest.raises(TypeError, match="Row 1: `branches` rows must map keys"):
        branch_top_k(make_tiny_llama(), [[1, 2], [3, 4]], [{}, [(1, 3)]], k=2, pad_token_id=0)


def test_flash_attention_is_refused_before_anything_runs(gpt2_tokenizer):
    from datasets import Dataset

    from trl_qhead import generate_and_score
    from trl_qhead.decoding import RewardLookahead

    model = make_tiny_llama()
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="4D attention mask"):
        branch_top_k(model, [[1, 2]], [{"a": (1, 3)}], k=2, pad_token_id=0)
    with pytest.raises(ValueError, match="4D attention mask"):  # at the call, not after sampling a batch
        generate_and_score(
            AutoModelForCausalLMWithQHead(model), gpt2_tokenizer, Dataset.from_dict({"prompt": ["Hi"]}),
            lambda completions, **kwargs: [0.0] * len(completions), num_generations=1, max_new_tokens=2,
            candidate_rewards=2, candidate_lookahead=2, candidate_beta=0.3, show_progress=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="4D attention mask"):
        RewardLookahead(model, gpt2_tokenizer, lambda completions, **kwargs: [0.0] * len(completions), k=2,
                        lookahead_k=2, beta=0.3)  # fmt: skip
