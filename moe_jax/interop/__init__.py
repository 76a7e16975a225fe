"""Checkpoints in and out: Hugging Face MoE families (hf.py, hf_families.py)."""
