"""Evaluation harness: quality (bits/byte, greedy agreement, accuracy), speed and memory, side by side."""

from inferpass.eval.bits_per_byte import bits_per_byte
from inferpass.eval.quality import accuracy, greedy_agreement, program_bits_per_byte
from inferpass.eval.report import Report, compare_decoders, compare_encoders

__all__ = [
    "Report",
    "accuracy",
    "bits_per_byte",
    "compare_decoders",
    "compare_encoders",
    "greedy_agreement",
    "program_bits_per_byte",
]
