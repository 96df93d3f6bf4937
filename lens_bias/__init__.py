"""lens_bias: locate and mitigate bias inside language models with TransformerLens."""
