"""Data preparation and loading.

corpus     documents, train/val/test splitting, the built-in Shakespeare corpus
hf_corpus  documents from Hugging Face datasets
tokenize   tokenizer training and loading, writing {split}.bin, {split}.jsonl and stats.json
blocks     TokenBlocks (a torch Dataset of fixed-size blocks) and load_prepared
"""
