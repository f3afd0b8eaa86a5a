"""The GPT-2 denoising experiment: its data builder, presets, lm-eval task and README.md."""
