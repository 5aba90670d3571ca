"""Run directory, metrics log, summary.json and the markdown report (no metric computation)."""

from fedmoe.report.report import format_results_table, human_bytes, plot_learning_curve, write_report
from fedmoe.rundir import RunDir, atomic_write_bytes, atomic_write_text
from fedmoe.report.summary import CLIENT_KEYS, GLOBAL_KEYS, build_summary

__all__ = [
    "CLIENT_KEYS",
    "GLOBAL_KEYS",
    "RunDir",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_summary",
    "format_results_table",
    "human_bytes",
    "plot_learning_curve",
    "write_report",
]
