"""Evaluation: ROUGE-L, greedy generation, loss/perplexity, MMLU, communication bytes, FLOPs/parameters."""

from fedmoe.eval.flops import FLOP_PARTS, count_flops, format_flops_table, load_model_config
from fedmoe.eval.generate import greedy_generate, left_pad
from fedmoe.eval.mmlu import MMLU_SUBJECTS, MMLU_SUBSETS, Question, build_prompt, evaluate_mmlu, load_mmlu
from fedmoe.eval.perplexity import evaluate_loss
from fedmoe.eval.rouge import rouge_l, rouge_l_per_example
from fedmoe.eval.stats import format_change, paired_bootstrap

__all__ = [
    "FLOP_PARTS",
    "MMLU_SUBJECTS",
    "MMLU_SUBSETS",
    "Question",
    "build_prompt",
    "count_flops",
    "evaluate_loss",
    "evaluate_mmlu",
    "format_change",
    "format_flops_table",
    "greedy_generate",
    "left_pad",
    "load_mmlu",
    "load_model_config",
    "paired_bootstrap",
    "rouge_l",
    "rouge_l_per_example",
]
