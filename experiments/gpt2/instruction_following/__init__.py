"""The GPT-2 instruction following experiment: its data builder, presets, lm-eval task and README.md."""
