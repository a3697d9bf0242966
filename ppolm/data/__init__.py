"""Data layer: read files into records with provenance, clean them, check them for a task, collate batches.

Errors a user can cause are one-line ``ppolm.errors.DataError`` messages ``path:line: field 'x': reason``.
"""

from ppolm.data.check import TASKS, CheckReport, check_file, percentiles, token_lengths
from ppolm.data.clean import DROP_REASONS, CleanStats, clean_records, clean_text, filter_by_tokens
from ppolm.data.collate import apply_chat_template, left_pad_collate, right_pad_collate
from ppolm.data.readers import (
    FORMATS, Record, check_fields, detect_format, iob1_to_iob2, missing_reason, read_parallel, read_records,
)

__all__ = [
    "DROP_REASONS", "FORMATS", "TASKS", "CheckReport", "CleanStats", "Record", "apply_chat_template",
    "check_fields", "check_file", "clean_records", "clean_text", "detect_format", "filter_by_tokens",
    "iob1_to_iob2", "left_pad_collate", "missing_reason", "percentiles", "read_parallel", "read_records",
    "right_pad_collate", "token_lengths",
]
