"""The training application behind `kronsparse train`: the run's config, the data, the paper's
models, the loop, checkpoints, metrics and the run folder. It uses the library (kronsparse.*);
the library never imports it."""
