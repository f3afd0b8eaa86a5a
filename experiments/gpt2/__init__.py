"""The GPT-2 experiments of the paper (denoising, multilingual, instruction following): README.md."""
