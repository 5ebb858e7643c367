"""Images in: Gemma 4's vision encoder on MLX (vision.py), reading and preprocessing the
caller's images through transformers' image processor (inputs.py), and merging the soft
tokens into the target's prefill (merge.py: placeholders, the count check, the
bidirectional image-block masks)."""
