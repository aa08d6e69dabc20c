"""Work done before training, never imported by it: the demo assets (synthetic data, tokenizer, random
base models), the discrete tokenizers (SEED, k-means) and the patch pseudo labels."""
