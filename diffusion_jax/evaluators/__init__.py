"""Built-in evaluator types (`config.evals`); each module registers its types with `train.evaluators.register`."""
