"""What both stages need from models and text: model folders and their identity, loading (dtype table, GGUF),
the tokenizer fingerprint, the lm_head check, and the corpus -> token sequences path. Imports no stage and
no storage code."""
