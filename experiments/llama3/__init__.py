"""The large-model experiment (Table 1): presets, pool builder, evaluation tasks, drivers and the table: README.md."""
