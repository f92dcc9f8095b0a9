"""Preparing training data: tokenizers that work offline, the streaming memmap writer behind `hpcds data prepare`,
and built-in corpora. Imports numpy and tiktoken only, never torch.
"""
