"""The GPT-2 multilingual experiment: its data builder, presets, lm-eval task and README.md."""
