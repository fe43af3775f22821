"""trl-qhead: a vocabulary-sized Q head for causal LMs, trained with TRL, and Q-tilted decoding."""

from . import bnb_notice  # noqa: F401 (first: holds bitsandbytes' import-time notice back, see its docstring)
from .config import QHeadConfig
from .data import DataCollatorForQHead, prepare_dataset
from .decoding import ImplicitQ, QHeadSource, QSource, QTiltLogitsProcessor, RerankOutput, fold_tilt, rerank
from .decoding.exclusion import TokenExclusionLogitsProcessor, exclusion_logprobs, sequence_ban
from .gvpo import GVPOConfig, GVPOTrainer, group_rows, gvpo_loss, gvpo_loss_on_groups
from .heads import DenseQHead, QContext, QHead, TiedQHead, build_q_head
from .labels import CandidateLabels, FutureValueLabels, LabelSource, PrefixShaping, TwoStepLabels
from .modeling import AutoModelForCausalLMWithQHead, CausalLMWithQHeadOutput
from .offline_rl import OfflineRLRounds, offline_rl_rounds
from .returns import compute_returns
from .rewards import RewardFunctions
from .rollouts import generate_and_score
from .trainer import QHeadTrainer

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLMWithQHead",
    "CandidateLabels",
    "CausalLMWithQHeadOutput",
    "DataCollatorForQHead",
    "DenseQHead",
    "FutureValueLabels",
    "GVPOConfig",
    "GVPOTrainer",
    "ImplicitQ",
    "LabelSource",
    "OfflineRLRounds",
    "PrefixShaping",
    "QContext",
    "QHead",
    "QHeadConfig",
    "QHeadSource",
    "QHeadTrainer",
    "QSource",
    "QTiltLogitsProcessor",
    "RerankOutput",
    "RewardFunctions",
    "TiedQHead",
    "TokenExclusionLogitsProcessor",
    "TwoStepLabels",
    "build_q_head",
    "compute_returns",
    "exclusion_logprobs",
    "fold_tilt",
    "generate_and_score",
    "group_rows",
    "gvpo_loss",
    "gvpo_loss_on_groups",
    "offline_rl_rounds",
    "prepare_dataset",
    "rerank",
    "sequence_ban",
]
