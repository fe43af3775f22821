"""trl-qhead: a vocabulary-sized Q head for causal LMs, trained with TRL, and Q-tilted decoding."""

from .config import QHeadConfig
from .data import DataCollatorForQHead, prepare_dataset
from .decoding import ImplicitQ, QHeadSource, QSource, QTiltLogitsProcessor, RerankOutput, fold_tilt, rerank
from .exclusion import TokenExclusionLogitsProcessor, exclusion_logprobs, sequence_ban
from .gvpo import GVPOConfig, GVPOTrainer, gvpo_loss, gvpo_loss_on_groups
from .heads import DenseQHead, QContext, QHead, TiedQHead, build_q_head
from .modeling import AutoModelForCausalLMWithQHead, CausalLMWithQHeadOutput
from .returns import compute_returns
from .rewards import RewardFunctions
from .rollouts import generate_and_score
from .trainer import QHeadTrainer

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLMWithQHead",
    "CausalLMWithQHeadOutput",
    "DataCollatorForQHead",
    "DenseQHead",
    "GVPOConfig",
    "GVPOTrainer",
    "ImplicitQ",
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
    "build_q_head",
    "compute_returns",
    "exclusion_logprobs",
    "fold_tilt",
    "generate_and_score",
    "gvpo_loss",
    "gvpo_loss_on_groups",
    "prepare_dataset",
    "rerank",
    "sequence_ban",
]
