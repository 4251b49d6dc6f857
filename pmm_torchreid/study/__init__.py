"""The ablation runner: settings x splits x seeds, resumable, with paired tables."""
